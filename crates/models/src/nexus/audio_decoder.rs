//! The NEXUS-O audio decoder: a decoder-only transformer that turns LM
//! hidden states into codec codes, 8 codebooks in MusicGen's delay pattern.
//!
//! At step `t` its input is the average of nine vectors: the embeddings of
//! the eight codes chosen at step `t - 1` (one table per codebook) and the
//! LM hidden state of step `t` projected to the decoder's width (zeros once
//! the text has ended). Eight heads predict the codes of step `t`.
//!
//! Delay pattern: codebook `k` runs `k` steps behind codebook 0, so frame
//! `f` of codebook `k` is emitted at step `f + k`. Before its first frame a
//! codebook holds the pad code (`codebook_size + 1`, also the start input);
//! after its last it holds end-of-speech (`codebook_size`), which only
//! codebook 0 predicts; the others are chosen among real codes.

use candle_core::{D, DType, IndexOp, Module, Tensor};
use candle_nn::{
    Embedding, Linear, RmsNorm, VarBuilder, embedding, linear, linear_no_bias, rms_norm,
};

use super::config::AudioDecoderConfig;
use super::transformer::{BlockConfig, Rotary, Stack, argmax, text_position};
use crate::error::{ModelError, Result};

/// Codes generated for one utterance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpeechCodes {
    /// As generated: steps × codebooks, delay pattern included.
    pub delayed: Vec<Vec<u32>>,
    /// Undone: frames × codebooks, what the vocoder takes.
    pub frames: Vec<Vec<u32>>,
}

/// Lays frames (F × K) out in the delay pattern: F + K steps, codebook `k`
/// shifted by `k`, `pad` before and `eos` after each codebook's frames.
pub fn delay(frames: &[Vec<u32>], codebooks: usize, pad: u32, eos: u32) -> Vec<Vec<u32>> {
    let f = frames.len();
    (0..f + codebooks)
        .map(|t| {
            (0..codebooks)
                .map(|k| {
                    if t < k {
                        pad
                    } else if t - k < f {
                        frames[t - k][k]
                    } else {
                        eos
                    }
                })
                .collect()
        })
        .collect()
}

/// Undoes [`delay`]: frame `f` of codebook `k` is step `f + k`. The frame
/// count is the step where codebook 0 says `eos`, or as many as every
/// codebook completed.
pub fn undelay(steps: &[Vec<u32>], codebooks: usize, eos: u32) -> Vec<Vec<u32>> {
    let complete = steps.len().saturating_sub(codebooks.saturating_sub(1));
    let f = steps
        .iter()
        .position(|s| s.first() == Some(&eos))
        .unwrap_or(complete)
        .min(complete);
    (0..f)
        .map(|f| (0..codebooks).map(|k| steps[f + k][k]).collect())
        .collect()
}

/// The audio decoder's weights (`audio_decoder.` in a checkpoint).
#[derive(Debug, Clone)]
pub struct AudioDecoder {
    embeddings: Vec<Embedding>,
    lm_proj: Linear,
    stack: Stack,
    norm: RmsNorm,
    heads: Vec<Linear>,
    codebooks: usize,
    codebook_size: usize,
    lm_hidden: usize,
}

impl AudioDecoder {
    /// Loads from `vb`; `lm_hidden` is the LM's width.
    pub fn load(cfg: &AudioDecoderConfig, lm_hidden: usize, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let rows = cfg.codebook_size + 2;
        let head_dim = d / cfg.num_attention_heads;
        Ok(Self {
            embeddings: (0..cfg.codebooks)
                .map(|k| embedding(rows, d, vb.pp(format!("embeddings.{k}"))))
                .collect::<candle_core::Result<_>>()?,
            lm_proj: linear(lm_hidden, d, vb.pp("lm_proj"))?,
            stack: Stack::load(
                BlockConfig {
                    hidden: d,
                    heads: cfg.num_attention_heads,
                    kv_heads: cfg.num_attention_heads,
                    ffn: cfg.intermediate_size,
                    eps: cfg.rms_norm_eps,
                    attn_prefix: "",
                    mlp_prefix: "",
                },
                cfg.num_hidden_layers,
                Rotary::new(head_dim, cfg.rope_theta, [head_dim / 2, 0, 0])?,
                vb.pp("layers"),
            )?,
            norm: rms_norm(d, cfg.rms_norm_eps, vb.pp("norm"))?,
            heads: (0..cfg.codebooks)
                .map(|k| linear_no_bias(d, cfg.codebook_size + 1, vb.pp(format!("heads.{k}"))))
                .collect::<candle_core::Result<_>>()?,
            codebooks: cfg.codebooks,
            codebook_size: cfg.codebook_size,
            lm_hidden,
        })
    }

    /// Codebooks (8).
    pub fn codebooks(&self) -> usize {
        self.codebooks
    }

    /// End-of-speech code.
    pub fn eos(&self) -> u32 {
        self.codebook_size as u32
    }

    /// Delay-pattern pad (and start) code.
    pub fn pad(&self) -> u32 {
        self.codebook_size as u32 + 1
    }

    /// Inputs (B, T, d) from previous codes (B, T, K) and LM states (B, T, lm_hidden).
    fn inputs(&self, codes: &Tensor, lm_h: &Tensor) -> Result<Tensor> {
        let mut sum = self.lm_proj.forward(lm_h)?;
        for (k, e) in self.embeddings.iter().enumerate() {
            sum = (sum + e.forward(&codes.i((.., .., k))?.contiguous()?)?)?;
        }
        Ok((sum / (self.codebooks as f64 + 1.0))?)
    }

    /// Teacher-forced logits (B, T, K, codebook_size + 1) for previous codes
    /// (B, T, K) and LM states (B, T, lm_hidden).
    pub fn forward(&self, codes: &Tensor, lm_h: &Tensor) -> Result<Tensor> {
        let t = codes.dim(1)?;
        let x = self.inputs(codes, lm_h)?;
        let positions: Vec<_> = (0..t as u32).map(text_position).collect();
        let mut cache = self.stack.new_cache();
        let h = self
            .norm
            .forward(&self.stack.forward(&x, &positions, &mut cache)?)?;
        let logits = self
            .heads
            .iter()
            .map(|head| head.forward(&h))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&logits, 2)?)
    }

    /// Greedy codes for LM states (n, lm_hidden), at most `max_frames` frames.
    pub fn generate(&self, lm_h: &Tensor, max_frames: usize) -> Result<SpeechCodes> {
        let (n, width) = lm_h.dims2()?;
        if width != self.lm_hidden {
            return Err(ModelError::Input(format!(
                "LM states of width {width} for an audio decoder of LM width {}",
                self.lm_hidden
            )));
        }
        let dev = lm_h.device();
        let (eos, pad) = (self.eos(), self.pad());
        let zeros = Tensor::zeros(self.lm_hidden, lm_h.dtype(), dev)?;
        let mut cache = self.stack.new_cache();
        let mut prev = vec![pad; self.codebooks];
        let mut delayed: Vec<Vec<u32>> = Vec::new();
        let mut frames: Option<usize> = None;
        let mut t = 0usize;
        loop {
            let cond = if t < n { lm_h.i(t)? } else { zeros.clone() };
            let codes = Tensor::new(prev.as_slice(), dev)?.reshape((1, 1, self.codebooks))?;
            let x = self.inputs(&codes, &cond.reshape((1, 1, self.lm_hidden))?)?;
            let h = self
                .stack
                .forward(&x, &[text_position(t as u32)], &mut cache)?;
            let h = self.norm.forward(&h)?.i((0, 0))?;
            let mut row = Vec::with_capacity(self.codebooks);
            for (k, head) in self.heads.iter().enumerate() {
                let code = if t < k {
                    pad
                } else if frames.is_some_and(|f| t - k >= f) {
                    eos
                } else {
                    let logits = head.forward(&h.unsqueeze(0)?)?.squeeze(0)?;
                    if k == 0 {
                        if t >= max_frames {
                            eos
                        } else {
                            argmax(&logits)?
                        }
                    } else {
                        argmax(&logits.narrow(D::Minus1, 0, self.codebook_size)?)?
                    }
                };
                row.push(code);
            }
            if frames.is_none() && row[0] == eos {
                frames = Some(t);
            }
            prev.clone_from(&row);
            delayed.push(row);
            t += 1;
            if frames.is_some_and(|f| t >= f + self.codebooks) {
                break;
            }
        }
        let frames = undelay(&delayed, self.codebooks, eos);
        Ok(SpeechCodes { delayed, frames })
    }

    /// Frames (F × K) as a (1, K, F) tensor of u32, the vocoder's layout.
    pub fn frames_tensor(frames: &[Vec<u32>], device: &candle_core::Device) -> Result<Tensor> {
        let k = frames.first().map_or(0, Vec::len);
        let flat: Vec<u32> = frames.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(flat, (frames.len(), k), device)?
            .t()?
            .contiguous()?
            .unsqueeze(0)?
            .to_dtype(DType::U32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_and_undelay_are_inverse() {
        let frames: Vec<Vec<u32>> = (0..5)
            .map(|f| (0..3).map(|k| 10 * f + k).collect())
            .collect();
        let steps = delay(&frames, 3, 99, 98);
        assert_eq!(steps.len(), 8);
        assert_eq!(steps[0], vec![0, 99, 99]);
        assert_eq!(steps[1], vec![10, 1, 99]);
        assert_eq!(steps[2], vec![20, 11, 2]);
        assert_eq!(steps[5], vec![98, 41, 32]);
        assert_eq!(steps[7], vec![98, 98, 98]);
        assert_eq!(undelay(&steps, 3, 98), frames);
        // No end-of-speech yet: only frames every codebook completed.
        assert_eq!(undelay(&steps[..4], 3, 98), frames[..2].to_vec());
        assert!(undelay(&[], 3, 98).is_empty());
    }
}
