//! `config.json` of a NEXUS-O checkpoint.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{ModelError, Result};
use crate::whisper::Config as WhisperConfig;

/// The whole checkpoint's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NexusConfig {
    /// Always `nexus-o`.
    pub model_type: String,
    /// The Whisper encoder (Hugging Face `WhisperConfig` names).
    pub audio_encoder: EncoderConfig,
    /// The frame-stacking adapter.
    pub adapter: AdapterConfig,
    /// The Qwen2.5 language model (Hugging Face `Qwen2Config` names).
    pub lm: LmConfig,
    /// The speech-code decoder; a checkpoint without one writes text only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio_decoder: Option<AudioDecoderConfig>,
    /// Special tokens, by their text in `tokenizer.json`.
    pub tokens: Tokens,
    /// Instruction texts of the prompt formats.
    #[serde(default)]
    pub prompts: Prompts,
    /// Registry name or folder of the vocoder that turns the codes into audio.
    #[serde(default)]
    pub vocoder: Option<String>,
}

/// Whisper encoder dimensions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EncoderConfig {
    /// 80, or 128 for large-v3.
    pub num_mel_bins: usize,
    /// Width.
    pub d_model: usize,
    /// Layers.
    pub encoder_layers: usize,
    /// Heads.
    pub encoder_attention_heads: usize,
    /// MLP width.
    pub encoder_ffn_dim: usize,
    /// 1500 frames = 30 s.
    pub max_source_positions: usize,
}

impl From<&WhisperConfig> for EncoderConfig {
    /// The encoder part of a Whisper model's dimensions.
    fn from(c: &WhisperConfig) -> Self {
        Self {
            num_mel_bins: c.num_mel_bins,
            d_model: c.d_model,
            encoder_layers: c.encoder_layers,
            encoder_attention_heads: c.encoder_attention_heads,
            encoder_ffn_dim: c.encoder_ffn_dim,
            max_source_positions: c.max_source_positions,
        }
    }
}

/// Adapter dimensions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Consecutive encoder frames concatenated into one (5).
    pub stack: usize,
    /// Width between the two linear layers.
    pub hidden_size: usize,
    /// Activation between them (`gelu`).
    #[serde(default = "gelu")]
    pub activation: String,
}

fn gelu() -> String {
    "gelu".into()
}

/// Qwen2.5 language-model dimensions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LmConfig {
    /// Vocabulary.
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Context length.
    pub max_position_embeddings: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether `lm_head` is the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// M-RoPE sections of the rotary half (time, height, width), as in
    /// Qwen2.5-VL (`[16, 24, 24]` for 128-dim heads); absent means 1-D RoPE.
    #[serde(default)]
    pub mrope_section: Option<[usize; 3]>,
}

impl LmConfig {
    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The M-RoPE sections, or all frequencies on the time axis.
    pub fn sections(&self) -> [usize; 3] {
        self.mrope_section.unwrap_or([self.head_dim() / 2, 0, 0])
    }
}

/// Audio decoder dimensions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AudioDecoderConfig {
    /// Width.
    pub hidden_size: usize,
    /// Layers (6 in NEXUS-O).
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Codebooks (8).
    pub codebooks: usize,
    /// Codes per codebook; `codebook_size` is end-of-speech, `+ 1` the delay pad.
    pub codebook_size: usize,
    /// RoPE base.
    #[serde(default = "theta")]
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    #[serde(default = "eps")]
    pub rms_norm_eps: f64,
}

fn theta() -> f64 {
    10000.0
}

fn eps() -> f64 {
    1e-6
}

/// Special tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tokens {
    /// Placeholder replaced by one audio embedding each.
    pub audio: String,
    /// Before the placeholders.
    pub audio_start: String,
    /// After the placeholders.
    pub audio_end: String,
    /// ChatML turn start.
    pub im_start: String,
    /// ChatML turn end (stops generation).
    pub im_end: String,
    /// End of text, also stops generation.
    #[serde(default)]
    pub eos: Option<String>,
}

impl Tokens {
    /// The id of the end-of-text token, if the checkpoint names one.
    pub fn eos_id(&self, tok: &Tokenizer) -> Option<u32> {
        self.eos.as_deref().and_then(|e| tok.token_to_id(e))
    }
}

/// Prompt texts. `{language}` and `{target}` are replaced by language names.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prompts {
    /// System turn.
    pub system: String,
    /// Speech recognition.
    pub transcribe: String,
    /// Speech recognition in a known language.
    pub transcribe_language: String,
    /// Speech translation.
    pub translate: String,
    /// Spoken chat.
    pub chat: String,
}

impl Default for Prompts {
    fn default() -> Self {
        Self {
            system: "You are a helpful assistant.".into(),
            transcribe: "Transcribe the audio.".into(),
            transcribe_language: "Transcribe the audio. The speech is in {language}.".into(),
            translate: "Translate the audio into {target}.".into(),
            chat: "Answer the speaker.".into(),
        }
    }
}

impl NexusConfig {
    /// The prompt of `task` around `n_audio` placeholders, as text.
    pub fn prompt_text(&self, task: &super::NexusTask, n_audio: usize) -> String {
        let p = &self.prompts;
        let t = &self.tokens;
        let instruction = match task {
            super::NexusTask::Transcribe { language: None } => p.transcribe.clone(),
            super::NexusTask::Transcribe { language: Some(l) } => p
                .transcribe_language
                .replace("{language}", crate::qwen::language_name(l).unwrap_or(l)),
            super::NexusTask::Translate { target } => p.translate.replace(
                "{target}",
                crate::qwen::language_name(target).unwrap_or(target),
            ),
            super::NexusTask::Chat => p.chat.clone(),
        };
        let audio = format!(
            "{}{}{}",
            t.audio_start,
            t.audio.repeat(n_audio),
            t.audio_end
        );
        format!(
            "{s}system\n{sys}{e}\n{s}user\n{audio}{instruction}{e}\n{s}assistant\n",
            s = t.im_start,
            e = t.im_end,
            sys = p.system,
        )
    }

    /// Reads and checks `config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| ModelError::Load(format!("{}: {e}", path.display())))?;
        let cfg: Self = serde_json::from_slice(&bytes).map_err(|e| {
            ModelError::Load(format!("{}: not a NEXUS-O config: {e}", path.display()))
        })?;
        if cfg.model_type != "nexus-o" {
            return Err(ModelError::Load(format!(
                "{}: model_type is {:?}, not \"nexus-o\"",
                path.display(),
                cfg.model_type
            )));
        }
        if cfg.adapter.activation != "gelu" {
            return Err(ModelError::Load(format!(
                "{}: adapter activation {:?} is not supported (gelu)",
                path.display(),
                cfg.adapter.activation
            )));
        }
        let hd = cfg.lm.head_dim();
        if cfg.lm.sections().iter().sum::<usize>() != hd / 2 {
            return Err(ModelError::Load(format!(
                "{}: mrope_section {:?} does not sum to head_dim/2 = {}",
                path.display(),
                cfg.lm.sections(),
                hd / 2
            )));
        }
        Ok(cfg)
    }

    /// The encoder's dimensions in the shape the Whisper encoder loads.
    pub fn whisper_config(&self) -> WhisperConfig {
        let e = &self.audio_encoder;
        WhisperConfig {
            num_mel_bins: e.num_mel_bins,
            d_model: e.d_model,
            encoder_layers: e.encoder_layers,
            decoder_layers: 0,
            encoder_attention_heads: e.encoder_attention_heads,
            decoder_attention_heads: e.encoder_attention_heads,
            encoder_ffn_dim: e.encoder_ffn_dim,
            decoder_ffn_dim: 0,
            vocab_size: 0,
            max_source_positions: e.max_source_positions,
            max_target_positions: 0,
            suppress_tokens: Vec::new(),
            begin_suppress_tokens: Vec::new(),
            alignment_heads: Vec::new(),
            lang_ids: Vec::new(),
        }
    }
}
