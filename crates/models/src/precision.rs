//! The number format linear layers compute in.

use crate::{ModelError, Result};

/// How a model's linear layers (and Whisper's vocabulary projection) hold
/// their weights. Activations, layer norms, convolutions and attention stay
/// in the model's float type either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Weights and activations in f32, on any device.
    F32,
    /// Weights and activations in f16: half the memory of f32 and the GPU's
    /// tensor cores. GPU only (candle's CPU f16 products are slow).
    F16,
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
    /// (the same words on the LibriVox clips as f32, BENCHMARKS.md), f16 on
    /// GPUs, where int8 is not offered.
    pub fn default_for(device: &candle_core::Device) -> Self {
        if device.is_cpu() {
            Self::Int8
        } else {
            Self::F16
        }
    }

    /// The precision asked for (`choice`), else the device's default, once
    /// checked against `device`: what a process starting its models uses.
    pub fn for_device(choice: Option<Self>, device: &candle_core::Device) -> Result<Self> {
        let p = choice.unwrap_or_else(|| Self::default_for(device));
        p.check_device(device)?;
        Ok(p)
    }

    /// Whether `device` runs this precision; the error names the ones it does.
    pub fn check_device(self, device: &candle_core::Device) -> Result<()> {
        match (self, device.is_cpu()) {
            (Self::Int8, false) => Err(ModelError::Load(
                "precision int8 runs on CPU only; on a GPU use f16 or f32".into(),
            )),
            (Self::F16, true) => Err(ModelError::Load(
                "precision f16 runs on GPUs only; on the CPU use int8 or f32".into(),
            )),
            _ => Ok(()),
        }
    }

    /// The float type activations (and, but for int8, weights) are held in.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Self::F32 | Self::Int8 => candle_core::DType::F32,
            Self::F16 => candle_core::DType::F16,
        }
    }

    /// Its name on command lines and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
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
            "f16" | "float16" => Ok(Self::F16),
            "int8" | "q8_0" => Ok(Self::Int8),
            other => Err(ModelError::Input(format!(
                "precision {other:?} is not one of f32, f16, int8"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Precision;

    #[test]
    fn names_round_trip_and_others_are_refused() {
        for p in [Precision::F32, Precision::F16, Precision::Int8] {
            assert_eq!(p.as_str().parse::<Precision>().unwrap(), p);
        }
        let e = "bf16".parse::<Precision>().unwrap_err().to_string();
        assert!(e.contains("not one of f32, f16, int8"), "{e}");
    }

    #[test]
    fn each_device_refuses_what_it_cannot_run() {
        let cpu = candle_core::Device::Cpu;
        assert_eq!(Precision::default_for(&cpu), Precision::Int8);
        Precision::Int8.check_device(&cpu).unwrap();
        Precision::F32.check_device(&cpu).unwrap();
        let e = Precision::F16.check_device(&cpu).unwrap_err().to_string();
        assert!(e.contains("f16 runs on GPUs only"), "{e}");
        assert_eq!(Precision::for_device(None, &cpu).unwrap(), Precision::Int8);
        assert_eq!(
            Precision::for_device(Some(Precision::F32), &cpu).unwrap(),
            Precision::F32
        );
        assert!(Precision::for_device(Some(Precision::F16), &cpu).is_err());
    }
}
