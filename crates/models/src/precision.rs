//! The number format linear layers compute in.

use crate::{ModelError, Result};

/// How a model's linear layers (and Whisper's vocabulary projection) hold
/// their weights. Activations, layer norms, convolutions and attention stay
/// in the model's float type either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Weights as stored, in f32 on CPU (f16 on GPUs).
    F32,
    /// Weights quantised to 8-bit integers and multiplied with 8-bit-quantised
    /// activations: for a decoder step's few rows, in blocks of 32 with one
    /// scale each (ggml's Q8_0, a quarter of the memory traffic of f32); for
    /// products of a row per audio frame (the encoder, the cross-attention
    /// keys and values), with one scale per output and per row and integer
    /// sums (`crate::i8mm`) where the CPU has AVX-512 VNNI, f32 elsewhere.
    /// CPU only (see `Whisper::quantize`).
    Int8,
}

impl Precision {
    /// What a model runs in on `device` unless told otherwise: int8 on CPUs
    /// (the same words on the LibriVox clips as f32, BENCHMARKS.md), f32 on
    /// GPUs, where int8 is not offered.
    pub fn default_for(device: &candle_core::Device) -> Self {
        if device.is_cpu() {
            Self::Int8
        } else {
            Self::F32
        }
    }

    /// Its name on command lines and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Int8 => "int8",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Precision {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "int8" | "q8_0" => Ok(Self::Int8),
            other => Err(ModelError::Input(format!(
                "precision {other:?} is not one of f32, int8"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Precision;

    #[test]
    fn names_round_trip_and_others_are_refused() {
        for p in [Precision::F32, Precision::Int8] {
            assert_eq!(p.as_str().parse::<Precision>().unwrap(), p);
        }
        let e = "fp16".parse::<Precision>().unwrap_err().to_string();
        assert!(e.contains("not one of f32, int8"), "{e}");
    }
}
