//! The fleet's models, in candle.
//!
//! This is the only crate that touches tensors. It has no async runtime, RPC or
//! Redis dependency: services reach it through small synchronous interfaces
//! and run it on their own threads.
//!
//! It owns the Whisper log-mel frontend ([`mel`]) and Whisper recognition and
//! translation ([`whisper`]), text translation with Qwen2.5 ([`qwen`]), Silero voice activity detection
//! ([`vad`]) and speakers (who spoke when, [`speaker`]).

pub mod device;
pub mod error;
pub mod i8mm;
pub mod mel;
pub mod nexus;
pub mod ops;
pub mod precision;
pub mod q8;
pub mod qwen;
pub mod speaker;
pub mod threads;
pub mod tts;
pub mod vad;
pub mod vocoder;
pub mod whisper;

pub use device::parse_device;
pub use error::{ModelError, Result};
pub use precision::Precision;
