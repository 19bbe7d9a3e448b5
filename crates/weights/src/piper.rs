//! Piper voices (VITS in ONNX) → safetensors for the candle port.
//!
//! The export names most parameters by their module path (`enc_p.proj.weight`);
//! a few lose their names to the exporter: weights folded from weight norm
//! (`onnx::Conv_8168`) and the phoneme embedding (named after the speaker
//! input). Those are named here after the node that consumes them:
//! `/flow/flows.6/enc/in_layers.0/Conv` → `flow.flows.6.enc.in_layers.0.weight`.
//! Only the network's float parameters are kept (graph constants are not).
//! The voice's `model.onnx.json` (phoneme map, rate, inference scales) is
//! copied beside them as `voice.json`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::error::{Result, WeightsError};
use crate::hifigan::write_safetensors;
use crate::onnx;
use crate::torch_legacy::LegacyTensor;

/// Module prefixes of a VITS voice.
const PARTS: [&str; 4] = ["enc_p.", "dp.", "flow.", "dec."];

/// What a conversion wrote.
#[derive(Debug, Clone)]
pub struct PiperReport {
    /// Tensors written.
    pub tensors: usize,
    /// Of them, named after their consumer.
    pub renamed: usize,
    /// Parameters.
    pub parameters: usize,
    /// The output folder.
    pub out_dir: PathBuf,
}

/// `/flow/flows.6/enc/in_layers.0/Conv` → `flow.flows.6.enc.in_layers.0`.
fn module_path(node: &str) -> Option<String> {
    let trimmed = node.strip_prefix('/')?;
    let (path, _op) = trimmed.rsplit_once('/')?;
    Some(path.replace('/', "."))
}

/// Converts `src/model.onnx` (+ `model.onnx.json`) into `out`.
pub fn import(src: &Path, out: &Path) -> Result<PiperReport> {
    let file = src.join("model.onnx");
    let g = onnx::read(&file)?;
    let mut names: HashMap<String, String> = HashMap::new();
    // The duration predictor's first flow keeps exp(-logs), folded by the exporter.
    names.insert(
        "/dp/flows.0/Exp_output_0".into(),
        "dp.flows.0.exp_neg_logs".into(),
    );
    for n in &g.nodes {
        let param = match n.op_type.as_str() {
            "Conv" | "ConvTranspose" => n.inputs.get(1),
            "Gather" => n.inputs.first(),
            _ => None,
        };
        let (Some(param), Some(path)) = (param, module_path(&n.name)) else {
            continue;
        };
        if !PARTS.iter().any(|p| param.starts_with(p)) {
            names.insert(param.clone(), format!("{path}.weight"));
        }
    }
    // Each convolution's geometry, which the weights alone do not tell.
    let mut convs = serde_json::Map::new();
    for n in &g.nodes {
        if !matches!(n.op_type.as_str(), "Conv" | "ConvTranspose") {
            continue;
        }
        let Some(w) = n.inputs.get(1) else { continue };
        let name = names.get(w).cloned().unwrap_or_else(|| w.clone());
        let attr = |k: &str, d: i64| {
            n.attrs
                .iter()
                .find(|(a, _)| a == k)
                .and_then(|(_, v)| v.first().copied())
                .unwrap_or(d)
        };
        convs.insert(
            name,
            serde_json::json!({
                "dilation": attr("dilations", 1),
                "stride": attr("strides", 1),
                "pad": attr("pads", 0),
                "groups": attr("group", 1),
            }),
        );
    }
    let mut tensors = BTreeMap::new();
    let mut renamed = 0;
    for t in g.initializers {
        if t.data_type != 1 {
            continue;
        }
        let name = match names.get(&t.name) {
            Some(n) => {
                renamed += 1;
                n.clone()
            }
            None => t.name.clone(),
        };
        if !PARTS.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        if tensors
            .insert(
                name.clone(),
                LegacyTensor {
                    shape: t.dims,
                    data: t.data,
                },
            )
            .is_some()
        {
            return Err(WeightsError::format(
                &file,
                format!("two parameters would be named {name}"),
            ));
        }
    }
    for needed in [
        "enc_p.emb.weight",
        "enc_p.proj.weight",
        "dec.conv_pre.weight",
        "flow.flows.0.enc.in_layers.0.weight",
    ] {
        if !tensors.contains_key(needed) {
            return Err(WeightsError::format(
                &file,
                format!("not a Piper VITS voice: no {needed}"),
            ));
        }
    }
    std::fs::create_dir_all(out).map_err(WeightsError::io(out))?;
    write_safetensors(&tensors, &out.join("model.safetensors"))?;
    let voice = src.join("model.onnx.json");
    let json = std::fs::read(&voice).map_err(WeightsError::io(&voice))?;
    serde_json::from_slice::<serde_json::Value>(&json)
        .map_err(|e| WeightsError::format(&voice, e.to_string()))?;
    std::fs::write(out.join("voice.json"), json).map_err(WeightsError::io(out))?;
    let arch = serde_json::json!({ "convs": convs });
    std::fs::write(
        out.join("arch.json"),
        serde_json::to_vec_pretty(&arch).unwrap_or_default(),
    )
    .map_err(WeightsError::io(out))?;
    Ok(PiperReport {
        tensors: tensors.len(),
        renamed,
        parameters: tensors.values().map(|t| t.data.len()).sum(),
        out_dir: out.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_paths_come_from_node_names() {
        assert_eq!(
            module_path("/flow/flows.6/enc/in_layers.0/Conv").as_deref(),
            Some("flow.flows.6.enc.in_layers.0")
        );
        assert_eq!(
            module_path("/enc_p/emb/Gather").as_deref(),
            Some("enc_p.emb")
        );
        assert_eq!(module_path("Conv_12"), None);
    }
}
