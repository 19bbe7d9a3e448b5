//! Vocoders: codec codes or mel spectrograms → waveform.
//!
//! [`firefly`] decodes the NEXUS-O audio decoder's codes (Fish-Speech 1.4's
//! FireFly-GAN codec), in chunks; [`hifigan`] turns mel spectrograms into
//! 22.05 kHz speech (HiFi-GAN V1).

pub mod firefly;
pub mod hifigan;

pub use firefly::{Firefly, FireflyStream};
pub use hifigan::HifiGan;

use candle_core::{Module, Tensor};

/// A transposed 1-D convolution computed as `stride` ordinary convolutions
/// (its polyphase form), which run as matrix products: candle's CPU
/// transposed convolution is a direct loop many times slower.
///
/// Output phase `r` (samples `t·stride + r`) sums the input under the taps
/// `k ≡ r (mod stride)`, so it is a causal convolution of the input with
/// those taps reversed; the phases are interleaved, then `padding` samples
/// are cut from each end, as `ConvTranspose1d(padding)` does.
#[derive(Debug, Clone)]
pub struct TransConv1d {
    phases: Vec<(candle_nn::Conv1d, usize)>,
    bias: Option<Tensor>,
    stride: usize,
    kernel: usize,
    padding: usize,
}

impl TransConv1d {
    /// From PyTorch's `ConvTranspose1d` weight (in, out, kernel) and bias.
    pub fn new(
        weight: &Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
    ) -> candle_core::Result<Self> {
        let (_, _, k) = weight.dims3()?;
        let mut phases = Vec::with_capacity(stride);
        for r in 0..stride.min(k) {
            let taps: Vec<usize> = (r..k).step_by(stride).collect();
            let j = taps.len();
            // Reversed taps: weight[c, o, r + (j - 1 - i)·stride] → (out, in, j).
            let idx: Vec<u32> = taps.iter().rev().map(|t| *t as u32).collect();
            let idx = Tensor::new(idx.as_slice(), weight.device())?;
            let w = weight
                .index_select(&idx, 2)?
                .transpose(0, 1)?
                .contiguous()?;
            phases.push((candle_nn::Conv1d::new(w, None, Default::default()), j));
        }
        Ok(Self {
            phases,
            bias,
            stride,
            kernel: k,
            padding,
        })
    }

    /// Loads `weight` (and `bias` when present) under `vb`.
    pub fn load(
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb: candle_nn::VarBuilder,
    ) -> candle_core::Result<Self> {
        let w = vb.get((cin, cout, kernel), "weight")?;
        let b = if vb.contains_tensor("bias") {
            Some(vb.get(cout, "bias")?)
        } else {
            None
        };
        Self::new(&w, b, stride, padding)
    }
}

impl Module for TransConv1d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, _, t) = x.dims3()?;
        let jmax = self.phases.iter().map(|(_, j)| *j).max().unwrap_or(1);
        let len = t + jmax - 1;
        let mut ys = Vec::with_capacity(self.stride);
        for r in 0..self.stride {
            let y = match self.phases.get(r) {
                Some((conv, j)) => {
                    let y = conv.forward(&x.pad_with_zeros(2, j - 1, j - 1)?)?;
                    let n = y.dim(2)?;
                    y.pad_with_zeros(2, 0, len - n)?
                }
                None => {
                    let cout = self.phases[0].0.weight().dim(0)?;
                    Tensor::zeros((b, cout, len), x.dtype(), x.device())?
                }
            };
            ys.push(y);
        }
        let cout = ys[0].dim(1)?;
        let y = Tensor::stack(&ys, 3)?.reshape((b, cout, len * self.stride))?;
        let full = (t - 1) * self.stride + self.kernel;
        let y = y.narrow(2, self.padding, full - 2 * self.padding)?;
        match &self.bias {
            Some(bias) => y.broadcast_add(&bias.reshape((1, cout, 1))?),
            None => Ok(y),
        }
    }
}
