//! Vocoders: codec codes or mel spectrograms → waveform.
//!
//! [`firefly`] decodes the NEXUS-O audio decoder's codes (Fish-Speech 1.4's
//! FireFly-GAN codec), in chunks; [`hifigan`] turns mel spectrograms into
//! 22.05 kHz speech (HiFi-GAN V1).

pub mod firefly;
pub mod hifigan;

pub use firefly::{Firefly, FireflyStream};
pub use hifigan::HifiGan;
