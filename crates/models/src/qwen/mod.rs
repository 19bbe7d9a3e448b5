//! Text translation with a Qwen2.5 instruct model in GGUF (quantised) form.
//!
//! The GGUF file carries everything: weights, hyper-parameters and the
//! byte-level BPE tokenizer (tokens and merges in its metadata), from which a
//! `tokenizers` tokenizer is rebuilt here. Prompts use the model's ChatML format.

use std::io::{Read, Seek};
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_qwen2::ModelWeights;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{ModelError, Result};

/// Qwen2's pre-tokenisation regex (from its tokenizer configuration).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Block formats whose CPU dot product has no SIMD kernel in candle: a
/// Q5_0 matrix-vector product runs several times slower than a Q8_0 one.
const SLOW_BLOCKS: [GgmlDType; 3] = [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1];

/// The GGUF rewritten in memory with its [`SLOW_BLOCKS`] tensors requantised
/// to Q8_0 (8 bits per weight; finer than the 4–5 it replaces, so the
/// weights change by well under one step of their original grid), or `None`
/// when it holds none.
fn requantized<R: Read + Seek>(
    ct: &gguf_file::Content,
    r: &mut R,
) -> candle_core::Result<Option<Vec<u8>>> {
    if !ct
        .tensor_infos
        .values()
        .any(|t| SLOW_BLOCKS.contains(&t.ggml_dtype))
    {
        return Ok(None);
    }
    let t0 = std::time::Instant::now();
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    let mut changed = 0usize;
    for name in names {
        let mut t = ct.tensor(r, name, &Device::Cpu)?;
        if SLOW_BLOCKS.contains(&t.dtype()) {
            t = QTensor::quantize(&t.dequantize(&Device::Cpu)?, GgmlDType::Q8_0)?;
            changed += 1;
        }
        tensors.push((name.as_str(), t));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> =
        ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    // Sized up front: growing a half-gigabyte buffer copies it over and over.
    let data: usize = refs.iter().map(|(_, t)| t.storage_size_in_bytes()).sum();
    let mut out = std::io::Cursor::new(Vec::with_capacity(
        data + ct.tensor_data_offset as usize + 64 * refs.len(),
    ));
    gguf_file::write(&mut out, &metadata, &refs)?;
    tracing::info!(
        tensors = changed,
        took_ms = t0.elapsed().as_millis() as u64,
        "requantised Q4_1/Q5_0/Q5_1 tensors to Q8_0 for the CPU's SIMD kernels"
    );
    Ok(Some(out.into_inner()))
}

/// English names of the languages prompts mention, by ISO 639-1 code.
pub fn language_name(code: &str) -> Option<&'static str> {
    Some(match code {
        "en" => "English",
        "zh" => "Simplified Chinese",
        "de" => "German",
        "fr" => "French",
        "es" => "Spanish",
        "it" => "Italian",
        "pt" => "Portuguese",
        "ru" => "Russian",
        "ja" => "Japanese",
        "ko" => "Korean",
        "ar" => "Arabic",
        "nl" => "Dutch",
        "pl" => "Polish",
        "tr" => "Turkish",
        "vi" => "Vietnamese",
        "th" => "Thai",
        "id" => "Indonesian",
        "hi" => "Hindi",
        "uk" => "Ukrainian",
        "sv" => "Swedish",
        "cs" => "Czech",
        _ => return None,
    })
}

fn md_strings(ct: &gguf_file::Content, key: &str) -> Result<Vec<String>> {
    let v = ct
        .metadata
        .get(key)
        .ok_or_else(|| ModelError::Load(format!("GGUF has no {key}")))?;
    v.to_vec()
        .map_err(|e| ModelError::Load(format!("{key}: {e}")))?
        .iter()
        .map(|x| {
            x.to_string()
                .cloned()
                .map_err(|e| ModelError::Load(format!("{key}: {e}")))
        })
        .collect()
}

/// Rebuilds the byte-level BPE tokenizer stored in GGUF metadata.
pub fn tokenizer_from_gguf(ct: &gguf_file::Content) -> Result<Tokenizer> {
    let tokens = md_strings(ct, "tokenizer.ggml.tokens")?;
    let merges = md_strings(ct, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = ct
        .metadata
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.iter().filter_map(|x| x.to_i32().ok()).collect())
        .unwrap_or_default();
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .filter_map(|m| m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| ModelError::Load(format!("GGUF tokenizer: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    let split = Split::new(
        SplitPattern::Regex(QWEN2_SPLIT.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| ModelError::Load(format!("GGUF tokenizer regex: {e}")))?;
    tok.with_pre_tokenizer(Some(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, false, false).into(),
    ])));
    tok.with_decoder(Some(ByteLevel::default()));
    // Control tokens (type 3) such as <|im_start|> are matched whole, never split.
    let specials: Vec<AddedToken> = tokens
        .iter()
        .enumerate()
        .filter(|(i, t)| types.get(*i) == Some(&3) || (t.starts_with("<|") && t.ends_with("|>")))
        .map(|(_, t)| AddedToken::from(t.clone(), true))
        .collect();
    tok.add_special_tokens(specials)
        .map_err(|e| ModelError::Load(format!("GGUF tokenizer special tokens: {e}")))?;
    Ok(tok)
}

/// A loaded Qwen2 chat model used as a translator.
pub struct Translator {
    model: ModelWeights,
    tokenizer: Tokenizer,
    stop: Vec<u32>,
    device: Device,
}

impl std::fmt::Debug for Translator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Translator")
            .field("stop", &self.stop)
            .finish()
    }
}

impl Translator {
    /// Loads a Qwen2 GGUF file, its slow block formats requantised to Q8_0
    /// (see [`SLOW_BLOCKS`]).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let mut f = std::fs::File::open(path)
            .map_err(|e| ModelError::Load(format!("{}: {e}", path.display())))?;
        Self::from_reader(&mut f, path, device, true)
    }

    /// Loads a Qwen2 GGUF file with its tensors as stored (for comparison).
    pub fn load_as_stored(path: &Path, device: &Device) -> Result<Self> {
        let mut f = std::fs::File::open(path)
            .map_err(|e| ModelError::Load(format!("{}: {e}", path.display())))?;
        Self::from_reader(&mut f, path, device, false)
    }

    fn from_reader<R: Read + Seek>(
        r: &mut R,
        path: &Path,
        device: &Device,
        requantize: bool,
    ) -> Result<Self> {
        let ct = gguf_file::Content::read(r)
            .map_err(|e| ModelError::Load(format!("{}: not a GGUF file: {e}", path.display())))?;
        let arch = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_default();
        if arch != "qwen2" {
            return Err(ModelError::Load(format!(
                "{}: architecture {arch:?} is not qwen2",
                path.display()
            )));
        }
        let tokenizer = tokenizer_from_gguf(&ct)?;
        let load = |e: candle_core::Error| ModelError::Load(format!("{}: {e}", path.display()));
        let buf = if requantize {
            requantized(&ct, r).map_err(load)?
        } else {
            None
        };
        let model = match buf {
            Some(buf) => {
                let mut c = std::io::Cursor::new(buf);
                let ct = gguf_file::Content::read(&mut c).map_err(load)?;
                ModelWeights::from_gguf(ct, &mut c, device).map_err(load)?
            }
            None => ModelWeights::from_gguf(ct, r, device).map_err(load)?,
        };
        let stop = ["<|im_end|>", "<|endoftext|>"]
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect();
        Ok(Self {
            model,
            tokenizer,
            stop,
            device: device.clone(),
        })
    }

    /// Token ids of `text` (special tokens recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ModelError::Input(format!("cannot tokenize: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// Runs a ChatML conversation greedily and returns the assistant's reply.
    pub fn chat(&mut self, system: &str, user: &str, max_new_tokens: usize) -> Result<String> {
        let prompt = format!(
            "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        );
        let ids = self.encode(&prompt)?;
        self.model.clear_kv_cache();
        let mut logits = self
            .model
            .forward(&Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?, 0)?;
        let mut out = Vec::new();
        for pos in ids.len()..ids.len() + max_new_tokens {
            let next = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
            if self.stop.contains(&next) {
                break;
            }
            out.push(next);
            logits = self
                .model
                .forward(&Tensor::new(&[next], &self.device)?.unsqueeze(0)?, pos)?;
        }
        self.tokenizer
            .decode(&out, true)
            .map(|s| s.trim().to_owned())
            .map_err(|e| ModelError::Input(format!("cannot detokenize: {e}")))
    }

    /// Translates `text` into `target` (ISO 639-1); `source` may be `None` to let the model tell.
    pub fn translate(&mut self, text: &str, source: Option<&str>, target: &str) -> Result<String> {
        let tgt = language_name(target).ok_or_else(|| {
            ModelError::Input(format!(
                "target language {target:?} is not supported for translation"
            ))
        })?;
        if text.trim().is_empty() {
            return Ok(String::new());
        }
        let from = match source.and_then(language_name) {
            Some(s) => format!(" from {s}"),
            None => String::new(),
        };
        let system = format!(
            "You are a professional translator. Translate the user's text{from} into {tgt}. \
             Reply with the translation only, no explanations, no quotes."
        );
        let budget = self.encode(text)?.len() * 3 + 32;
        self.chat(&system, text, budget)
    }
}
