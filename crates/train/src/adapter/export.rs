//! A training run's adapter as a servable NEXUS-O checkpoint folder (the
//! layout `NexusModel::load` and the fleet read): the frozen Whisper
//! encoder's tensors, the trained adapter, the frozen Qwen2 language model
//! dequantised to f32, its tokenizer, and the run's `config.json` (no audio
//! decoder: the checkpoint writes text only).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use nexus_models::nexus::NexusConfig;

use crate::error::{Result, TrainError, io, read_json, write_json};

/// What a run was trained on, written beside its checkpoints (`run.json`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunSources {
    /// The converted Whisper folder whose encoder is frozen.
    pub encoder_dir: PathBuf,
    /// The Qwen2 GGUF file of the frozen language model.
    pub lm_gguf: PathBuf,
}

impl RunSources {
    /// Writes `dir/run.json`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_json(&dir.join("run.json"), self)
    }

    /// Reads `dir/run.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        read_json(&dir.join("run.json"))
    }
}

/// Writes the checkpoint folder `out` from the sources, the run's NEXUS-O
/// configuration and the adapter of checkpoint folder `step`.
pub fn export(sources: &RunSources, config: &NexusConfig, step: &Path, out: &Path) -> Result<()> {
    let adapter = candle_core::safetensors::load(step.join("adapter.safetensors"), &Device::Cpu)?;
    export_adapter(sources, config, adapter, out)
}

/// Writes the checkpoint folder `out` from the sources, a NEXUS-O
/// configuration and adapter weights (`linear1.weight`, …; kept in f32).
pub fn export_adapter(
    sources: &RunSources,
    config: &NexusConfig,
    adapter: HashMap<String, Tensor>,
    out: &Path,
) -> Result<()> {
    let dev = Device::Cpu;
    let mut all: HashMap<String, Tensor> = HashMap::new();
    let enc_file = sources.encoder_dir.join("model.safetensors");
    for (name, t) in candle_core::safetensors::load(&enc_file, &dev)? {
        if let Some(rest) = name.strip_prefix("model.encoder.") {
            all.insert(format!("audio_encoder.{rest}"), t.to_dtype(DType::F32)?);
        }
    }
    if all.is_empty() {
        return Err(TrainError::Mismatch(format!(
            "{}: no model.encoder.* tensors (not a converted Whisper folder)",
            enc_file.display()
        )));
    }
    for (name, t) in adapter {
        all.insert(format!("adapter.{name}"), t.to_dtype(DType::F32)?);
    }
    let lm = nexus_models::nexus::from_gguf::qwen2_lm(&sources.lm_gguf, &dev)?;
    for (name, t) in lm.tensors {
        all.insert(format!("lm.{name}"), t);
    }
    std::fs::create_dir_all(out).map_err(io(out))?;
    let tmp = out.join("model.safetensors.tmp");
    candle_core::safetensors::save(&all, &tmp)?;
    std::fs::rename(&tmp, out.join("model.safetensors")).map_err(io(out))?;
    lm.tokenizer
        .save(out.join("tokenizer.json"), false)
        .map_err(|e| TrainError::Config(format!("writing the tokenizer: {e}")))?;
    write_json(&out.join("config.json"), config)
}
