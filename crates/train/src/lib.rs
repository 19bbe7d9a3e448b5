//! How NEXUS-mini is made, after the NEXUS-O paper's recipe at small scale:
//! speech synthesised from public-domain text by every voice at hand,
//! augmented and filtered by a round-trip ASR check ([`synth`]); then the
//! adapter's alignment between a frozen Whisper encoder and a frozen Qwen2.5
//! language model ([`adapter`]).

pub mod adapter;
pub mod error;
pub mod mini;
pub mod rng;
pub mod synth;

pub use error::{Result, TrainError};
