//! Whisper's encoder and decoder in candle, after OpenAI's `model.py`.
//!
//! The weights are immutable and shared; everything that changes while decoding
//! lives in a [`DecoderState`] owned by the caller: the cross-attention keys and
//! values of one audio window, and the self-attention cache of each sequence.
//! Beam search reorders states with [`DecoderState::select`]; a decoder pool
//! keeps one state per live session.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{D, DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Conv1d, Conv1dConfig, Embedding, LayerNorm, VarBuilder};

use rayon::prelude::*;

use super::Config;
use super::attend;

fn linear(inp: usize, out: usize, bias: bool, vb: VarBuilder) -> Result<Dense> {
    let w = vb.get((out, inp), "weight")?;
    let b = if bias {
        Some(vb.get(out, "bias")?)
    } else {
        None
    };
    Dense::new(&w, b)
}

/// A linear layer that runs any (…, in) input as one (rows, in) × (in, out)
/// product. candle's `Linear` runs a 3-D input as one product per batch
/// item, so a decoder step over B sequences, (B, 1, D), read every weight
/// matrix B times. The float weights are kept transposed, (in, out) in
/// row-major order: the matrix-product kernel packs them with plain copies,
/// where a transposed view of candle's (out, in) layout made it gather
/// element by element (the packing took longer than the product itself in
/// a profile of the encoder). The decoder's vocabulary projection is one
/// too, over a transposed copy of the token embeddings (which stay as
/// loaded for the lookup).
///
/// Quantised, a layer keeps Q8_0 blocks beside the float weights and takes
/// the Q8_0 ones for short sequences (a token step) and the float ones for
/// long inputs ([`INT8_MAX_ROWS`]). The Q8_0 product ([`crate::q8`], each
/// weight block read once for all rows) reads a quarter of the bytes:
/// tiny.en's decoder step at 1, 2, 4 and 8 sequences took 5.2, 5.7, 8.1 and
/// 13.6 ms on it against 20.2, 19.8, 25.7 and 27.9 on the float weights
/// (`nexus bench whisper --batches 1,2,4,8`, debug build, AMD 2-core; the
/// earlier candle Q8_0 product fell behind the float one from two rows).
#[derive(Debug, Clone)]
struct Dense {
    /// The weights, (in, out); dropped once the long-input 8-bit form is
    /// kept, which then takes every product Q8_0 does not.
    wt: Option<Tensor>,
    b: Option<Tensor>,
    /// Q8_0 weights for products of at most [`INT8_MAX_ROWS`] rows per sequence.
    q: Option<crate::q8::Q8Matrix>,
    /// 8-bit weights with a scale per output for longer inputs.
    long: Option<crate::i8mm::I8Matrix>,
}

/// The most rows per sequence a product runs on Q8_0 weights where both are
/// kept. The rule counts each sequence's rows (the second-last dimension),
/// not the batch's: a token step takes the Q8_0 weights whether it steps one
/// sequence or sixty-four, so a sequence's words never depend on what it was
/// batched with (counting the batch's rows, base int8 live finals lost 1-2
/// WER points at 2-8 streams). Long inputs (a prompt, the audio's keys and
/// values) take the long-input 8-bit form where it is kept, else the float
/// weights.
const INT8_MAX_ROWS: usize = 8;

impl Dense {
    /// A layer of weights `w`, (out, in), and an optional bias.
    fn new(w: &Tensor, b: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            wt: Some(w.t()?.contiguous()?),
            b,
            q: None,
            long: None,
        })
    }

    /// The float weights, (in, out), while they are kept.
    fn float_weights(&self) -> Result<&Tensor> {
        self.wt.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("the float weights were dropped for the 8-bit ones".into())
        })
    }

    /// Adds Q8_0 weights for short inputs (CPU only; the input width must be
    /// a multiple of the 32-value block, as every Whisper width is). Before
    /// [`Self::quantize_long`], which drops the float weights.
    fn quantize_short(&mut self) -> Result<()> {
        let q = QTensor::quantize(&self.float_weights()?.t()?.contiguous()?, GgmlDType::Q8_0)?;
        self.q = crate::q8::Q8Matrix::from_qtensor(&q).map_err(candle_core::Error::wrap)?;
        Ok(())
    }

    /// Adds 8-bit weights with one scale per output for inputs of many rows
    /// ([`crate::i8mm`]; CPU only) and drops the float weights: from here
    /// on every product takes Q8_0 or this form.
    fn quantize_long(&mut self) -> Result<()> {
        let w = self.float_weights()?.t()?.contiguous()?;
        let (out, inp) = w.dims2()?;
        let values: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        self.long = Some(crate::i8mm::I8Matrix::quantize(&values, out, inp));
        self.wt = None;
        Ok(())
    }
}

impl Module for Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let inp = dims[dims.len() - 1];
        let rows = x.elem_count() / inp;
        let per_sequence = if dims.len() >= 2 {
            dims[dims.len() - 2]
        } else {
            1
        };
        let x = x.reshape((rows, inp))?;
        let y = match (&self.q, &self.long) {
            (Some(q), _) if per_sequence <= INT8_MAX_ROWS => q
                .forward(&x.contiguous()?)
                .map_err(candle_core::Error::wrap)?,
            (_, Some(long)) => {
                let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                Tensor::from_vec(long.matmul(&xs, rows), (rows, long.out_dim()), x.device())?
            }
            _ => x.matmul(self.float_weights()?)?,
        };
        let y = match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims.to_vec();
        out[dims.len() - 1] = y.dim(1)?;
        y.reshape(out)
    }
}

fn layer_norm(size: usize, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm::new(
        vb.get(size, "weight")?,
        vb.get(size, "bias")?,
        1e-5,
    ))
}

fn conv1d(inp: usize, out: usize, stride: usize, vb: VarBuilder) -> Result<Conv1d> {
    let cfg = Conv1dConfig {
        padding: 1,
        stride,
        groups: 1,
        dilation: 1,
        cudnn_fwd_algo: None,
    };
    Ok(Conv1d::new(
        vb.get((out, inp, 3), "weight")?,
        Some(vb.get(out, "bias")?),
        cfg,
    ))
}

#[derive(Debug, Clone)]
struct Attention {
    q: Dense,
    k: Dense,
    v: Dense,
    out: Dense,
    n_head: usize,
}

impl Attention {
    fn load(d: usize, n_head: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            q: linear(d, d, true, vb.pp("q_proj"))?,
            k: linear(d, d, false, vb.pp("k_proj"))?,
            v: linear(d, d, true, vb.pp("v_proj"))?,
            out: linear(d, d, true, vb.pp("out_proj"))?,
            n_head,
        })
    }

    /// (B, T, D) → (B, H, T, D/H)
    fn heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        x.reshape((b, t, self.n_head, d / self.n_head))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn project_kv(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.heads(&self.k.forward(x)?)?,
            self.heads(&self.v.forward(x)?)?,
        ))
    }

    /// Attention of `x` over keys/values already split into heads. Keys and
    /// values with a batch of 1 are shared by every sequence of `x` without
    /// being copied (beams over one audio window). Returns the output and, when
    /// asked, the attention weights (B, H, T, S).
    fn attend(
        &self,
        x: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        want_weights: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, t, d) = x.dims3()?;
        let h = self.n_head;
        let dh = d / h;
        let scale = (dh as f64).powf(-0.5);
        let q = (self.heads(&self.q.forward(x)?)? * scale)?;
        let shared = k.dim(0)? == 1 && b > 1;
        // Long self-attention (the encoder's 1500 frames) in blocks of heads: a
        // (B, H, 1500, 1500) score tensor is 72 MB per layer, above the size glibc
        // recycles, so each layer would fault in fresh zeroed pages.
        let (tq, tk) = (t, k.dim(2)?);
        if !shared && mask.is_none() && !want_weights && b * h * tq * tk > 4 << 20 && h > 1 {
            let group = ((4usize << 20) / (b * tq * tk)).clamp(1, h);
            let mut outs = Vec::with_capacity(h.div_ceil(group));
            for start in (0..h).step_by(group) {
                let n = group.min(h - start);
                // A group of heads out of a batch is a strided view that
                // matmul cannot take as is once B > 1: copy it.
                let qs = q.narrow(1, start, n)?.contiguous()?;
                let ks = k.narrow(1, start, n)?.contiguous()?;
                let vs = v.narrow(1, start, n)?.contiguous()?;
                let w = crate::ops::softmax_last_dim(&qs.matmul(&ks.transpose(2, 3)?)?)?;
                outs.push(w.matmul(&vs)?);
            }
            let out = Tensor::cat(&outs, 1)?.transpose(1, 2)?.reshape((b, t, d))?;
            return Ok((self.out.forward(&out)?, None));
        }
        // Shared K/V: (B, H, T, dh) -> (1, H, B*T, dh), one matmul against (1, H, S, dh).
        let q = if shared {
            q.transpose(0, 1)?.reshape((1, h, b * t, dh))?
        } else {
            q
        };
        let mut qk = q.matmul(&k.transpose(2, 3)?)?;
        if let Some(mask) = mask {
            qk = qk.broadcast_add(mask)?;
        }
        let w = crate::ops::softmax_last_dim(&qk)?;
        let mut out = w.matmul(v)?;
        let mut w = w;
        if shared {
            let s = k.dim(2)?;
            out = out.reshape((h, b, t, dh))?.transpose(0, 1)?;
            if want_weights {
                w = w.reshape((h, b, t, s))?.transpose(0, 1)?;
            }
        }
        let out = out.transpose(1, 2)?.reshape((b, t, d))?;
        Ok((self.out.forward(&out)?, want_weights.then_some(w)))
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn: Attention,
    attn_ln: LayerNorm,
    cross: Option<(Attention, LayerNorm)>,
    fc1: Dense,
    fc2: Dense,
    mlp_ln: LayerNorm,
}

impl Block {
    fn load(d: usize, n_head: usize, ffn: usize, cross: bool, vb: VarBuilder) -> Result<Self> {
        let cross = if cross {
            Some((
                Attention::load(d, n_head, vb.pp("encoder_attn"))?,
                layer_norm(d, vb.pp("encoder_attn_layer_norm"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            attn: Attention::load(d, n_head, vb.pp("self_attn"))?,
            attn_ln: layer_norm(d, vb.pp("self_attn_layer_norm"))?,
            cross,
            fc1: linear(d, ffn, true, vb.pp("fc1"))?,
            fc2: linear(ffn, d, true, vb.pp("fc2"))?,
            mlp_ln: layer_norm(d, vb.pp("final_layer_norm"))?,
        })
    }

    /// Q8_0 for every layer, and the long-input form too where `long`;
    /// for the cross-attention keys and values only that one: they are
    /// projected once per audio window, a row per frame.
    fn quantize(&mut self, long: bool) -> Result<()> {
        let a = &mut self.attn;
        let mut layers = vec![
            &mut a.q,
            &mut a.k,
            &mut a.v,
            &mut a.out,
            &mut self.fc1,
            &mut self.fc2,
        ];
        if let Some((c, _)) = &mut self.cross {
            layers.extend([&mut c.q, &mut c.out]);
            if long {
                c.k.quantize_long()?;
                c.v.quantize_long()?;
            }
        }
        for l in layers {
            l.quantize_short()?;
            if long {
                l.quantize_long()?;
            }
        }
        Ok(())
    }

    /// The long-input form only (an encoder block: a row per frame).
    fn quantize_long(&mut self) -> Result<()> {
        let a = &mut self.attn;
        for l in [&mut a.q, &mut a.k, &mut a.v, &mut a.out] {
            l.quantize_long()?;
        }
        self.fc1.quantize_long()?;
        self.fc2.quantize_long()
    }

    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.mlp_ln.forward(x)?;
        x + self
            .fc2
            .forward(&crate::ops::gelu_erf(&self.fc1.forward(&h)?)?)?
    }
}

/// The audio encoder: log-mel (B, n_mels, 3000) → features (B, 1500, D).
#[derive(Debug, Clone)]
pub struct Encoder {
    conv1: Conv1d,
    conv2: Conv1d,
    positions: Tensor,
    blocks: Vec<Block>,
    ln_post: LayerNorm,
}

fn sinusoids(length: usize, channels: usize, device: &Device) -> Result<Tensor> {
    let half = channels / 2;
    let inc = (10_000f64).ln() / (half - 1) as f64;
    let inv: Vec<f32> = (0..half)
        .map(|i| (-(inc * i as f64)).exp() as f32)
        .collect();
    let inv = Tensor::new(inv.as_slice(), device)?.unsqueeze(0)?;
    let t = Tensor::arange(0u32, length as u32, device)?
        .to_dtype(DType::F32)?
        .unsqueeze(1)?;
    let scaled = t.broadcast_mul(&inv)?;
    Tensor::cat(&[scaled.sin()?, scaled.cos()?], 1)
}

impl Encoder {
    /// Loads the encoder's tensors (Hugging Face names) from `vb`.
    pub fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        let ffn = vb.pp("layers.0.fc1").get_unchecked("weight")?.dim(0)?;
        Ok(Self {
            conv1: conv1d(cfg.num_mel_bins, d, 1, vb.pp("conv1"))?,
            conv2: conv1d(d, d, 2, vb.pp("conv2"))?,
            positions: sinusoids(cfg.max_source_positions, d, vb.device())?.to_dtype(vb.dtype())?,
            blocks: (0..cfg.encoder_layers)
                .map(|i| {
                    Block::load(
                        d,
                        cfg.encoder_attention_heads,
                        ffn,
                        false,
                        vb.pp(format!("layers.{i}")),
                    )
                })
                .collect::<Result<_>>()?,
            ln_post: layer_norm(d, vb.pp("layer_norm"))?,
        })
    }

    /// Adds 8-bit weights with one scale per output to the linear layers
    /// ([`crate::i8mm`]): every product here has a row per frame.
    pub fn quantize(&mut self) -> Result<()> {
        self.blocks.iter_mut().try_for_each(Block::quantize_long)
    }

    /// Encodes log-mel windows.
    pub fn forward(&self, mel: &Tensor) -> Result<Tensor> {
        let x = crate::ops::gelu_erf(&self.conv1.forward(mel)?)?;
        let x = crate::ops::gelu_erf(&self.conv2.forward(&x)?)?.transpose(1, 2)?;
        let t = x.dim(1)?;
        let mut x = x.broadcast_add(&self.positions.i(0..t)?)?;
        for b in &self.blocks {
            let h = b.attn_ln.forward(&x)?;
            let (k, v) = b.attn.project_kv(&h)?;
            x = (&x + b.attn.attend(&h, &k, &v, None, false)?.0)?;
            x = b.mlp(&x)?;
        }
        self.ln_post.forward(&x)
    }
}

/// Decoding state of a batch of sequences over one or more audio windows.
#[derive(Debug, Clone)]
pub struct DecoderState {
    cross: Vec<(Tensor, Tensor)>,
    cache: Vec<Option<(Tensor, Tensor)>>,
}

impl DecoderState {
    /// Tokens already in the self-attention cache.
    pub fn len(&self) -> usize {
        self.cache
            .first()
            .and_then(|c| c.as_ref())
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// Whether no token was decoded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the sequences at `indices` (repeats allowed), in that order.
    pub fn select(&mut self, indices: &[u32]) -> Result<()> {
        let device = self
            .cross
            .first()
            .map(|(k, _)| k.device().clone())
            .unwrap_or(Device::Cpu);
        let idx = Tensor::new(indices, &device)?;
        for layer in self.cache.iter_mut().flatten() {
            *layer = (
                layer.0.index_select(&idx, 0)?,
                layer.1.index_select(&idx, 0)?,
            );
        }
        for layer in &mut self.cross {
            if layer.0.dim(0)? != 1 {
                *layer = (
                    layer.0.index_select(&idx, 0)?,
                    layer.1.index_select(&idx, 0)?,
                );
            }
        }
        Ok(())
    }

    /// Forgets decoded tokens, keeping the audio.
    pub fn reset_cache(&mut self) {
        self.cache.iter_mut().for_each(|c| *c = None);
    }
}

/// The text decoder.
#[derive(Debug, Clone)]
pub struct Decoder {
    embed: Embedding,
    positions: Tensor,
    blocks: Vec<Block>,
    ln: LayerNorm,
    /// Logits against the token embeddings (tied weights, no bias).
    vocab: Dense,
    n_ctx: usize,
}

/// Output of one decoder step.
#[derive(Debug)]
pub struct DecoderOutput {
    /// Logits (B, T, vocab) in f32 (T: the positions asked for).
    pub logits: Tensor,
    /// Cross-attention weights per layer (B, H, T, S), when asked for.
    pub cross_attention: Vec<Tensor>,
}

impl Decoder {
    fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        let ffn = vb.pp("layers.0.fc1").get_unchecked("weight")?.dim(0)?;
        let embeddings = vb.get((cfg.vocab_size, d), "embed_tokens.weight")?;
        Ok(Self {
            vocab: Dense::new(&embeddings, None)?,
            embed: Embedding::new(embeddings, d),
            positions: vb.get((cfg.max_target_positions, d), "embed_positions.weight")?,
            blocks: (0..cfg.decoder_layers)
                .map(|i| {
                    Block::load(
                        d,
                        cfg.decoder_attention_heads,
                        ffn,
                        true,
                        vb.pp(format!("layers.{i}")),
                    )
                })
                .collect::<Result<_>>()?,
            ln: layer_norm(d, vb.pp("layer_norm"))?,
            n_ctx: cfg.max_target_positions,
        })
    }

    /// Adds 8-bit weights to the linear layers and the vocabulary projection
    /// (see [`Dense`]): Q8_0 blocks, and where `long`, the form for inputs
    /// of many rows (the audio's keys and values, a prompt).
    pub fn quantize(&mut self, long: bool) -> Result<()> {
        self.blocks.iter_mut().try_for_each(|b| b.quantize(long))?;
        // Logits are asked for a position or a few at a time: the long-input
        // form would be 20-26 MB more that nothing reads.
        self.vocab.quantize_short()?;
        Ok(())
    }

    /// A fresh state for audio features (B or 1, S, D); a batch of 1 is shared by all sequences.
    pub fn start(&self, audio: &Tensor) -> Result<DecoderState> {
        let cross = self
            .blocks
            .iter()
            .map(|b| {
                b.cross
                    .as_ref()
                    .expect("decoder blocks have cross-attention; this is a bug")
                    .0
                    .project_kv(audio)
            })
            .collect::<Result<_>>()?;
        Ok(DecoderState {
            cross,
            cache: vec![None; self.blocks.len()],
        })
    }

    /// Feeds `tokens` (B, T) after what `state` holds; returns logits for every new position.
    pub fn forward(
        &self,
        tokens: &Tensor,
        state: &mut DecoderState,
        want_attention: bool,
    ) -> Result<DecoderOutput> {
        self.forward_at(tokens, state, want_attention, None)
    }

    /// [`forward`](Self::forward), with logits only for the new positions in
    /// `rows` (in that order) when given: the vocabulary projection is most of
    /// a decoder's work, and a prompt of T tokens needs it at one or two.
    pub fn forward_at(
        &self,
        tokens: &Tensor,
        state: &mut DecoderState,
        want_attention: bool,
        rows: Option<&[u32]>,
    ) -> Result<DecoderOutput> {
        let (_, t) = tokens.dims2()?;
        let offset = state.len();
        if offset + t > self.n_ctx {
            candle_core::bail!(
                "{} tokens exceed the decoder context of {}",
                offset + t,
                self.n_ctx
            );
        }
        let mut x = self
            .embed
            .forward(tokens)?
            .broadcast_add(&self.positions.i(offset..offset + t)?)?;
        let mask = if t > 1 {
            let m: Vec<f32> = (0..t)
                .flat_map(|i| {
                    (0..offset + t).map(move |j| {
                        if j > offset + i {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            Some(Tensor::from_vec(m, (t, offset + t), tokens.device())?.to_dtype(x.dtype())?)
        } else {
            None
        };
        let mut cross_attention = Vec::new();
        for (i, blk) in self.blocks.iter().enumerate() {
            let h = blk.attn_ln.forward(&x)?;
            let (k, v) = blk.attn.project_kv(&h)?;
            let (k, v) = match &state.cache[i] {
                Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
                None => (k, v),
            };
            x = (&x + blk.attn.attend(&h, &k, &v, mask.as_ref(), false)?.0)?;
            state.cache[i] = Some((k, v));
            let (cross, cross_ln) = blk
                .cross
                .as_ref()
                .expect("decoder blocks have cross-attention; this is a bug");
            let h = cross_ln.forward(&x)?;
            let (ck, cv) = &state.cross[i];
            let (out, w) = cross.attend(&h, ck, cv, None, want_attention)?;
            x = (&x + out)?;
            if let Some(w) = w {
                cross_attention.push(w);
            }
            x = blk.mlp(&x)?;
        }
        let x = self.ln.forward(&x)?;
        let x = match rows {
            Some(r) if r.len() != t || r.iter().enumerate().any(|(i, r)| i as u32 != *r) => {
                if let Some(bad) = r.iter().find(|r| **r as usize >= t) {
                    candle_core::bail!("logits asked for position {bad} of {t}");
                }
                x.index_select(&Tensor::new(r, x.device())?, 1)?
            }
            _ => x,
        };
        let logits = self.vocab.forward(&x)?.to_dtype(DType::F32)?;
        Ok(DecoderOutput {
            logits,
            cross_attention,
        })
    }
}

impl Decoder {
    /// One decoding step for many independent sequences at once: `tokens[j]`
    /// follows what `states[j]` holds. Sequences may sit at different positions
    /// and attend to different audio; the projections and the MLP (the weight
    /// reads that bound a step's time) run once for the whole batch, attention
    /// runs per sequence over its own cache. Returns logits (B, vocab) in f32.
    pub fn step_batch(&self, tokens: &[u32], states: &mut [&mut DecoderState]) -> Result<Tensor> {
        let b = tokens.len();
        if b != states.len() || b == 0 {
            candle_core::bail!("{b} tokens for {} decoder states", states.len());
        }
        let device = self.positions.device();
        let offsets: Vec<u32> = states.iter().map(|s| s.len() as u32).collect();
        if let Some(o) = offsets.iter().find(|o| **o as usize + 1 > self.n_ctx) {
            candle_core::bail!(
                "{} tokens exceed the decoder context of {}",
                o + 1,
                self.n_ctx
            );
        }
        let pos = self
            .positions
            .index_select(&Tensor::new(offsets.as_slice(), device)?, 0)?
            .unsqueeze(1)?;
        let mut x = self
            .embed
            .forward(&Tensor::new(tokens, device)?.unsqueeze(1)?)?
            .broadcast_add(&pos)?;
        if device.is_cpu() && x.dtype() == DType::F32 {
            return self.step_layers_cpu(x, states);
        }
        for (i, blk) in self.blocks.iter().enumerate() {
            let a = &blk.attn;
            let h = blk.attn_ln.forward(&x)?;
            let (q, k, v) = (a.q.forward(&h)?, a.k.forward(&h)?, a.v.forward(&h)?);
            let scale = ((q.dim(2)? / a.n_head) as f64).powf(-0.5);
            let mut outs = Vec::with_capacity(b);
            for (j, st) in states.iter_mut().enumerate() {
                let qj = (a.heads(&q.i(j..j + 1)?)? * scale)?;
                let (kj, vj) = (a.heads(&k.i(j..j + 1)?)?, a.heads(&v.i(j..j + 1)?)?);
                let (kj, vj) = match &st.cache[i] {
                    Some((pk, pv)) => (Tensor::cat(&[pk, &kj], 2)?, Tensor::cat(&[pv, &vj], 2)?),
                    None => (kj, vj),
                };
                let w = crate::ops::softmax_last_dim(&qj.matmul(&kj.transpose(2, 3)?)?)?;
                outs.push(w.matmul(&vj)?);
                st.cache[i] = Some((kj, vj));
            }
            x = (&x + a.out.forward(&merge_heads(&outs)?)?)?;

            let (c, cross_ln) = blk
                .cross
                .as_ref()
                .expect("decoder blocks have cross-attention; this is a bug");
            let h = cross_ln.forward(&x)?;
            let q = c.q.forward(&h)?;
            let mut outs = Vec::with_capacity(b);
            for (j, st) in states.iter().enumerate() {
                let qj = (c.heads(&q.i(j..j + 1)?)? * scale)?;
                let (ck, cv) = &st.cross[i];
                let w = crate::ops::softmax_last_dim(&qj.matmul(&ck.transpose(2, 3)?)?)?;
                outs.push(w.matmul(cv)?);
            }
            x = (&x + c.out.forward(&merge_heads(&outs)?)?)?;
            x = blk.mlp(&x)?;
        }
        self.step_logits(&x)
    }
}

/// Per-sequence attention outputs (1, H, 1, dh) → (B, 1, D).
fn merge_heads(outs: &[Tensor]) -> Result<Tensor> {
    let out = Tensor::cat(outs, 0)?;
    let (b, h, t, dh) = out.dims4()?;
    out.transpose(1, 2)?.reshape((b, t, h * dh))
}

impl Decoder {
    /// Logits (B, vocab) in f32 of a step's final states (B, 1, D).
    fn step_logits(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.ln.forward(x)?;
        self.vocab.forward(&x)?.squeeze(1)?.to_dtype(DType::F32)
    }

    /// The layers of [`step_batch`](Self::step_batch) on CPU: the products
    /// run batched, each sequence's two attentions run as plain loops over its
    /// own memory, sequences side by side on the thread pool.
    fn step_layers_cpu(&self, mut x: Tensor, states: &mut [&mut DecoderState]) -> Result<Tensor> {
        let (b, _, d) = x.dims3()?;
        let device = x.device().clone();
        for (i, blk) in self.blocks.iter().enumerate() {
            let a = &blk.attn;
            let (h, dh) = (a.n_head, d / a.n_head);
            let scale = (dh as f32).powf(-0.5);
            let hx = blk.attn_ln.forward(&x)?;
            let rows = |t: Tensor| t.flatten_all()?.to_vec1::<f32>();
            let (q, k, v) = (
                rows(a.q.forward(&hx)?)?,
                rows(a.k.forward(&hx)?)?,
                rows(a.v.forward(&hx)?)?,
            );
            // Each sequence's cache as memory, read-locked while the loops run.
            let caches: Vec<Option<(Tensor, Tensor)>> =
                states.iter().map(|st| st.cache[i].clone()).collect();
            let guards = caches
                .iter()
                .map(|c| {
                    c.as_ref()
                        .map(|(k, v)| Ok((CpuRows::new(k)?, CpuRows::new(v)?)))
                        .transpose()
                })
                .collect::<Result<Vec<_>>>()?;
            let views: Vec<(usize, &[f32], &[f32])> = caches
                .iter()
                .zip(&guards)
                .map(|(c, g)| match (c, g) {
                    (Some((k, _)), Some((gk, gv))) => Ok((k.dim(2)?, gk.rows(), gv.rows())),
                    _ => Ok((0, &[][..], &[][..])),
                })
                .collect::<Result<_>>()?;
            let per_seq: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..b)
                .into_par_iter()
                .map(|j| {
                    let (t, pk, pv) = views[j];
                    let row = j * d..(j + 1) * d;
                    let nk = attend::append_position(pk, &k[row.clone()], (h, t, dh));
                    let nv = attend::append_position(pv, &v[row.clone()], (h, t, dh));
                    let mut out = vec![0.0; d];
                    attend::attend_one(&q[row], &nk, &nv, (h, t + 1, dh), scale, &mut out);
                    (nk, nv, out)
                })
                .collect();
            drop(views);
            drop(guards);
            let mut outs = Vec::with_capacity(b * d);
            for (st, (nk, nv, out)) in states.iter_mut().zip(per_seq) {
                let t = nk.len() / d;
                st.cache[i] = Some((
                    Tensor::from_vec(nk, (1, h, t, dh), &device)?,
                    Tensor::from_vec(nv, (1, h, t, dh), &device)?,
                ));
                outs.extend(out);
            }
            x = (&x
                + a.out
                    .forward(&Tensor::from_vec(outs, (b, 1, d), &device)?)?)?;

            let (c, cross_ln) = blk
                .cross
                .as_ref()
                .expect("decoder blocks have cross-attention; this is a bug");
            let q = rows(c.q.forward(&cross_ln.forward(&x)?)?)?;
            let guards = states
                .iter()
                .map(|st| Ok((CpuRows::new(&st.cross[i].0)?, CpuRows::new(&st.cross[i].1)?)))
                .collect::<Result<Vec<_>>>()?;
            let frames: Vec<usize> = states
                .iter()
                .map(|st| st.cross[i].0.dim(2))
                .collect::<Result<_>>()?;
            let views: Vec<(&[f32], &[f32])> =
                guards.iter().map(|(k, v)| (k.rows(), v.rows())).collect();
            let outs: Vec<f32> = (0..b)
                .into_par_iter()
                .flat_map_iter(|j| {
                    let mut out = vec![0.0; d];
                    attend::attend_one(
                        &q[j * d..(j + 1) * d],
                        views[j].0,
                        views[j].1,
                        (h, frames[j], dh),
                        scale,
                        &mut out,
                    );
                    out
                })
                .collect();
            drop(views);
            drop(guards);
            x = (&x
                + c.out
                    .forward(&Tensor::from_vec(outs, (b, 1, d), &device)?)?)?;
            x = blk.mlp(&x)?;
        }
        self.step_logits(&x)
    }
}

/// The memory of a contiguous f32 CPU tensor, read-locked while held.
struct CpuRows<'a> {
    storage: candle_core::StorageRef<'a>,
    range: std::ops::Range<usize>,
}

impl<'a> CpuRows<'a> {
    fn new(t: &'a Tensor) -> Result<Self> {
        if t.dtype() != DType::F32 {
            candle_core::bail!("a cache tensor is {:?}, not f32; this is a bug", t.dtype());
        }
        let (storage, layout) = t.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("a cache tensor is not contiguous; this is a bug");
        };
        if !matches!(&*storage, candle_core::Storage::Cpu(_)) {
            candle_core::bail!("a cache tensor is not on the CPU; this is a bug");
        }
        Ok(Self {
            storage,
            range: start..end,
        })
    }

    fn rows(&self) -> &[f32] {
        match &*self.storage {
            candle_core::Storage::Cpu(c) => c
                .as_slice::<f32>()
                .map_or(&[][..], |s| &s[self.range.clone()]),
            _ => &[],
        }
    }
}

/// A Whisper model.
#[derive(Debug, Clone)]
pub struct Whisper {
    /// Audio encoder.
    pub encoder: Encoder,
    /// Text decoder.
    pub decoder: Decoder,
    /// Its configuration.
    pub config: Config,
}

impl Whisper {
    /// Builds the model from Hugging Face-named weights.
    pub fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            encoder: Encoder::load(cfg, vb.pp("model.encoder"))?,
            decoder: Decoder::load(cfg, vb.pp("model.decoder"))?,
            config: cfg.clone(),
        })
    }

    /// Quantises the linear layers to 8 bits ([`Decoder::quantize`],
    /// [`Encoder::quantize`]): a decoder step's few rows take Q8_0 blocks
    /// (a quarter of the bytes to read); a row per frame takes one scale per
    /// output and pure integer sums ([`crate::i8mm`]) where this CPU's
    /// kernel for them beats the float product (AVX-512 VNNI), and stays in
    /// f32 elsewhere.
    pub fn quantize(&mut self) -> Result<()> {
        let long = crate::i8mm::Kernel::best().beats_float();
        if long {
            self.encoder.quantize()?;
        }
        self.decoder.quantize(long)
    }

    /// Log-probabilities over the vocabulary from logits (last dim).
    pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
        candle_nn::ops::log_softmax(logits, D::Minus1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .unwrap()
    }

    /// A quantised layer answers a sequence of a few rows from its Q8_0
    /// weights and a longer one from its per-output 8-bit weights (both
    /// close to, not equal to, the float product); with only the Q8_0 form,
    /// a longer one takes the float weights. However many sequences the
    /// batch holds.
    #[test]
    fn quantised_dense_takes_q8_for_few_rows_per_sequence_and_i8_for_many() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.1, (96, 64), &dev)?;
        let b = Tensor::randn(0f32, 0.1, 96, &dev)?;
        let float = Dense::new(&w, Some(b.clone()))?;
        let mut short = float.clone();
        short.quantize_short()?;
        let mut int8 = short.clone();
        int8.quantize_long()?;
        let long = int8.long.clone().expect("the long form");
        let reference = |x: &Tensor| x.matmul(&w.t()?)?.broadcast_add(&b);
        for (batch, rows) in [
            (1, 1),
            (1, INT8_MAX_ROWS),
            (40, 1),
            (3, INT8_MAX_ROWS),
            (1, INT8_MAX_ROWS + 1),
            (2, 40),
        ] {
            let x = Tensor::randn(0f32, 1.0, (batch, rows, 64), &dev)?;
            let want = reference(&x.reshape((batch * rows, 64))?)?.reshape((batch, rows, 96))?;
            let at = format!("{batch} sequences of {rows} rows");
            assert!(max_diff(&float.forward(&x)?, &want) < 1e-5, "{at}");
            let s = max_diff(&short.forward(&x)?, &want);
            let q = max_diff(&int8.forward(&x)?, &want);
            assert!(q > 0.0 && q < 0.05, "{at}: 8-bit off by {q}");
            if rows <= INT8_MAX_ROWS {
                assert_eq!(
                    max_diff(&int8.forward(&x)?, &short.forward(&x)?),
                    0.0,
                    "{at}: Q8_0 in both"
                );
            } else {
                assert!(s < 1e-5, "{at} take the float weights, off by {s}");
                let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
                let direct =
                    Tensor::from_vec(long.matmul(&xs, batch * rows), (batch * rows, 96), &dev)?
                        .broadcast_add(&b)?
                        .reshape((batch, rows, 96))?;
                assert_eq!(
                    max_diff(&int8.forward(&x)?, &direct),
                    0.0,
                    "{at}: the i8 product"
                );
            }
        }
        Ok(())
    }

    /// A sequence's int8 product does not depend on what it is batched
    /// with: its row alone and among 15 others agree to the rounding of
    /// the sums.
    #[test]
    fn a_sequence_steps_alike_alone_and_batched() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.1, (384, 384), &dev)?;
        let mut int8 = Dense::new(&w, None)?;
        int8.quantize_short()?;
        int8.quantize_long()?;
        let batch = Tensor::randn(0f32, 1.0, (16, 1, 384), &dev)?;
        let together = int8.forward(&batch)?;
        for i in [0, 7, 15] {
            let alone = int8.forward(&batch.narrow(0, i, 1)?)?;
            let d = max_diff(&alone, &together.narrow(0, i, 1)?);
            assert!(d < 1e-4, "sequence {i}: {d} apart");
        }
        // Long inputs (a window's frames): a scale per row, integer sums,
        // so the same bits alone and batched.
        let frames = Tensor::randn(0f32, 1.0, (4, 40, 384), &dev)?;
        let together = int8.forward(&frames)?;
        for i in [0, 3] {
            let alone = int8.forward(&frames.narrow(0, i, 1)?)?;
            assert_eq!(
                max_diff(&alone, &together.narrow(0, i, 1)?),
                0.0,
                "window {i}"
            );
        }
        Ok(())
    }
}
