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
    /// with its weights as stored.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_with(dir, device, Precision::F32)
    }

    /// [`load`](Self::load), with the linear layers in `precision`. Int8 is
    /// for CPUs; on a GPU it is refused.
    pub fn load_with(dir: &Path, device: &Device, precision: Precision) -> Result<Self> {
        if precision == Precision::Int8 && !device.is_cpu() {
            return Err(ModelError::Load(
                "precision int8 runs on CPU only; use f32 (f16 on GPUs)".into(),
            ));
        }
        let cfg_path = dir.join("config.json");
        let cfg_bytes = std::fs::read(&cfg_path)
            .map_err(|e| ModelError::Load(format!("{}: {e}", cfg_path.display())))?;
        let config: Config = serde_json::from_slice(&cfg_bytes).map_err(|e| {
            ModelError::Load(format!("{}: not a Whisper config: {e}", cfg_path.display()))
        })?;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(ModelError::Load(format!(
                "{} is missing; import the model first (`nexus models pull NAME`)",
                weights.display()
            )));
        }
        // f32 on CPU: its matmuls are the fastest there; f16 halves memory on GPUs.
        let dtype = if device.is_cpu() {
            DType::F32
        } else {
            DType::F16
        };
        // SAFETY-free: the crate forbids unsafe, so the file is read rather than memory-mapped.
        let vb = VarBuilder::from_buffered_safetensors(
            std::fs::read(&weights)
                .map_err(|e| ModelError::Load(format!("{}: {e}", weights.display())))?,
            dtype,
            device,
        )
        .map_err(|e| ModelError::Load(format!("{}: {e}", weights.display())))?;
        let mut model = Whisper::load(&config, vb)
            .map_err(|e| ModelError::Load(format!("{}: {e}", weights.display())))?;
        if precision == Precision::Int8 {
            model
                .quantize()
                .map_err(|e| ModelError::Load(format!("{}: quantising: {e}", weights.display())))?;
        }
        let tokenizer =
            WhisperTokenizer::load(&dir.join("tokenizer.json"), config.is_multilingual())?;
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
