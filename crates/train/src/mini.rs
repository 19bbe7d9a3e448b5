//! NEXUS-mini: the adapter this project trained (`nexus-mini/` beside this
//! crate's sources, in f16), assembled with the pinned Whisper base encoder
//! and the pinned Qwen2.5-0.5B-Instruct GGUF it was trained between into a
//! servable NEXUS-O checkpoint folder (`nexus models pull nexus-mini`).
//! `nexus-mini/TRAINING.md` says how it was made and how to make it again.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use nexus_models::nexus::NexusConfig;
use sha2::Digest;

use crate::adapter::export::{RunSources, export_adapter};
use crate::error::{Result, TrainError, read_json, write_json};

/// The model's name.
pub const NAME: &str = "nexus-mini";
/// The frozen encoder's registry name.
pub const ENCODER: &str = "base";
/// The frozen language model's registry name.
pub const LM: &str = "qwen2.5-0.5b-instruct";

const ADAPTER: &[u8] = include_bytes!("../nexus-mini/adapter.safetensors");
const CONFIG: &str = include_str!("../nexus-mini/nexus-config.json");

/// SHA-256 of the committed adapter file.
pub fn adapter_sha256() -> String {
    hex::encode(sha2::Sha256::digest(ADAPTER))
}

/// The trained adapter's weights (`linear1.weight`, …) in f32.
pub fn adapter() -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load_buffer(ADAPTER, &Device::Cpu)?
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
        .collect()
}

/// The NEXUS-O configuration it was trained for.
pub fn config() -> Result<NexusConfig> {
    serde_json::from_str(CONFIG).map_err(|source| TrainError::Json {
        path: "nexus-mini/nexus-config.json".into(),
        source,
    })
}

/// What `out/nexus-mini.json` records of an assembled folder.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Assembled {
    /// SHA-256 of the adapter it holds.
    pub adapter_sha256: String,
    /// The encoder and LM it was assembled from.
    pub sources: RunSources,
}

/// Whether `out` holds this build's NEXUS-mini, complete.
pub fn is_assembled(out: &Path) -> bool {
    out.join("model.safetensors").is_file()
        && read_json::<Assembled>(&out.join("nexus-mini.json"))
            .is_ok_and(|a| a.adapter_sha256 == adapter_sha256())
}

/// Writes NEXUS-mini into `out` from the converted Whisper base folder and
/// the Qwen2.5 GGUF file.
pub fn assemble(encoder_dir: &Path, gguf: &Path, out: &Path) -> Result<()> {
    let sources = RunSources {
        encoder_dir: encoder_dir.to_owned(),
        lm_gguf: gguf.to_owned(),
    };
    let _ = std::fs::remove_file(out.join("nexus-mini.json"));
    export_adapter(&sources, &config()?, adapter()?, out)?;
    write_json(
        &out.join("nexus-mini.json"),
        &Assembled {
            adapter_sha256: adapter_sha256(),
            sources,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_adapter_fits_its_configuration() {
        let c = config().unwrap();
        let w = adapter().unwrap();
        let d_in = c.audio_encoder.d_model * c.adapter.stack;
        assert_eq!(w["linear1.weight"].dims(), [c.adapter.hidden_size, d_in]);
        assert_eq!(
            w["linear2.weight"].dims(),
            [c.lm.hidden_size, c.adapter.hidden_size]
        );
        assert!(c.audio_decoder.is_none(), "NEXUS-mini writes text only");
        for t in w.values() {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| x.is_finite()));
        }
    }
}
