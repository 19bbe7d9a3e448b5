//! The GE2E speaker encoder (Wan et al., 2018) as Resemblyzer trained it:
//! a 3-layer LSTM over 40-bin mel frames, its last hidden state through a
//! linear layer and ReLU, L2-normalised to a 256-d voice embedding. Each
//! embedding covers one 1.6 s partial (160 frames).
//!
//! The LSTM's input projection runs for every frame of every partial in one
//! matrix product; only the recurrent product runs step by step, for all
//! partials of a batch at once.

use std::path::Path;

use candle_core::{D, DType, Device, Tensor};

use super::mel::{HOP, N_MELS, SpeakerMel};
use crate::error::{ModelError, Result};

/// Frames in one partial (1.6 s).
pub const PARTIAL_FRAMES: usize = 160;
/// Samples in one partial.
pub const PARTIAL_SAMPLES: usize = PARTIAL_FRAMES * HOP;
/// Embedding size.
pub const EMBED_DIM: usize = 256;
const HIDDEN: usize = 256;
const LAYERS: usize = 3;
/// Partials stepped together.
const BATCH: usize = 64;

struct Layer {
    /// `(in, 4H)`: the input weights, transposed once at load.
    w_ih: Tensor,
    /// `(H, 4H)`.
    w_hh: Tensor,
    /// `b_ih + b_hh`, `(4H)`.
    bias: Tensor,
}

/// The loaded encoder.
pub struct SpeakerEncoder {
    layers: Vec<Layer>,
    /// `(H, E)`, transposed.
    linear_w: Tensor,
    linear_b: Tensor,
    mel: SpeakerMel,
    device: Device,
}

impl std::fmt::Debug for SpeakerEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpeakerEncoder")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// One utterance's embedding the reference's way (`embed_utterance`).
#[derive(Debug, Clone)]
pub struct Utterance {
    /// The normalised mean of the partials.
    pub embed: Vec<f32>,
    /// Each partial's embedding.
    pub partials: Vec<Vec<f32>>,
    /// First frame of each partial.
    pub partial_starts: Vec<usize>,
}

impl SpeakerEncoder {
    /// Loads `dir/model.safetensors` (written by `nexus models pull ge2e`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let path = dir.join("model.safetensors");
        let tensors = candle_core::safetensors::load(&path, device)
            .map_err(|e| ModelError::Load(format!("{}: {e}", path.display())))?;
        let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = tensors
                .get(name)
                .ok_or_else(|| ModelError::Load(format!("{}: no tensor {name}", path.display())))?;
            if t.dims() != shape {
                return Err(ModelError::Load(format!(
                    "{}: {name} has shape {:?}, expected {shape:?}",
                    path.display(),
                    t.dims()
                )));
            }
            Ok(t.to_dtype(DType::F32)?)
        };
        let mut layers = Vec::with_capacity(LAYERS);
        for l in 0..LAYERS {
            let input = if l == 0 { N_MELS } else { HIDDEN };
            let w_ih = get(&format!("lstm.weight_ih_l{l}"), &[4 * HIDDEN, input])?;
            let w_hh = get(&format!("lstm.weight_hh_l{l}"), &[4 * HIDDEN, HIDDEN])?;
            let b_ih = get(&format!("lstm.bias_ih_l{l}"), &[4 * HIDDEN])?;
            let b_hh = get(&format!("lstm.bias_hh_l{l}"), &[4 * HIDDEN])?;
            layers.push(Layer {
                w_ih: w_ih.t()?.contiguous()?,
                w_hh: w_hh.t()?.contiguous()?,
                bias: (b_ih + b_hh)?,
            });
        }
        let linear_w = get("linear.weight", &[EMBED_DIM, HIDDEN])?
            .t()?
            .contiguous()?;
        let linear_b = get("linear.bias", &[EMBED_DIM])?;
        Ok(Self {
            layers,
            linear_w,
            linear_b,
            mel: SpeakerMel::new(),
            device: device.clone(),
        })
    }

    /// The mel frontend this encoder reads.
    pub fn mel(&self) -> &SpeakerMel {
        &self.mel
    }

    /// Embeds partials given as mel frames, `PARTIAL_FRAMES * N_MELS` values
    /// each (frame-major); one L2-normalised vector per partial.
    pub fn embed_partials(&self, mels: &[f32]) -> Result<Vec<Vec<f32>>> {
        let per = PARTIAL_FRAMES * N_MELS;
        if !mels.len().is_multiple_of(per) {
            return Err(ModelError::Input(format!(
                "{} mel values are not whole partials of {per}",
                mels.len()
            )));
        }
        let mut out = Vec::with_capacity(mels.len() / per);
        for chunk in mels.chunks(per * BATCH) {
            out.extend(self.forward(chunk, chunk.len() / per)?);
        }
        Ok(out)
    }

    fn forward(&self, mels: &[f32], batch: usize) -> Result<Vec<Vec<f32>>> {
        let h4 = 4 * HIDDEN;
        // Time-major (T, B, in) so each step's rows are contiguous.
        let mut x = Tensor::from_slice(mels, (batch, PARTIAL_FRAMES, N_MELS), &self.device)?
            .transpose(0, 1)?
            .contiguous()?;
        let mut h = Tensor::zeros((batch, HIDDEN), DType::F32, &self.device)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let input = x.dim(2)?;
            let xp = x
                .reshape((PARTIAL_FRAMES * batch, input))?
                .matmul(&layer.w_ih)?
                .broadcast_add(&layer.bias)?
                .reshape((PARTIAL_FRAMES, batch, h4))?;
            h = Tensor::zeros((batch, HIDDEN), DType::F32, &self.device)?;
            let mut c = Tensor::zeros((batch, HIDDEN), DType::F32, &self.device)?;
            let last = l + 1 == self.layers.len();
            let mut outs = Vec::with_capacity(if last { 0 } else { PARTIAL_FRAMES });
            for t in 0..PARTIAL_FRAMES {
                let g = (xp.get(t)? + h.matmul(&layer.w_hh)?)?;
                // PyTorch's gate order: input, forget, cell, output.
                let s = candle_nn::ops::sigmoid(&g)?;
                let i = s.narrow(1, 0, HIDDEN)?;
                let f = s.narrow(1, HIDDEN, HIDDEN)?;
                let o = s.narrow(1, 3 * HIDDEN, HIDDEN)?;
                let cell = g.narrow(1, 2 * HIDDEN, HIDDEN)?.tanh()?;
                c = ((f * &c)? + (i * cell)?)?;
                h = (o * c.tanh()?)?;
                if !last {
                    outs.push(h.clone());
                }
            }
            if !last {
                x = Tensor::stack(&outs, 0)?;
            }
        }
        let e = h
            .matmul(&self.linear_w)?
            .broadcast_add(&self.linear_b)?
            .relu()?;
        let norm = e
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f32::MAX)?;
        let e = e.broadcast_div(&norm)?;
        Ok(e.to_vec2::<f32>()?)
    }

    /// Embeds `samples` (16 kHz, already volume-normalised) exactly as the
    /// reference's `embed_utterance(wav, rate=1.3, min_coverage=0.75)`:
    /// partials every 77 frames, the last one kept when at least 75 % of
    /// it is audio, their mean normalised.
    pub fn embed_utterance(&self, samples: &[f32]) -> Result<Utterance> {
        let starts = partial_starts(samples.len(), 1.3, 0.75);
        let last = starts.last().copied().unwrap_or(0);
        let need = (last + PARTIAL_FRAMES) * HOP;
        let mut wav = samples.to_vec();
        if need >= wav.len() {
            wav.resize(need, 0.0);
        }
        let mel = self.mel.compute(&wav)?;
        let mut mels = Vec::with_capacity(starts.len() * PARTIAL_FRAMES * N_MELS);
        for s in &starts {
            mels.extend_from_slice(&mel[s * N_MELS..(s + PARTIAL_FRAMES) * N_MELS]);
        }
        let partials = self.embed_partials(&mels)?;
        Ok(Utterance {
            embed: mean_normalized(&partials),
            partials,
            partial_starts: starts,
        })
    }
}

/// First frames of the partials `embed_utterance` takes for `n` samples at
/// `rate` partials per second.
pub fn partial_starts(n: usize, rate: f64, min_coverage: f64) -> Vec<usize> {
    let n_frames = (n + 1).div_ceil(HOP);
    let step = ((f64::from(super::mel::SAMPLE_RATE) / rate) / HOP as f64).round() as usize;
    let step = step.clamp(1, PARTIAL_FRAMES);
    let steps = (n_frames + step + 1).saturating_sub(PARTIAL_FRAMES).max(1);
    let mut starts: Vec<usize> = (0..steps).step_by(step).collect();
    if let Some(&last) = starts.last() {
        let from = last * HOP;
        let coverage = (n as f64 - from as f64) / PARTIAL_SAMPLES as f64;
        if coverage < min_coverage && starts.len() > 1 {
            starts.pop();
        }
    }
    starts
}

/// The L2-normalised mean of unit vectors (zero when they cancel).
pub fn mean_normalized(vectors: &[Vec<f32>]) -> Vec<f32> {
    let dim = vectors.first().map_or(0, Vec::len);
    let mut m = vec![0f32; dim];
    for v in vectors {
        for (a, b) in m.iter_mut().zip(v) {
            *a += b;
        }
    }
    let norm = m.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for a in &mut m {
            *a /= norm;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partials_follow_the_reference_slicing() {
        // 7.1 s: 711 frames, step 77: 0, 77, ..., while i < 711 - 160 + 77 + 1.
        let s = partial_starts(113_600, 1.3, 0.75);
        assert_eq!(s.first(), Some(&0));
        assert_eq!(s[1], 77);
        assert_eq!(*s.last().unwrap(), 539);
        // Shorter than one partial: still one.
        assert_eq!(partial_starts(8000, 1.3, 0.75), vec![0]);
    }

    #[test]
    fn mean_of_unit_vectors_is_unit() {
        let m = mean_normalized(&[vec![1.0, 0.0], vec![0.0, 1.0]]);
        assert!((m[0] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        assert!(mean_normalized(&[]).is_empty());
    }
}
