//! Whisper speech recognition and speech translation (→ English).

pub mod align;
mod attend;
pub mod decode;
pub mod model;
pub mod tokenizer;
pub mod transcribe;

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

pub use decode::{DecodeOptions, DecodeResult, GreedySequence, Task, step_batch};
pub use model::Whisper;
/// The checkpoint's `config.json`: one type, written by the import.
pub use nexus_weights::whisper::WhisperConfig as Config;
pub use tokenizer::WhisperTokenizer;
pub use transcribe::{Segment, TranscribeOptions, Transcript, WindowOutcome};

use crate::error::{ModelError, Result};
use crate::mel::MelFrontend;
use crate::precision::Precision;

/// A loaded Whisper checkpoint with its tokenizer and frontend.
pub struct WhisperEngine {
    /// The network.
    pub model: Whisper,
    /// Its tokenizer.
    pub tokenizer: WhisperTokenizer,
    /// Its log-mel frontend.
    pub mel: MelFrontend,
    /// Where it runs.
    pub device: Device,
    /// Compute type.
    pub dtype: DType,
}

impl std::fmt::Debug for WhisperEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhisperEngine")
            .field("config", &self.model.config)
            .field("device", &self.device)
            .finish()
    }
}

impl WhisperEngine {
    /// Encoder features of the 30 s window starting at mel frame `seek` of a
    /// `(1, n_mels, frames)` log-mel tensor computed with 30 s of padding.
    pub fn encode_window(
        &self,
        mel: &candle_core::Tensor,
        seek: usize,
    ) -> Result<candle_core::Tensor> {
        use candle_core::IndexOp;
        let t0 = std::time::Instant::now();
        let window = mel
            .i((.., .., seek..seek + crate::mel::CHUNK_FRAMES))?
            .contiguous()?;
        let out = self.model.encoder.forward(&window.to_dtype(self.dtype)?)?;
        tracing::debug!(
            seek,
            encode_ms = t0.elapsed().as_millis() as u64,
            "encoded window"
        );
        Ok(out)
    }

    /// Language probabilities of the first 30 s of 16 kHz mono `samples`, most likely first.
    pub fn detect_language(&self, samples: &[f32]) -> Result<Vec<(String, f32)>> {
        let mel = self
            .mel
            .compute(samples, crate::mel::CHUNK_SAMPLES)?
            .to_tensor(&self.device)?;
        let audio = self.encode_window(&mel, 0)?;
        decode::detect_language(&self.model, &self.tokenizer, &audio)
    }

    /// Loads a folder with `config.json`, `model.safetensors` and `tokenizer.json`
    /// (what `nexus models import` writes, or a Hugging Face Whisper checkpoint)
    /// in f32.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_with(dir, device, Precision::F32)
    }

    /// [`load`](Self::load), with the linear layers in `precision`. Int8 is
    /// for CPUs and f16 for GPUs; each is refused on the other.
    pub fn load_with(dir: &Path, device: &Device, precision: Precision) -> Result<Self> {
        precision.check_device(device)?;
        let config = Self::read_config(dir)?;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(ModelError::Load(format!(
                "{} is missing; import the model first (`nexus models pull NAME`)",
                weights.display()
            )));
        }
        // SAFETY-free: the crate forbids unsafe, so the file is read rather than memory-mapped.
        let vb = VarBuilder::from_buffered_safetensors(
            std::fs::read(&weights)
                .map_err(|e| ModelError::Load(format!("{}: {e}", weights.display())))?,
            precision.dtype(),
            device,
        )
        .map_err(|e| ModelError::Load(format!("{}: {e}", weights.display())))?;
        Self::build(
            config,
            vb,
            &dir.join("tokenizer.json"),
            device,
            precision,
            &weights.display().to_string(),
        )
    }

    /// A checkpoint's `config.json` in `dir`.
    pub fn read_config(dir: &Path) -> Result<Config> {
        let cfg_path = dir.join("config.json");
        let cfg_bytes = std::fs::read(&cfg_path)
            .map_err(|e| ModelError::Load(format!("{}: {e}", cfg_path.display())))?;
        serde_json::from_slice(&cfg_bytes).map_err(|e| {
            ModelError::Load(format!("{}: not a Whisper config: {e}", cfg_path.display()))
        })
    }

    /// A model from weights already in memory (by their checkpoint names),
    /// converted to `precision`'s type on `device`: what `nexus gpu-check`
    /// builds from its bundle's dequantised weights.
    pub fn from_tensors(
        config: Config,
        tensors: std::collections::HashMap<String, candle_core::Tensor>,
        tokenizer: &Path,
        device: &Device,
        precision: Precision,
    ) -> Result<Self> {
        precision.check_device(device)?;
        let vb = VarBuilder::from_tensors(tensors, precision.dtype(), device);
        Self::build(config, vb, tokenizer, device, precision, "weights")
    }

    fn build(
        config: Config,
        vb: VarBuilder,
        tokenizer: &Path,
        device: &Device,
        precision: Precision,
        source: &str,
    ) -> Result<Self> {
        let dtype = precision.dtype();
        let mut model =
            Whisper::load(&config, vb).map_err(|e| ModelError::Load(format!("{source}: {e}")))?;
        if precision == Precision::Int8 {
            model
                .quantize()
                .map_err(|e| ModelError::Load(format!("{source}: quantising: {e}")))?;
        }
        let tokenizer = WhisperTokenizer::load(tokenizer, config.is_multilingual())?;
        let mel = MelFrontend::new(config.num_mel_bins)?;
        Ok(Self {
            model,
            tokenizer,
            mel,
            device: device.clone(),
            dtype,
        })
    }
}
