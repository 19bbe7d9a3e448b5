//! The fleet's models, in candle.
//!
//! This is the only crate that touches tensors. It has no async runtime, RPC or
//! Redis dependency: services reach it through small synchronous interfaces
//! and run it on their own threads.
//!
//! Today it owns the Whisper log-mel frontend ([`mel`]).

pub mod error;
pub mod mel;

pub use error::{ModelError, Result};
