//! Whisper configuration as written by `nexus models import` (Hugging Face names).

use serde::Deserialize;

/// Dimensions and decoding lists of a Whisper checkpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
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
}

impl Config {
    /// English-only checkpoints have one token fewer and no language tokens.
    pub fn is_multilingual(&self) -> bool {
        self.vocab_size >= 51865
    }
}
