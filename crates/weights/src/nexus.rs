//! NEXUS-O checkpoint folders: checked tensor by tensor against their
//! `config.json` before `nexus models import` stores them.
//!
//! The layout (README, "NEXUS-O checkpoints"): `config.json` with
//! `model_type: "nexus-o"`; `model.safetensors` with `audio_encoder.*`
//! (Hugging Face `WhisperEncoder` names), `adapter.linear1/linear2`,
//! `lm.*` (Hugging Face `Qwen2ForCausalLM` names) and `audio_decoder.*`;
//! `tokenizer.json` holding the audio and ChatML special tokens. A FireFly
//! codec folder (`model_type: "firefly-gan"`) is checked the same way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Result, WeightsError};
use crate::whisper::safetensors_header;

/// What a checked NEXUS-O folder holds.
#[derive(Debug, Clone)]
pub struct NexusSummary {
    /// `nexus-o` or `firefly-gan`.
    pub model_type: String,
    /// Tensors in `model.safetensors`.
    pub tensors: usize,
    /// Parameters.
    pub parameters: usize,
    /// A one-line description.
    pub description: String,
}

fn get<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

fn num(cfg: &Value, path: &str, file: &Path) -> Result<usize> {
    get(cfg, path)
        .and_then(Value::as_u64)
        .map(|n| n as usize)
        .ok_or_else(|| WeightsError::format(file, format!("config.json has no number at {path}")))
}

/// The `model_type` of a folder's `config.json`, if it has one.
pub fn model_type(dir: &Path) -> Option<String> {
    let bytes = std::fs::read(dir.join("config.json")).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.get("model_type")?.as_str().map(str::to_owned)
}

struct Expect<'a> {
    header: &'a HashMap<String, Vec<usize>>,
    file: &'a Path,
}

impl Expect<'_> {
    fn shape(&self, name: &str, shape: &[usize]) -> Result<()> {
        match self.header.get(name) {
            None => Err(WeightsError::format(
                self.file,
                format!("tensor {name} is missing"),
            )),
            Some(s) if s.as_slice() != shape => Err(WeightsError::format(
                self.file,
                format!("tensor {name} has shape {s:?}; config.json implies {shape:?}"),
            )),
            Some(_) => Ok(()),
        }
    }
}

fn read_config(dir: &Path) -> Result<(PathBuf, Value)> {
    let file = dir.join("config.json");
    let bytes = std::fs::read(&file).map_err(WeightsError::io(&file))?;
    let v =
        serde_json::from_slice(&bytes).map_err(|e| WeightsError::format(&file, e.to_string()))?;
    Ok((file, v))
}

/// Checks a NEXUS-O or FireFly folder: config, every part's key tensors and
/// their shapes, and for NEXUS-O the tokenizer's special tokens.
pub fn check_folder(dir: &Path) -> Result<NexusSummary> {
    let (cfg_file, cfg) = read_config(dir)?;
    let model_type = cfg
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let st = dir.join("model.safetensors");
    let header = safetensors_header(&st)?;
    let e = Expect {
        header: &header,
        file: &st,
    };
    let description = match model_type.as_str() {
        "nexus-o" => {
            let n = |p: &str| num(&cfg, p, &cfg_file);
            let d = n("audio_encoder.d_model")?;
            let enc_layers = n("audio_encoder.encoder_layers")?;
            e.shape(
                "audio_encoder.conv1.weight",
                &[d, n("audio_encoder.num_mel_bins")?, 3],
            )?;
            e.shape(
                &format!("audio_encoder.layers.{}.fc1.weight", enc_layers - 1),
                &[n("audio_encoder.encoder_ffn_dim")?, d],
            )?;
            let (stack, ah, h) = (
                n("adapter.stack")?,
                n("adapter.hidden_size")?,
                n("lm.hidden_size")?,
            );
            e.shape("adapter.linear1.weight", &[ah, d * stack])?;
            e.shape("adapter.linear2.weight", &[h, ah])?;
            let vocab = n("lm.vocab_size")?;
            let layers = n("lm.num_hidden_layers")?;
            let kv = n("lm.num_key_value_heads")? * h / n("lm.num_attention_heads")?;
            e.shape("lm.model.embed_tokens.weight", &[vocab, h])?;
            let last = format!("lm.model.layers.{}", layers - 1);
            e.shape(&format!("{last}.self_attn.k_proj.weight"), &[kv, h])?;
            e.shape(
                &format!("{last}.mlp.down_proj.weight"),
                &[h, n("lm.intermediate_size")?],
            )?;
            let tied = get(&cfg, "lm.tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if !tied {
                e.shape("lm.lm_head.weight", &[vocab, h])?;
            }
            let speech = if get(&cfg, "audio_decoder").is_some() {
                let (k, v, ad) = (
                    n("audio_decoder.codebooks")?,
                    n("audio_decoder.codebook_size")?,
                    n("audio_decoder.hidden_size")?,
                );
                e.shape(
                    &format!("audio_decoder.embeddings.{}.weight", k - 1),
                    &[v + 2, ad],
                )?;
                e.shape(
                    &format!("audio_decoder.heads.{}.weight", k - 1),
                    &[v + 1, ad],
                )?;
                e.shape("audio_decoder.lm_proj.weight", &[ad, h])?;
                let ad_layers = n("audio_decoder.num_hidden_layers")?;
                e.shape(
                    &format!("audio_decoder.layers.{}.down_proj.weight", ad_layers - 1),
                    &[ad, n("audio_decoder.intermediate_size")?],
                )?;
                format!(", audio decoder {ad_layers} layers × {k} codebooks of {v}")
            } else {
                ", no audio decoder (text only)".to_string()
            };
            let tok_file = dir.join("tokenizer.json");
            let tok = std::fs::read_to_string(&tok_file).map_err(WeightsError::io(&tok_file))?;
            let tokens = get(&cfg, "tokens")
                .and_then(Value::as_object)
                .ok_or_else(|| WeightsError::format(&cfg_file, "config.json has no tokens"))?;
            for (role, t) in tokens {
                let Some(t) = t.as_str() else { continue };
                if !tok.contains(&serde_json::to_string(t).unwrap_or_default()) {
                    return Err(WeightsError::format(
                        &tok_file,
                        format!("the {role} token {t:?} is not in the tokenizer"),
                    ));
                }
            }
            format!(
                "NEXUS-O: Whisper encoder d{d} × {enc_layers}, adapter ×{stack}, LM d{h} × {layers} (vocab {vocab}){speech}"
            )
        }
        "firefly-gan" => {
            let n = |p: &str| num(&cfg, p, &cfg_file);
            let groups = n("quantizer.n_groups")?;
            let dim = n("quantizer.input_dim")?;
            let levels = get(&cfg, "quantizer.levels")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            e.shape(
                &format!(
                    "quantizer.residual_fsq.rvqs.{}.project_out.weight",
                    groups - 1
                ),
                &[dim / groups.max(1), levels],
            )?;
            for needed in ["head.conv_pre.conv.weight", "head.conv_post.conv.weight"] {
                if !header.contains_key(needed) {
                    return Err(WeightsError::format(
                        &st,
                        format!("tensor {needed} is missing"),
                    ));
                }
            }
            format!("FireFly-GAN codec: {groups} codebooks, latent {dim}")
        }
        other => {
            return Err(WeightsError::format(
                &cfg_file,
                format!("model_type {other:?} is not \"nexus-o\" or \"firefly-gan\""),
            ));
        }
    };
    Ok(NexusSummary {
        model_type,
        tensors: header.len(),
        parameters: header.values().map(|s| s.iter().product::<usize>()).sum(),
        description,
    })
}

/// Checks `src` and copies its files into `out` (the store's folder for it).
pub fn import(src: &Path, out: &Path) -> Result<NexusSummary> {
    let summary = check_folder(src)?;
    std::fs::create_dir_all(out).map_err(WeightsError::io(out))?;
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        let from = src.join(f);
        if !from.is_file() {
            continue;
        }
        let to = out.join(f);
        if std::fs::canonicalize(&from).ok() == std::fs::canonicalize(&to).ok() {
            continue;
        }
        let tmp = to.with_extension("partial");
        std::fs::copy(&from, &tmp).map_err(WeightsError::io(&tmp))?;
        std::fs::rename(&tmp, &to).map_err(WeightsError::io(&to))?;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/tests/golden/nexus")
            .join(name)
    }

    #[test]
    fn the_seeded_checkpoints_pass_and_import() {
        let s = check_folder(&golden("nexus-tiny")).unwrap();
        assert_eq!(s.model_type, "nexus-o");
        assert!(
            s.description.contains("6 layers × 8 codebooks of 15"),
            "{}",
            s.description
        );
        let f = check_folder(&golden("firefly-tiny")).unwrap();
        assert_eq!(f.model_type, "firefly-gan");
        let tmp = tempfile::tempdir().unwrap();
        import(&golden("nexus-tiny"), tmp.path()).unwrap();
        assert!(tmp.path().join("tokenizer.json").is_file());
        assert_eq!(model_type(tmp.path()).as_deref(), Some("nexus-o"));
    }

    #[test]
    fn a_config_that_disagrees_with_the_tensors_is_refused_naming_the_tensor() {
        let tmp = tempfile::tempdir().unwrap();
        for f in ["model.safetensors", "tokenizer.json"] {
            std::fs::copy(golden("nexus-tiny").join(f), tmp.path().join(f)).unwrap();
        }
        let cfg = std::fs::read_to_string(golden("nexus-tiny/config.json")).unwrap();
        std::fs::write(
            tmp.path().join("config.json"),
            cfg.replace("\"codebook_size\": 15", "\"codebook_size\": 1000"),
        )
        .unwrap();
        let e = check_folder(tmp.path()).unwrap_err().to_string();
        assert!(
            e.contains("audio_decoder.embeddings.7.weight") && e.contains("[1002, 32]"),
            "{e}"
        );
        std::fs::write(
            tmp.path().join("config.json"),
            cfg.replace("<|audio|>", "<|sound|>"),
        )
        .unwrap();
        let e = check_folder(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("<|sound|>"), "{e}");
    }
}
