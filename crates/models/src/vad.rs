//! Silero VAD v6 (16 kHz) in candle.
//!
//! Each step reads 512 new samples (32 ms) preceded by the last 64 samples of
//! the previous step, pads 64 samples by reflection, takes a 256-point STFT
//! (a fixed convolution in the checkpoint), runs four convolutions and an LSTM
//! cell, and returns the probability that the step holds speech. Steps of many
//! streams run as one batch; each stream keeps its own [`VadState`].

use std::path::Path;

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Conv1d, Conv1dConfig, VarBuilder};

use crate::error::{ModelError, Result};

/// New samples per step.
pub const CHUNK: usize = 512;
/// Samples of the previous step prepended to each step.
pub const CONTEXT: usize = 64;
const HIDDEN: usize = 128;

/// The recurrent state of one audio stream.
#[derive(Debug, Clone)]
pub struct VadState {
    h: Vec<f32>,
    c: Vec<f32>,
    context: Vec<f32>,
}

impl Default for VadState {
    fn default() -> Self {
        Self {
            h: vec![0.0; HIDDEN],
            c: vec![0.0; HIDDEN],
            context: vec![0.0; CONTEXT],
        }
    }
}

impl VadState {
    /// Forgets the stream's history (a new utterance or stream).
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

/// The Silero VAD network.
#[derive(Debug, Clone)]
pub struct SileroVad {
    stft: Tensor,
    convs: [Conv1d; 4],
    w_ih: Tensor,
    w_hh: Tensor,
    bias: Tensor,
    head_w: Tensor,
    head_b: Tensor,
    device: Device,
}

fn conv(vb: &VarBuilder, name: &str, inp: usize, out: usize, stride: usize) -> Result<Conv1d> {
    let cfg = Conv1dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    let vb = vb.pp(name);
    Ok(Conv1d::new(
        vb.get((out, inp, 3), "weight")?,
        Some(vb.get(out, "bias")?),
        cfg,
    ))
}

impl SileroVad {
    /// Loads `silero_vad_16k.safetensors`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| ModelError::Load(format!("{}: {e}", path.display())))?;
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, device)
            .map_err(|e| ModelError::Load(format!("{}: {e}", path.display())))?;
        Self::from_vb(&vb).map_err(|e| ModelError::Load(format!("{}: {e}", path.display())))
    }

    fn from_vb(vb: &VarBuilder) -> Result<Self> {
        let lstm = vb.pp("lstm_cell");
        let bias = (lstm.get(4 * HIDDEN, "bias_ih")? + lstm.get(4 * HIDDEN, "bias_hh")?)?;
        Ok(Self {
            stft: vb.get((258, 1, 256), "stft_conv.weight")?,
            convs: [
                conv(vb, "conv1", 129, 128, 1)?,
                conv(vb, "conv2", 128, 64, 2)?,
                conv(vb, "conv3", 64, 64, 2)?,
                conv(vb, "conv4", 64, 128, 1)?,
            ],
            w_ih: lstm
                .get((4 * HIDDEN, HIDDEN), "weight_ih")?
                .t()?
                .contiguous()?,
            w_hh: lstm
                .get((4 * HIDDEN, HIDDEN), "weight_hh")?
                .t()?
                .contiguous()?,
            bias,
            head_w: vb
                .get((1, HIDDEN, 1), "final_conv.weight")?
                .reshape((HIDDEN, 1))?,
            head_b: vb.get(1, "final_conv.bias")?,
            device: vb.device().clone(),
        })
    }

    /// One step for a batch of streams: `chunks[i]` holds [`CHUNK`] new samples of
    /// the stream whose state is `states[i]`. Returns a speech probability per stream.
    pub fn step(&self, states: &mut [&mut VadState], chunks: &[&[f32]]) -> Result<Vec<f32>> {
        let b = states.len();
        if b == 0 || chunks.len() != b {
            return Err(ModelError::Input(format!(
                "{b} states for {} chunks",
                chunks.len()
            )));
        }
        let width = CONTEXT + CHUNK + CONTEXT;
        let mut input = Vec::with_capacity(b * width);
        for (s, c) in states.iter().zip(chunks) {
            if c.len() != CHUNK {
                return Err(ModelError::Input(format!(
                    "a VAD step takes {CHUNK} samples, got {}",
                    c.len()
                )));
            }
            let start = input.len();
            input.extend_from_slice(&s.context);
            input.extend_from_slice(c);
            // Reflect padding on the right, excluding the edge sample.
            let last = input.len() - 1;
            for k in 1..=CONTEXT {
                input.push(input[last - k]);
            }
            debug_assert_eq!(input.len() - start, width);
        }
        let x = Tensor::from_vec(input, (b, 1, width), &self.device)?;
        let spec = x.conv1d(&self.stft, 0, 128, 1, 1)?;
        let re = spec.narrow(1, 0, 129)?;
        let im = spec.narrow(1, 129, 129)?;
        let mut x = (re.sqr()? + im.sqr()?)?.sqrt()?;
        for c in &self.convs {
            x = c.forward(&x)?.relu()?;
        }
        let x = x.squeeze(D::Minus1)?;
        let h0: Vec<f32> = states.iter().flat_map(|s| s.h.iter().copied()).collect();
        let c0: Vec<f32> = states.iter().flat_map(|s| s.c.iter().copied()).collect();
        let h0 = Tensor::from_vec(h0, (b, HIDDEN), &self.device)?;
        let c0 = Tensor::from_vec(c0, (b, HIDDEN), &self.device)?;
        // PyTorch LSTMCell gate order: input, forget, cell, output.
        let gates = x
            .matmul(&self.w_ih)?
            .add(&h0.matmul(&self.w_hh)?)?
            .broadcast_add(&self.bias)?;
        let i = candle_nn::ops::sigmoid(&gates.narrow(1, 0, HIDDEN)?)?;
        let f = candle_nn::ops::sigmoid(&gates.narrow(1, HIDDEN, HIDDEN)?)?;
        let g = gates.narrow(1, 2 * HIDDEN, HIDDEN)?.tanh()?;
        let o = candle_nn::ops::sigmoid(&gates.narrow(1, 3 * HIDDEN, HIDDEN)?)?;
        let c1 = ((f * c0)? + (i * g)?)?;
        let h1 = (o * c1.tanh()?)?;
        let logit = h1
            .relu()?
            .matmul(&self.head_w)?
            .broadcast_add(&self.head_b)?;
        let p: Vec<f32> = candle_nn::ops::sigmoid(&logit)?.flatten_all()?.to_vec1()?;
        let h1: Vec<f32> = h1.flatten_all()?.to_vec1()?;
        let c1: Vec<f32> = c1.flatten_all()?.to_vec1()?;
        for (k, (s, chunk)) in states.iter_mut().zip(chunks).enumerate() {
            s.h.copy_from_slice(&h1[k * HIDDEN..(k + 1) * HIDDEN]);
            s.c.copy_from_slice(&c1[k * HIDDEN..(k + 1) * HIDDEN]);
            s.context.copy_from_slice(&chunk[CHUNK - CONTEXT..]);
        }
        Ok(p)
    }

    /// Speech probability of every whole 32 ms step of one stream, from a fresh state.
    pub fn probabilities(&self, samples: &[f32]) -> Result<Vec<f32>> {
        let mut state = VadState::default();
        samples
            .chunks_exact(CHUNK)
            .map(|c| Ok(self.step(&mut [&mut state], &[c])?[0]))
            .collect()
    }
}
/// Speech regions (sample ranges) of a recording from its step
/// probabilities ([`SileroVad::probabilities`]), the way Silero's own
/// `get_speech_timestamps` draws them: speech starts at a step of at least
/// 0.5 and ends after 0.3 s under 0.35; regions under 0.25 s are dropped and
/// the rest widened by 30 ms on each side, within `total` samples.
pub fn speech_regions(probs: &[f32], total: usize) -> Vec<std::ops::Range<usize>> {
    const ON: f32 = 0.5;
    const OFF: f32 = 0.35;
    const MIN_SILENCE: usize = 4_800;
    const MIN_SPEECH: usize = 4_000;
    const PAD: usize = 480;
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    let mut start: Option<usize> = None;
    let mut quiet_from: Option<usize> = None;
    let close = |s: usize, e: usize, out: &mut Vec<std::ops::Range<usize>>| {
        if e.saturating_sub(s) >= MIN_SPEECH {
            let (s, e) = (s.saturating_sub(PAD), (e + PAD).min(total));
            match out.last_mut() {
                Some(last) if last.end >= s => last.end = e,
                _ => out.push(s..e),
            }
        }
    };
    for (i, p) in probs.iter().enumerate() {
        let at = i * CHUNK;
        match start {
            None if *p >= ON => {
                start = Some(at);
                quiet_from = None;
            }
            None => {}
            Some(s) => {
                if *p >= OFF {
                    quiet_from = None;
                } else {
                    let q = *quiet_from.get_or_insert(at);
                    if at + CHUNK - q >= MIN_SILENCE {
                        close(s, q, &mut out);
                        start = None;
                        quiet_from = None;
                    }
                }
            }
        }
    }
    if let Some(s) = start {
        close(
            s,
            quiet_from.unwrap_or(probs.len() * CHUNK).min(total),
            &mut out,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_follow_hysteresis_and_drop_blips() {
        // 32 ms steps: 20 quiet, 30 speech with a 4-step dip (0.13 s, kept
        // inside), 20 quiet, one lone speech step (dropped), 10 quiet.
        let mut p = vec![0.1; 20];
        p.extend(vec![0.9; 13]);
        p.extend(vec![0.2; 4]);
        p.extend(vec![0.9; 13]);
        p.extend(vec![0.1; 20]);
        p.push(0.9);
        p.extend(vec![0.1; 10]);
        let total = p.len() * CHUNK;
        let r = speech_regions(&p, total);
        assert_eq!(r, vec![20 * CHUNK - 480..50 * CHUNK + 480]);
        assert!(speech_regions(&[0.1; 50], 50 * CHUNK).is_empty());
        // Speech to the very end is closed there.
        let r = speech_regions(&[0.9; 20], 20 * CHUNK);
        assert_eq!(r, vec![0..20 * CHUNK]);
    }
}
