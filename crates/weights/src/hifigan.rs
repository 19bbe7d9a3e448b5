//! HiFi-GAN generator checkpoints (jik876's format) → safetensors.
//!
//! The universal V1 generator ships as a legacy torch pickle
//! (`{"generator": state_dict}`) whose convolutions carry weight norm as
//! `weight_g` / `weight_v`. Conversion folds each pair into the plain
//! `weight = g · v / ‖v‖` (norm over every axis but the first, as
//! `torch.nn.utils.weight_norm(dim=0)` defines it) and writes
//! `model.safetensors` and the generator's `config.json`. Checkpoints saved
//! with the newer parametrisation (`parametrizations.weight.original0/1`)
//! fold the same way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use safetensors::tensor::TensorView;

use crate::error::{Result, WeightsError};
use crate::torch_legacy::{self, LegacyTensor};

/// What a conversion wrote.
#[derive(Debug, Clone)]
pub struct HifiganReport {
    /// Tensors written.
    pub tensors: usize,
    /// Weight-norm pairs folded into plain weights.
    pub folded: usize,
    /// Parameters written.
    pub parameters: usize,
    /// The output folder.
    pub out_dir: PathBuf,
}

/// `g · v / ‖v‖` per slice of the first axis.
pub fn fold_weight_norm(
    g: &LegacyTensor,
    v: &LegacyTensor,
) -> std::result::Result<LegacyTensor, String> {
    let rows = *v.shape.first().ok_or("weight_v has no dimensions")?;
    if g.data.len() != rows {
        return Err(format!(
            "weight_g has {} elements for {} rows of weight_v",
            g.data.len(),
            rows
        ));
    }
    let per = v.data.len() / rows.max(1);
    let mut data = Vec::with_capacity(v.data.len());
    for (r, row) in v.data.chunks_exact(per).enumerate() {
        let norm = row
            .iter()
            .map(|x| f64::from(*x) * f64::from(*x))
            .sum::<f64>()
            .sqrt();
        let scale = f64::from(g.data[r]) / norm.max(1e-12);
        data.extend(row.iter().map(|x| (f64::from(*x) * scale) as f32));
    }
    Ok(LegacyTensor {
        shape: v.shape.clone(),
        data,
    })
}

/// Folds every weight-norm pair of a state dict; other tensors pass through.
pub fn fold_all(
    tensors: Vec<(String, LegacyTensor)>,
) -> std::result::Result<(BTreeMap<String, LegacyTensor>, usize), String> {
    let mut all: BTreeMap<String, LegacyTensor> = tensors.into_iter().collect();
    let pairs: Vec<(String, String, String)> = all
        .keys()
        .filter_map(|k| {
            if let Some(base) = k.strip_suffix(".weight_g") {
                Some((base.to_string(), k.clone(), format!("{base}.weight_v")))
            } else {
                k.strip_suffix(".parametrizations.weight.original0")
                    .map(|base| {
                        (
                            base.to_string(),
                            k.clone(),
                            format!("{base}.parametrizations.weight.original1"),
                        )
                    })
            }
        })
        .collect();
    let folded = pairs.len();
    for (base, gk, vk) in pairs {
        let g = all.remove(&gk).ok_or("unreachable")?;
        let v = all
            .remove(&vk)
            .ok_or_else(|| format!("{gk} has no matching {vk}"))?;
        let w = fold_weight_norm(&g, &v).map_err(|e| format!("{base}: {e}"))?;
        all.insert(format!("{base}.weight"), w);
    }
    Ok((all, folded))
}

/// Writes f32 tensors as safetensors.
pub fn write_safetensors(tensors: &BTreeMap<String, LegacyTensor>, path: &Path) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                t.shape.clone(),
            )
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, b, s)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| WeightsError::format(path, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let tmp = path.with_extension("partial");
    safetensors::tensor::serialize_to_file(views, None, &tmp)
        .map_err(|e| WeightsError::format(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(WeightsError::io(path))
}

/// Converts `src/generator.pth.tar` + `src/config.json` into `out`.
pub fn import(src: &Path, out: &Path) -> Result<HifiganReport> {
    let ckpt = src.join("generator.pth.tar");
    let tensors = torch_legacy::read(&ckpt)?;
    let prefixed = tensors.iter().any(|(n, _)| n.starts_with("generator."));
    let tensors: Vec<_> = tensors
        .into_iter()
        .filter_map(|(n, t)| {
            if prefixed {
                n.strip_prefix("generator.").map(|s| (s.to_string(), t))
            } else {
                Some((n, t))
            }
        })
        .collect();
    let (tensors, folded) = fold_all(tensors).map_err(|m| WeightsError::format(&ckpt, m))?;
    for needed in ["conv_pre.weight", "conv_post.weight", "ups.0.weight"] {
        if !tensors.contains_key(needed) {
            return Err(WeightsError::format(
                &ckpt,
                format!("not a HiFi-GAN generator: no {needed}"),
            ));
        }
    }
    std::fs::create_dir_all(out).map_err(WeightsError::io(out))?;
    write_safetensors(&tensors, &out.join("model.safetensors"))?;
    let cfg_src = src.join("config.json");
    let cfg = std::fs::read(&cfg_src).map_err(WeightsError::io(&cfg_src))?;
    serde_json::from_slice::<serde_json::Value>(&cfg)
        .map_err(|e| WeightsError::format(&cfg_src, e.to_string()))?;
    if cfg_src != out.join("config.json") {
        std::fs::write(out.join("config.json"), &cfg).map_err(WeightsError::io(out))?;
    }
    Ok(HifiganReport {
        tensors: tensors.len(),
        folded,
        parameters: tensors.values().map(|t| t.data.len()).sum(),
        out_dir: out.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folding_matches_the_definition() {
        // Two output rows of a (2, 1, 2) kernel.
        let v = LegacyTensor {
            shape: vec![2, 1, 2],
            data: vec![3.0, 4.0, 0.0, -2.0],
        };
        let g = LegacyTensor {
            shape: vec![2, 1, 1],
            data: vec![10.0, 0.5],
        };
        let w = fold_weight_norm(&g, &v).unwrap();
        assert_eq!(w.data, vec![6.0, 8.0, 0.0, -0.5]);
        let bad = LegacyTensor {
            shape: vec![3, 1, 1],
            data: vec![1.0; 3],
        };
        assert!(
            fold_weight_norm(&bad, &v)
                .unwrap_err()
                .contains("3 elements")
        );
    }

    #[test]
    fn an_unpaired_weight_g_is_an_error_naming_it() {
        let g = LegacyTensor {
            shape: vec![1, 1, 1],
            data: vec![1.0],
        };
        let e = fold_all(vec![("conv.weight_g".into(), g)]).unwrap_err();
        assert!(e.contains("conv.weight_v"), "{e}");
    }
}
