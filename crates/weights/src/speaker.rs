//! Resemblyzer's GE2E voice encoder: its `pretrained.pt` (a legacy torch
//! pickle of `{"step", "model_state", "optimizer_state"}`) becomes
//! `model.safetensors` holding the LSTM and linear layer under the names
//! PyTorch gives them (`lstm.weight_ih_l0`, `linear.weight`, ...). The
//! training-only similarity scale and bias are left behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Result, WeightsError};
use crate::hifigan::write_safetensors;
use crate::torch_legacy;

/// What [`import`] wrote.
#[derive(Debug, Clone)]
pub struct SpeakerReport {
    /// Tensors kept.
    pub tensors: usize,
    /// Parameters kept.
    pub parameters: usize,
    /// Folder written.
    pub out_dir: PathBuf,
}

/// Tensors the encoder needs, with their shapes.
pub fn expected() -> Vec<(String, Vec<usize>)> {
    let mut v = Vec::new();
    for l in 0..3 {
        let input = if l == 0 { 40 } else { 256 };
        v.push((format!("lstm.weight_ih_l{l}"), vec![1024, input]));
        v.push((format!("lstm.weight_hh_l{l}"), vec![1024, 256]));
        v.push((format!("lstm.bias_ih_l{l}"), vec![1024]));
        v.push((format!("lstm.bias_hh_l{l}"), vec![1024]));
    }
    v.push(("linear.weight".into(), vec![256, 256]));
    v.push(("linear.bias".into(), vec![256]));
    v
}

/// Converts `src/pretrained.pt` into `out/model.safetensors`.
pub fn import(src: &Path, out: &Path) -> Result<SpeakerReport> {
    let ckpt = src.join("pretrained.pt");
    let mut all: BTreeMap<String, _> = torch_legacy::read(&ckpt)?
        .into_iter()
        .filter_map(|(n, t)| n.strip_prefix("model_state.").map(|s| (s.to_string(), t)))
        .collect();
    let mut kept = BTreeMap::new();
    for (name, shape) in expected() {
        let t = all.remove(&name).ok_or_else(|| {
            WeightsError::format(
                &ckpt,
                format!("not a GE2E voice encoder: no model_state.{name}"),
            )
        })?;
        if t.shape != shape {
            return Err(WeightsError::format(
                &ckpt,
                format!("{name} has shape {:?}, expected {shape:?}", t.shape),
            ));
        }
        kept.insert(name, t);
    }
    std::fs::create_dir_all(out).map_err(WeightsError::io(out))?;
    write_safetensors(&kept, &out.join("model.safetensors"))?;
    Ok(SpeakerReport {
        tensors: kept.len(),
        parameters: kept.values().map(|t| t.data.len()).sum(),
        out_dir: out.to_owned(),
    })
}
