//! CTranslate2 Whisper → safetensors with Hugging Face tensor names (what
//! candle-transformers' Whisper and every HF Whisper checkpoint use), plus a
//! `config.json` with the model's dimensions, alignment heads and suppression lists.
//!
//! CT2 fuses projections: self-attention `linear_0` is Q|K|V stacked on rows,
//! cross-attention `linear_1` is K|V. Whisper has no key bias, so the K slice of
//! a fused bias must be zero; a non-zero one is refused rather than dropped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ct2::{Ct2Model, DType, TensorRef};
use crate::error::{Result, WeightsError};

/// A Whisper checkpoint's `config.json`, with Hugging Face field names: the
/// one description of a Whisper model in the tree. The import writes it, the
/// model loader (`nexus_models::whisper`) reads it, and a Hugging Face
/// folder's own file reads as it too (its other fields are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhisperConfig {
    /// `num_mel_bins` (n_mels): 80, or 128 for large-v3.
    pub num_mel_bins: usize,
    /// `d_model` (n_audio_state = n_text_state).
    pub d_model: usize,
    /// `encoder_layers` (n_audio_layer).
    pub encoder_layers: usize,
    /// `decoder_layers` (n_text_layer).
    pub decoder_layers: usize,
    /// `encoder_attention_heads` (n_audio_head).
    pub encoder_attention_heads: usize,
    /// `decoder_attention_heads` (n_text_head).
    pub decoder_attention_heads: usize,
    /// Encoder MLP width.
    pub encoder_ffn_dim: usize,
    /// Decoder MLP width.
    pub decoder_ffn_dim: usize,
    /// `vocab_size` (n_vocab); 51864 for English-only models, 51865+ multilingual.
    pub vocab_size: usize,
    /// `max_source_positions` (n_audio_ctx): 1500 frames = 30 s.
    pub max_source_positions: usize,
    /// `max_target_positions` (n_text_ctx): 448 tokens.
    pub max_target_positions: usize,
    /// `suppress_tokens`: never emitted (non-speech symbols).
    #[serde(default)]
    pub suppress_tokens: Vec<i64>,
    /// `begin_suppress_tokens`: not emitted as the first token.
    #[serde(default)]
    pub begin_suppress_tokens: Vec<i64>,
    /// `alignment_heads`: (layer, head) pairs whose cross-attention follows time.
    #[serde(default)]
    pub alignment_heads: Vec<[usize; 2]>,
    /// The language tokens' ids, as CTranslate2 lists them (empty for
    /// English-only models and for Hugging Face folders).
    #[serde(default)]
    pub lang_ids: Vec<u32>,
}

impl WhisperConfig {
    /// English-only checkpoints have one token fewer and no language tokens.
    pub fn is_multilingual(&self) -> bool {
        self.vocab_size >= 51865
    }
}

/// What an import wrote.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// Folder holding `model.safetensors`, `config.json`, `tokenizer.json`.
    pub out_dir: PathBuf,
    /// The config written beside the weights.
    pub config: WhisperConfig,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub bytes: usize,
}

struct Out<'a> {
    path: &'a Path,
    tensors: Vec<(String, TensorView<'a>)>,
}

fn st_dtype(path: &Path, name: &str, d: DType) -> Result<Dtype> {
    match d {
        DType::F32 => Ok(Dtype::F32),
        DType::F16 => Ok(Dtype::F16),
        DType::BF16 => Ok(Dtype::BF16),
        other => Err(WeightsError::Unsupported(format!(
            "{}: {name} is {other:?}; int8-quantised CTranslate2 models are not supported, \
             convert with float16 or float32 weights",
            path.display()
        ))),
    }
}

fn is_zero(t: &[u8], dtype: DType) -> bool {
    match dtype {
        // Ignore the sign bit: -0.0 is zero too.
        DType::F16 | DType::BF16 => t
            .chunks_exact(2)
            .all(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7fff == 0),
        _ => t
            .chunks_exact(4)
            .all(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7fff_ffff == 0),
    }
}

impl<'a> Out<'a> {
    fn put(&mut self, name: String, t: TensorRef<'a>) -> Result<()> {
        self.put_raw(name, t.dtype, t.shape.to_vec(), t.data)
    }

    fn put_raw(
        &mut self,
        name: String,
        dtype: DType,
        shape: Vec<usize>,
        data: &'a [u8],
    ) -> Result<()> {
        let dt = st_dtype(self.path, &name, dtype)?;
        let view = TensorView::new(dt, shape, data)
            .map_err(|e| WeightsError::format(self.path, format!("{name}: {e}")))?;
        self.tensors.push((name, view));
        Ok(())
    }

    /// Splits a tensor into `n` equal row blocks (dim 0).
    fn split_rows(
        &self,
        t: TensorRef<'a>,
        n: usize,
        what: &str,
    ) -> Result<Vec<(Vec<usize>, &'a [u8])>> {
        let rows = t.shape.first().copied().unwrap_or(0);
        if rows == 0 || !rows.is_multiple_of(n) {
            return Err(WeightsError::format(
                self.path,
                format!("{what}: {rows} rows cannot be split into {n} equal projections"),
            ));
        }
        let mut shape = t.shape.to_vec();
        shape[0] = rows / n;
        let block = t.data.len() / n;
        Ok((0..n)
            .map(|i| (shape.clone(), &t.data[i * block..(i + 1) * block]))
            .collect())
    }
}

fn count_layers(m: &Ct2Model, prefix: &str) -> usize {
    (0..)
        .take_while(|i| {
            m.get(&format!("{prefix}/layer_{i}/ffn/linear_0/weight"))
                .is_some()
        })
        .count()
}

fn dim(m: &Ct2Model, name: &str, axis: usize) -> Result<usize> {
    let t = m.require(name)?;
    t.shape.get(axis).copied().ok_or_else(|| {
        WeightsError::format(
            m.path(),
            format!("{name} has shape {:?}, expected an axis {axis}", t.shape),
        )
    })
}

/// Reads the dimensions of a CT2 Whisper model (its token lists left empty:
/// they are in the CT2 folder's `config.json`).
pub fn dims(m: &Ct2Model) -> Result<WhisperConfig> {
    let heads = |name: &str| -> Result<usize> {
        let v = m.scalar(name)?;
        usize::try_from(v).ok().filter(|h| *h > 0).ok_or_else(|| {
            WeightsError::format(m.path(), format!("{name} = {v} is not a head count"))
        })
    };
    let d = WhisperConfig {
        num_mel_bins: dim(m, "encoder/conv1/weight", 1)?,
        d_model: dim(m, "encoder/conv1/weight", 0)?,
        encoder_layers: count_layers(m, "encoder"),
        decoder_layers: count_layers(m, "decoder"),
        encoder_attention_heads: heads("encoder/num_heads")?,
        decoder_attention_heads: heads("decoder/num_heads")?,
        encoder_ffn_dim: dim(m, "encoder/layer_0/ffn/linear_0/weight", 0)?,
        decoder_ffn_dim: dim(m, "decoder/layer_0/ffn/linear_0/weight", 0)?,
        vocab_size: dim(m, "decoder/embeddings/weight", 0)?,
        max_source_positions: dim(m, "encoder/position_encodings/encodings", 0)?,
        max_target_positions: dim(m, "decoder/position_encodings/encodings", 0)?,
        suppress_tokens: Vec::new(),
        begin_suppress_tokens: Vec::new(),
        alignment_heads: Vec::new(),
        lang_ids: Vec::new(),
    };
    if d.encoder_layers == 0 || d.decoder_layers == 0 {
        return Err(WeightsError::format(
            m.path(),
            "no encoder or decoder layers found",
        ));
    }
    if !d.d_model.is_multiple_of(d.encoder_attention_heads)
        || !d.d_model.is_multiple_of(d.decoder_attention_heads)
    {
        return Err(WeightsError::format(
            m.path(),
            format!("d_model {} is not divisible by the head counts", d.d_model),
        ));
    }
    Ok(d)
}

fn attention<'a>(
    out: &mut Out<'a>,
    m: &'a Ct2Model,
    src: &str,
    dst: &str,
    fused_qkv: bool,
) -> Result<()> {
    let w0 = m.require(&format!("{src}/linear_0/weight"))?;
    let b0 = m.require(&format!("{src}/linear_0/bias"))?;
    if fused_qkv {
        let w = out.split_rows(w0, 3, &format!("{src}/linear_0/weight"))?;
        let b = out.split_rows(b0, 3, &format!("{src}/linear_0/bias"))?;
        if !is_zero(b[1].1, b0.dtype) {
            return Err(WeightsError::format(
                m.path(),
                format!("{src}: the key projection has a bias, which Whisper does not"),
            ));
        }
        for (i, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            out.put_raw(
                format!("{dst}.{proj}.weight"),
                w0.dtype,
                w[i].0.clone(),
                w[i].1,
            )?;
        }
        out.put_raw(
            format!("{dst}.q_proj.bias"),
            b0.dtype,
            b[0].0.clone(),
            b[0].1,
        )?;
        out.put_raw(
            format!("{dst}.v_proj.bias"),
            b0.dtype,
            b[2].0.clone(),
            b[2].1,
        )?;
        out.put(
            format!("{dst}.out_proj.weight"),
            m.require(&format!("{src}/linear_1/weight"))?,
        )?;
        out.put(
            format!("{dst}.out_proj.bias"),
            m.require(&format!("{src}/linear_1/bias"))?,
        )?;
    } else {
        out.put(format!("{dst}.q_proj.weight"), w0)?;
        out.put(format!("{dst}.q_proj.bias"), b0)?;
        let w1 = m.require(&format!("{src}/linear_1/weight"))?;
        let b1 = m.require(&format!("{src}/linear_1/bias"))?;
        let w = out.split_rows(w1, 2, &format!("{src}/linear_1/weight"))?;
        let b = out.split_rows(b1, 2, &format!("{src}/linear_1/bias"))?;
        if !is_zero(b[0].1, b1.dtype) {
            return Err(WeightsError::format(
                m.path(),
                format!("{src}: the key projection has a bias, which Whisper does not"),
            ));
        }
        out.put_raw(
            format!("{dst}.k_proj.weight"),
            w1.dtype,
            w[0].0.clone(),
            w[0].1,
        )?;
        out.put_raw(
            format!("{dst}.v_proj.weight"),
            w1.dtype,
            w[1].0.clone(),
            w[1].1,
        )?;
        out.put_raw(
            format!("{dst}.v_proj.bias"),
            b1.dtype,
            b[1].0.clone(),
            b[1].1,
        )?;
        out.put(
            format!("{dst}.out_proj.weight"),
            m.require(&format!("{src}/linear_2/weight"))?,
        )?;
        out.put(
            format!("{dst}.out_proj.bias"),
            m.require(&format!("{src}/linear_2/bias"))?,
        )?;
    }
    layer_norm(
        out,
        m,
        &format!("{src}/layer_norm"),
        &format!("{dst}_layer_norm"),
    )
}

fn layer_norm<'a>(out: &mut Out<'a>, m: &'a Ct2Model, src: &str, dst: &str) -> Result<()> {
    out.put(format!("{dst}.weight"), m.require(&format!("{src}/gamma"))?)?;
    out.put(format!("{dst}.bias"), m.require(&format!("{src}/beta"))?)
}

fn linear<'a>(out: &mut Out<'a>, m: &'a Ct2Model, src: &str, dst: &str) -> Result<()> {
    out.put(
        format!("{dst}.weight"),
        m.require(&format!("{src}/weight"))?,
    )?;
    out.put(format!("{dst}.bias"), m.require(&format!("{src}/bias"))?)
}

fn mlp<'a>(out: &mut Out<'a>, m: &'a Ct2Model, src: &str, dst: &str) -> Result<()> {
    linear(
        out,
        m,
        &format!("{src}/ffn/linear_0"),
        &format!("{dst}.fc1"),
    )?;
    linear(
        out,
        m,
        &format!("{src}/ffn/linear_1"),
        &format!("{dst}.fc2"),
    )?;
    layer_norm(
        out,
        m,
        &format!("{src}/ffn/layer_norm"),
        &format!("{dst}.final_layer_norm"),
    )
}

/// The Hugging Face-named tensors of a CT2 Whisper model, borrowing its bytes.
fn tensors<'a>(m: &'a Ct2Model, d: &WhisperConfig) -> Result<Vec<(String, TensorView<'a>)>> {
    let mut out = Out {
        path: m.path(),
        tensors: Vec::new(),
    };
    for conv in ["conv1", "conv2"] {
        linear(
            &mut out,
            m,
            &format!("encoder/{conv}"),
            &format!("model.encoder.{conv}"),
        )?;
    }
    out.put(
        "model.encoder.embed_positions.weight".into(),
        m.require("encoder/position_encodings/encodings")?,
    )?;
    for i in 0..d.encoder_layers {
        let (src, dst) = (
            format!("encoder/layer_{i}"),
            format!("model.encoder.layers.{i}"),
        );
        attention(
            &mut out,
            m,
            &format!("{src}/self_attention"),
            &format!("{dst}.self_attn"),
            true,
        )?;
        mlp(&mut out, m, &src, &dst)?;
    }
    layer_norm(
        &mut out,
        m,
        "encoder/layer_norm",
        "model.encoder.layer_norm",
    )?;
    out.put(
        "model.decoder.embed_tokens.weight".into(),
        m.require("decoder/embeddings/weight")?,
    )?;
    out.put(
        "model.decoder.embed_positions.weight".into(),
        m.require("decoder/position_encodings/encodings")?,
    )?;
    for i in 0..d.decoder_layers {
        let (src, dst) = (
            format!("decoder/layer_{i}"),
            format!("model.decoder.layers.{i}"),
        );
        attention(
            &mut out,
            m,
            &format!("{src}/self_attention"),
            &format!("{dst}.self_attn"),
            true,
        )?;
        attention(
            &mut out,
            m,
            &format!("{src}/attention"),
            &format!("{dst}.encoder_attn"),
            false,
        )?;
        mlp(&mut out, m, &src, &dst)?;
    }
    layer_norm(
        &mut out,
        m,
        "decoder/layer_norm",
        "model.decoder.layer_norm",
    )?;
    Ok(out.tensors)
}

/// Settings from CT2's `config.json` that decoding needs.
#[derive(Debug, Default, Deserialize)]
struct Ct2Config {
    #[serde(default)]
    alignment_heads: Vec<[usize; 2]>,
    #[serde(default)]
    lang_ids: Vec<u32>,
    #[serde(default)]
    suppress_ids: Vec<i64>,
    #[serde(default)]
    suppress_ids_begin: Vec<i64>,
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).map_err(WeightsError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(WeightsError::io(path))
}

/// Converts a CT2 Whisper folder (`model.bin`, `config.json`, `tokenizer.json`)
/// into `out` (`model.safetensors`, `config.json`, `tokenizer.json`).
pub fn import_ct2(src: &Path, out: &Path) -> Result<ImportReport> {
    let model = Ct2Model::open(&src.join("model.bin"))?;
    if model.spec != "WhisperSpec" {
        return Err(WeightsError::Unsupported(format!(
            "{}: spec {} is not a Whisper model",
            model.path().display(),
            model.spec
        )));
    }
    let d = dims(&model)?;
    let cfg_path = src.join("config.json");
    let ct2_cfg: Ct2Config = match std::fs::read(&cfg_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            WeightsError::format(&cfg_path, format!("not a CTranslate2 Whisper config: {e}"))
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ct2Config::default(),
        Err(e) => return Err(WeightsError::io(&cfg_path)(e)),
    };
    let tok_src = src.join("tokenizer.json");
    let tokenizer = std::fs::read(&tok_src).map_err(WeightsError::io(&tok_src))?;
    serde_json::from_slice::<Value>(&tokenizer)
        .map_err(|e| WeightsError::format(&tok_src, format!("not a JSON tokenizer: {e}")))?;

    let views = tensors(&model, &d)?;
    let n = views.len();
    let bytes: usize = views.iter().map(|(_, v)| v.data().len()).sum();
    std::fs::create_dir_all(out).map_err(WeightsError::io(out))?;
    let st_path = out.join("model.safetensors");
    let tmp = out.join("model.safetensors.partial");
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize_to_file(views, Some(metadata), &tmp)
        .map_err(|e| WeightsError::format(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, &st_path).map_err(WeightsError::io(&st_path))?;

    let d = WhisperConfig {
        alignment_heads: ct2_cfg.alignment_heads,
        lang_ids: ct2_cfg.lang_ids,
        suppress_tokens: ct2_cfg.suppress_ids,
        begin_suppress_tokens: ct2_cfg.suppress_ids_begin,
        ..d
    };
    let mut config = serde_json::to_value(&d).expect("the config serialises; this is a bug");
    config
        .as_object_mut()
        .expect("the config is an object; this is a bug")
        .insert("model_type".into(), "whisper".into());
    let text = serde_json::to_vec_pretty(&config).expect("json values serialise; this is a bug");
    write_atomic(&out.join("config.json"), &text)?;
    write_atomic(&out.join("tokenizer.json"), &tokenizer)?;
    Ok(ImportReport {
        out_dir: out.to_owned(),
        config: d,
        tensors: n,
        bytes,
    })
}

/// Reads the tensor names and shapes of a safetensors file from its header alone.
pub fn safetensors_header(path: &Path) -> Result<HashMap<String, Vec<usize>>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(WeightsError::io(path))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| WeightsError::format(path, "truncated: no safetensors header length"))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(WeightsError::format(
            path,
            format!("header of {len} bytes is not plausible; not a safetensors file"),
        ));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)
        .map_err(|_| WeightsError::format(path, "truncated safetensors header"))?;
    let v: HashMap<String, Value> = serde_json::from_slice(&header)
        .map_err(|e| WeightsError::format(path, format!("safetensors header is not JSON: {e}")))?;
    Ok(v.into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, info)| {
            let shape = info["shape"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|d| d.as_u64().map(|d| d as usize))
                        .collect()
                })
                .unwrap_or_default();
            (k, shape)
        })
        .collect())
}

/// Checks that a Hugging Face Whisper folder has what loading needs, without reading the weights.
pub fn check_hf_folder(dir: &Path) -> Result<WhisperConfig> {
    let cfg_path = dir.join("config.json");
    let bytes = std::fs::read(&cfg_path).map_err(WeightsError::io(&cfg_path))?;
    let d: WhisperConfig = serde_json::from_slice(&bytes)
        .map_err(|e| WeightsError::format(&cfg_path, format!("not a Whisper config: {e}")))?;
    let tok = dir.join("tokenizer.json");
    if !tok.is_file() {
        return Err(WeightsError::format(
            &tok,
            "missing; a Whisper folder needs its tokenizer.json",
        ));
    }
    let st = dir.join("model.safetensors");
    let names = safetensors_header(&st)?;
    let want = [
        (
            "model.encoder.conv1.weight".to_string(),
            vec![d.d_model, d.num_mel_bins, 3],
        ),
        (
            "model.decoder.embed_tokens.weight".to_string(),
            vec![d.vocab_size, d.d_model],
        ),
        (
            format!(
                "model.decoder.layers.{}.encoder_attn.k_proj.weight",
                d.decoder_layers - 1
            ),
            vec![d.d_model, d.d_model],
        ),
        (
            format!("model.encoder.layers.{}.fc1.weight", d.encoder_layers - 1),
            vec![d.encoder_ffn_dim, d.d_model],
        ),
    ];
    for (name, shape) in want {
        match names.get(&name) {
            Some(s) if *s == shape => {}
            Some(s) => {
                return Err(WeightsError::format(
                    &st,
                    format!("{name} has shape {s:?}, config.json implies {shape:?}"),
                ));
            }
            None => {
                return Err(WeightsError::format(
                    &st,
                    format!("no tensor {name}; is this a Whisper checkpoint?"),
                ));
            }
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ct2::tests::Writer;

    const D: u32 = 4;

    fn f32s(vals: impl IntoIterator<Item = f32>) -> Vec<u8> {
        vals.into_iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// Values that encode their own variable and position, so a wrong split shows.
    fn ramp(seed: f32, n: u32) -> Vec<u8> {
        f32s((0..n).map(|i| seed + i as f32))
    }

    /// A 1+1-layer CT2 Whisper with d=4, 2 heads, vocab 10, 8 mel bins.
    fn tiny_ct2(key_bias: f32) -> Vec<u8> {
        let mut vars: Vec<(String, Vec<u32>, Vec<u8>)> = Vec::new();
        let mut add = |name: &str, shape: &[u32], data: Vec<u8>| {
            vars.push((name.into(), shape.to_vec(), data))
        };
        add("encoder/conv1/weight", &[D, 8, 3], ramp(1000.0, D * 24));
        add("encoder/conv1/bias", &[D], ramp(1100.0, D));
        add("encoder/conv2/weight", &[D, D, 3], ramp(1200.0, D * D * 3));
        add("encoder/conv2/bias", &[D], ramp(1300.0, D));
        add(
            "encoder/position_encodings/encodings",
            &[6, D],
            ramp(1400.0, 6 * D),
        );
        for (p, seed) in [("encoder/layer_0", 2000.0), ("decoder/layer_0", 3000.0)] {
            add(
                &format!("{p}/self_attention/linear_0/weight"),
                &[3 * D, D],
                ramp(seed, 3 * D * D),
            );
            let mut b: Vec<f32> = (0..3 * D).map(|i| seed + 100.0 + i as f32).collect();
            for v in &mut b[D as usize..2 * D as usize] {
                *v = 0.0;
            }
            b[D as usize] = key_bias;
            add(
                &format!("{p}/self_attention/linear_0/bias"),
                &[3 * D],
                f32s(b),
            );
            add(
                &format!("{p}/self_attention/linear_1/weight"),
                &[D, D],
                ramp(seed + 200.0, D * D),
            );
            add(
                &format!("{p}/self_attention/linear_1/bias"),
                &[D],
                ramp(seed + 300.0, D),
            );
            add(
                &format!("{p}/self_attention/layer_norm/gamma"),
                &[D],
                ramp(seed + 400.0, D),
            );
            add(
                &format!("{p}/self_attention/layer_norm/beta"),
                &[D],
                ramp(seed + 500.0, D),
            );
            add(
                &format!("{p}/ffn/linear_0/weight"),
                &[4 * D, D],
                ramp(seed + 600.0, 4 * D * D),
            );
            add(
                &format!("{p}/ffn/linear_0/bias"),
                &[4 * D],
                ramp(seed + 700.0, 4 * D),
            );
            add(
                &format!("{p}/ffn/linear_1/weight"),
                &[D, 4 * D],
                ramp(seed + 800.0, 4 * D * D),
            );
            add(
                &format!("{p}/ffn/linear_1/bias"),
                &[D],
                ramp(seed + 900.0, D),
            );
            add(
                &format!("{p}/ffn/layer_norm/gamma"),
                &[D],
                ramp(seed + 950.0, D),
            );
            add(
                &format!("{p}/ffn/layer_norm/beta"),
                &[D],
                ramp(seed + 970.0, D),
            );
        }
        let p = "decoder/layer_0/attention";
        add(
            &format!("{p}/linear_0/weight"),
            &[D, D],
            ramp(4000.0, D * D),
        );
        add(&format!("{p}/linear_0/bias"), &[D], ramp(4100.0, D));
        add(
            &format!("{p}/linear_1/weight"),
            &[2 * D, D],
            ramp(4200.0, 2 * D * D),
        );
        let mut kv: Vec<f32> = vec![0.0; D as usize];
        kv.extend((0..D).map(|i| 4300.0 + i as f32));
        add(&format!("{p}/linear_1/bias"), &[2 * D], f32s(kv));
        add(
            &format!("{p}/linear_2/weight"),
            &[D, D],
            ramp(4400.0, D * D),
        );
        add(&format!("{p}/linear_2/bias"), &[D], ramp(4500.0, D));
        add(&format!("{p}/layer_norm/gamma"), &[D], ramp(4600.0, D));
        add(&format!("{p}/layer_norm/beta"), &[D], ramp(4700.0, D));
        for side in ["encoder", "decoder"] {
            add(&format!("{side}/layer_norm/gamma"), &[D], ramp(5000.0, D));
            add(&format!("{side}/layer_norm/beta"), &[D], ramp(5100.0, D));
        }
        add("decoder/embeddings/weight", &[10, D], ramp(6000.0, 10 * D));
        add(
            "decoder/position_encodings/encodings",
            &[5, D],
            ramp(7000.0, 5 * D),
        );
        let mut w = Writer::new("WhisperSpec", vars.len() as u32 + 2);
        w.var("encoder/num_heads", &[], 2, &2i16.to_le_bytes());
        w.var("decoder/num_heads", &[], 2, &2i16.to_le_bytes());
        for (name, shape, data) in &vars {
            w.var(name, shape, 0, data);
        }
        w.aliases(&[("decoder/projection/weight", "decoder/embeddings/weight")]);
        w.0
    }

    fn write_src(dir: &Path, model: Vec<u8>) {
        std::fs::write(dir.join("model.bin"), model).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"alignment_heads": [[0, 1]], "lang_ids": [], "suppress_ids": [1, 2], "suppress_ids_begin": [3]}"#,
        )
        .unwrap();
        std::fs::write(dir.join("tokenizer.json"), r#"{"model": {}}"#).unwrap();
    }

    fn read_f32(st: &safetensors::SafeTensors<'_>, name: &str) -> Vec<f32> {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    #[test]
    fn converts_names_splits_projections_and_writes_config() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, out) = (tmp.path().join("src"), tmp.path().join("out"));
        std::fs::create_dir_all(&src).unwrap();
        write_src(&src, tiny_ct2(0.0));
        let report = import_ct2(&src, &out).unwrap();
        assert_eq!(report.config.d_model, 4);
        assert_eq!(
            (report.config.encoder_layers, report.config.decoder_layers),
            (1, 1)
        );
        assert_eq!(
            (report.config.num_mel_bins, report.config.vocab_size),
            (8, 10)
        );
        assert_eq!(report.config.encoder_ffn_dim, 16);

        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        // Q, K, V are consecutive row blocks of the fused weight.
        let q = read_f32(&st, "model.encoder.layers.0.self_attn.q_proj.weight");
        let k = read_f32(&st, "model.encoder.layers.0.self_attn.k_proj.weight");
        let v = read_f32(&st, "model.encoder.layers.0.self_attn.v_proj.weight");
        assert_eq!((q[0], k[0], v[0]), (2000.0, 2016.0, 2032.0));
        assert_eq!(
            read_f32(&st, "model.encoder.layers.0.self_attn.v_proj.bias")[0],
            2108.0
        );
        assert!(
            st.tensor("model.encoder.layers.0.self_attn.k_proj.bias")
                .is_err()
        );
        // Cross-attention K|V.
        assert_eq!(
            read_f32(&st, "model.decoder.layers.0.encoder_attn.k_proj.weight")[0],
            4200.0
        );
        assert_eq!(
            read_f32(&st, "model.decoder.layers.0.encoder_attn.v_proj.weight")[0],
            4216.0
        );
        assert_eq!(
            read_f32(&st, "model.decoder.layers.0.encoder_attn.v_proj.bias")[0],
            4300.0
        );
        assert_eq!(
            read_f32(&st, "model.decoder.layers.0.encoder_attn.out_proj.bias")[0],
            4500.0
        );
        assert_eq!(
            read_f32(&st, "model.decoder.layers.0.fc2.weight")[0],
            3800.0
        );
        assert_eq!(
            read_f32(&st, "model.decoder.layers.0.final_layer_norm.bias")[0],
            3970.0
        );
        assert_eq!(
            st.tensor("model.encoder.conv1.weight").unwrap().shape(),
            &[4, 8, 3]
        );
        assert_eq!(
            st.tensor("model.decoder.embed_tokens.weight")
                .unwrap()
                .shape(),
            &[10, 4]
        );
        assert_eq!(report.tensors, st.len());

        let cfg: Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["model_type"], "whisper");
        assert_eq!(cfg["decoder_attention_heads"], 2);
        assert_eq!(cfg["alignment_heads"], serde_json::json!([[0, 1]]));
        assert_eq!(cfg["suppress_tokens"], serde_json::json!([1, 2]));
        assert_eq!(check_hf_folder(&out).unwrap(), report.config);
    }

    #[test]
    fn key_bias_wrong_spec_and_missing_tokenizer_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        write_src(tmp.path(), tiny_ct2(0.5));
        let e = import_ct2(tmp.path(), &tmp.path().join("o"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("encoder/layer_0/self_attention: the key projection has a bias"),
            "{e}"
        );

        let mut w = Writer::new("TransformerSpec", 0);
        w.aliases(&[]);
        write_src(tmp.path(), w.0);
        let e = import_ct2(tmp.path(), &tmp.path().join("o"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("spec TransformerSpec is not a Whisper model"),
            "{e}"
        );

        write_src(tmp.path(), tiny_ct2(0.0));
        std::fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
        let e = import_ct2(tmp.path(), &tmp.path().join("o"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
    }

    #[test]
    fn hf_folder_check_names_the_problem() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, out) = (tmp.path().join("src"), tmp.path().join("out"));
        std::fs::create_dir_all(&src).unwrap();
        write_src(&src, tiny_ct2(0.0));
        import_ct2(&src, &out).unwrap();
        let cfg = out.join("config.json");
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("\"vocab_size\": 10", "\"vocab_size\": 11");
        std::fs::write(&cfg, text).unwrap();
        let e = check_hf_folder(&out).unwrap_err().to_string();
        assert!(
            e.contains(
                "model.decoder.embed_tokens.weight has shape [10, 4], config.json implies [11, 4]"
            ),
            "{e}"
        );
        std::fs::write(
            out.join("model.safetensors"),
            b"\x10\x00\x00\x00\x00\x00\x00\x00{}",
        )
        .unwrap();
        let e = check_hf_folder(&out).unwrap_err().to_string();
        assert!(
            e.contains("truncated safetensors header") || e.contains("not JSON"),
            "{e}"
        );
    }
}
