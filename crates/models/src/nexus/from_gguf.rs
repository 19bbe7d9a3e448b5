//! A Qwen2 GGUF as the language-model part of a NEXUS-O checkpoint: its
//! dimensions as an [`LmConfig`], its tensors dequantised to f32 under the
//! Hugging Face names [`super::NexusLm::load`] reads, and its tokenizer.
//! This is how NEXUS-mini takes the pinned Qwen2.5-0.5B-Instruct.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use tokenizers::Tokenizer;

use super::config::LmConfig;
use crate::error::{ModelError, Result};

/// What a Qwen2 GGUF gives a NEXUS-O checkpoint.
#[derive(Debug)]
pub struct GgufLm {
    /// Dimensions.
    pub config: LmConfig,
    /// f32 tensors named as `Qwen2ForCausalLM`'s (`model.layers.0.self_attn.q_proj.weight`, …).
    pub tensors: HashMap<String, Tensor>,
    /// The byte-level BPE tokenizer in the file's metadata.
    pub tokenizer: Tokenizer,
}

/// Hugging Face name of a llama.cpp tensor name.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let (module, kind) = part.rsplit_once('.')?;
    let module = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.{kind}"))
}

/// Reads a `qwen2` GGUF file into f32 tensors on `device`.
pub fn qwen2_lm(path: &Path, device: &Device) -> Result<GgufLm> {
    let load = |e: candle_core::Error| ModelError::Load(format!("{}: {e}", path.display()));
    let mut f = std::fs::File::open(path)
        .map_err(|e| ModelError::Load(format!("{}: {e}", path.display())))?;
    let ct = gguf_file::Content::read(&mut f)
        .map_err(|e| ModelError::Load(format!("{}: not a GGUF file: {e}", path.display())))?;
    let md = |k: &str| {
        ct.metadata
            .get(&format!("qwen2.{k}"))
            .ok_or_else(|| ModelError::Load(format!("{}: no qwen2.{k}", path.display())))
    };
    let u = |k: &str| -> Result<usize> {
        Ok(md(k)?
            .to_u32()
            .map_err(|e| ModelError::Load(format!("qwen2.{k}: {e}")))? as usize)
    };
    let fl = |k: &str| -> Result<f64> {
        Ok(f64::from(md(k)?.to_f32().map_err(|e| {
            ModelError::Load(format!("qwen2.{k}: {e}"))
        })?))
    };
    let mut tensors = HashMap::new();
    for name in ct.tensor_infos.keys() {
        let Some(hf) = hf_name(name) else {
            return Err(ModelError::Load(format!(
                "{}: unexpected tensor {name}",
                path.display()
            )));
        };
        let t = ct
            .tensor(&mut f, name, device)
            .and_then(|q| q.dequantize(device))
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(load)?;
        tensors.insert(hf, t);
    }
    let vocab = tensors
        .get("model.embed_tokens.weight")
        .ok_or_else(|| ModelError::Load(format!("{}: no token_embd.weight", path.display())))?
        .dim(0)
        .map_err(load)?;
    let config = LmConfig {
        vocab_size: vocab,
        hidden_size: u("embedding_length")?,
        intermediate_size: u("feed_forward_length")?,
        num_hidden_layers: u("block_count")?,
        num_attention_heads: u("attention.head_count")?,
        num_key_value_heads: u("attention.head_count_kv")?,
        max_position_embeddings: u("context_length")?,
        rope_theta: fl("rope.freq_base").unwrap_or(10_000.0),
        rms_norm_eps: fl("attention.layer_norm_rms_epsilon")?,
        tie_word_embeddings: !tensors.contains_key("lm_head.weight"),
        mrope_section: None,
    };
    let tokenizer = crate::qwen::tokenizer_from_gguf(&ct)?;
    Ok(GgufLm {
        config,
        tensors,
        tokenizer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_cpp_names_map_to_hugging_face_names() {
        assert_eq!(
            hf_name("blk.3.attn_q.bias").as_deref(),
            Some("model.layers.3.self_attn.q_proj.bias")
        );
        assert_eq!(
            hf_name("blk.23.ffn_down.weight").as_deref(),
            Some("model.layers.23.mlp.down_proj.weight")
        );
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name("blk.1.attn_q_norm.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
