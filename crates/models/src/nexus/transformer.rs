//! The decoder-only transformer blocks shared by the NEXUS-O language model
//! (Qwen2.5) and its audio decoder: RMSNorm, grouped-query attention with
//! multimodal rotary positions, SwiGLU MLP, a KV cache per sequence, and a
//! batched single-token step over sequences of different lengths.

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Linear, RmsNorm, VarBuilder, linear_b, linear_no_bias, rms_norm};

use crate::error::Result;

/// A token's position: (time, height, width). Text and audio tokens use the
/// same value on all three axes; image patches (Qwen2.5-VL) will not.
pub type Position = [u32; 3];

/// The same 1-D position on every axis.
pub fn text_position(p: u32) -> Position {
    [p, p, p]
}

/// Which operations a forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// candle's fused norm, rotation and softmax kernels: fast, and carry no
    /// gradient (serving).
    Fused,
    /// The same functions composed of operations candle differentiates,
    /// for training *through* the model: gradients reach the input, while
    /// the stack's own weights are frozen and get none (candle would
    /// otherwise compute every weight's gradient, a third of the work).
    Differentiable,
}

impl Kernels {
    /// `lin` applied to `x`: as is when fused; frozen when differentiable.
    pub fn linear(self, lin: &Linear, x: &Tensor) -> Result<Tensor> {
        match self {
            Kernels::Fused => Ok(lin.forward(x)?),
            Kernels::Differentiable => frozen_linear(lin, x),
        }
    }
}

/// `lin(x)` whose gradient flows to `x` only: the product runs on a
/// detached `x`, and a custom operation hands its result on and carries
/// the gradient back through the weight.
pub fn frozen_linear(lin: &Linear, x: &Tensor) -> Result<Tensor> {
    let y = lin.forward(&x.detach())?;
    if !x.track_op() {
        return Ok(y);
    }
    Ok(x.apply_op1(FrozenLinear {
        y,
        w: lin.weight().clone(),
    })?)
}

struct FrozenLinear {
    /// The product, computed beforehand.
    y: Tensor,
    /// (out, in).
    w: Tensor,
}

impl candle_core::CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let shape = self.y.shape().clone();
        let flat = self.y.flatten_all()?;
        let storage = match self.y.dtype() {
            DType::F64 => candle_core::CpuStorage::F64(flat.to_vec1()?),
            _ => candle_core::CpuStorage::F32(flat.to_dtype(DType::F32)?.to_vec1()?),
        };
        Ok((storage, shape))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.broadcast_matmul(&self.w)?))
    }
}

/// Multimodal rotary embedding (Qwen2-VL's M-RoPE).
///
/// The rotary half of each head is cut into three sections
/// (`mrope_section`, e.g. 16/24/24 of 64 for a 128-dim head); frequency `i`
/// rotates by the time, height or width position according to the section it
/// falls in. With equal positions on the three axes this is exactly 1-D RoPE.
#[derive(Debug, Clone)]
pub struct Rotary {
    inv_freq: Vec<f32>,
    /// Axis (0 time, 1 height, 2 width) of each frequency.
    axis: Vec<usize>,
}

impl Rotary {
    /// `sections` must sum to `head_dim / 2`; `[head_dim / 2, 0, 0]` is plain RoPE.
    pub fn new(head_dim: usize, theta: f64, sections: [usize; 3]) -> Result<Self> {
        let half = head_dim / 2;
        if sections.iter().sum::<usize>() != half {
            return Err(crate::ModelError::Load(format!(
                "mrope_section {sections:?} does not sum to head_dim/2 = {half}"
            )));
        }
        let inv_freq = (0..half)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
            .collect();
        let mut axis = Vec::with_capacity(half);
        for (a, n) in sections.iter().enumerate() {
            axis.extend(std::iter::repeat_n(a, *n));
        }
        Ok(Self { inv_freq, axis })
    }

    /// cos and sin, each (T, head_dim / 2), for the given positions.
    pub fn cos_sin(&self, positions: &[Position], device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut angles = Vec::with_capacity(positions.len() * half);
        for p in positions {
            for i in 0..half {
                angles.push(p[self.axis[i]] as f32 * self.inv_freq[i]);
            }
        }
        let a = Tensor::from_vec(angles, (positions.len(), half), device)?;
        Ok((a.cos()?, a.sin()?))
    }

    /// Rotates x (B, heads, T, head_dim) by positions (one per T).
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        self.apply_with(x, cos, sin, Kernels::Fused)
    }

    /// [`Rotary::apply`] with the chosen kernels.
    pub fn apply_with(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, k: Kernels) -> Result<Tensor> {
        let cos = cos.to_dtype(x.dtype())?;
        let sin = sin.to_dtype(x.dtype())?;
        Ok(match k {
            Kernels::Fused => candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?,
            Kernels::Differentiable => {
                candle_nn::rotary_emb::rope_slow(&x.contiguous()?, &cos, &sin)?
            }
        })
    }
}

/// Shape and names of a block stack.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    /// Model width.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// MLP width.
    pub ffn: usize,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// Prefix of the attention projections (`self_attn.` in Qwen2, none in the audio decoder).
    pub attn_prefix: &'static str,
    /// Prefix of the MLP projections (`mlp.` in Qwen2).
    pub mlp_prefix: &'static str,
}

#[derive(Debug, Clone)]
struct Block {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    ln1: RmsNorm,
    ln2: RmsNorm,
}

/// Keys and values of one sequence, per layer: (1, kv_heads, len, head_dim).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A stack of pre-norm decoder blocks.
#[derive(Debug, Clone)]
pub struct Stack {
    blocks: Vec<Block>,
    cfg: BlockConfig,
    head_dim: usize,
    rotary: Rotary,
}

impl Stack {
    /// Loads `layers` blocks from `vb` (`{i}.` under it).
    pub fn load(cfg: BlockConfig, layers: usize, rotary: Rotary, vb: VarBuilder) -> Result<Self> {
        let head_dim = cfg.hidden / cfg.heads;
        let kv = cfg.kv_heads * head_dim;
        let blocks = (0..layers)
            .map(|i| {
                let vb = vb.pp(i.to_string());
                let a = |n: &str| format!("{}{n}", cfg.attn_prefix);
                let m = |n: &str| format!("{}{n}", cfg.mlp_prefix);
                Ok(Block {
                    q: linear_b(cfg.hidden, cfg.hidden, true, vb.pp(a("q_proj")))?,
                    k: linear_b(cfg.hidden, kv, true, vb.pp(a("k_proj")))?,
                    v: linear_b(cfg.hidden, kv, true, vb.pp(a("v_proj")))?,
                    o: linear_no_bias(cfg.hidden, cfg.hidden, vb.pp(a("o_proj")))?,
                    gate: linear_no_bias(cfg.hidden, cfg.ffn, vb.pp(m("gate_proj")))?,
                    up: linear_no_bias(cfg.hidden, cfg.ffn, vb.pp(m("up_proj")))?,
                    down: linear_no_bias(cfg.ffn, cfg.hidden, vb.pp(m("down_proj")))?,
                    ln1: rms_norm(cfg.hidden, cfg.eps, vb.pp("input_layernorm"))?,
                    ln2: rms_norm(cfg.hidden, cfg.eps, vb.pp("post_attention_layernorm"))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            blocks,
            cfg,
            head_dim,
            rotary,
        })
    }

    /// A cache sized for this stack.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.blocks.len()],
            len: 0,
        }
    }

    fn heads(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        Ok(x.reshape((b, t, n, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// Attention of q (1, H, T, hd) to k, v (1, KV, L, hd); the T queries are
    /// the last T of the L positions (causal among themselves).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let (_, h, t, hd) = q.dims4()?;
        let l = k.dim(2)?;
        let group = h / self.cfg.kv_heads;
        let (k, v) = if group > 1 {
            let rep = |x: &Tensor| -> Result<Tensor> {
                let (b, kvh, l, hd) = x.dims4()?;
                Ok(x.unsqueeze(2)?.expand((b, kvh, group, l, hd))?.reshape((
                    b,
                    kvh * group,
                    l,
                    hd,
                ))?)
            };
            (rep(k)?, rep(v)?)
        } else {
            (k.clone(), v.clone())
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let mut att = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
        if t > 1 {
            let past = l - t;
            let mask: Vec<f32> = (0..t)
                .flat_map(|i| {
                    (0..l).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (t, l), q.device())?.to_dtype(att.dtype())?;
            att = att.broadcast_add(&mask)?;
        }
        let att = match kernels {
            Kernels::Fused => candle_nn::ops::softmax_last_dim(&att)?,
            Kernels::Differentiable => candle_nn::ops::softmax(&att, D::Minus1)?,
        };
        Ok(att.matmul(&v.contiguous()?)?)
    }

    fn norm(&self, ln: &RmsNorm, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        Ok(match kernels {
            Kernels::Fused => ln.forward(x)?,
            Kernels::Differentiable => {
                candle_nn::ops::rms_norm_slow(x, ln.weight(), self.cfg.eps as f32)?
            }
        })
    }

    fn mlp(&self, b: &Block, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let h = self.norm(&b.ln2, x, kernels)?;
        let y = (kernels.linear(&b.gate, &h)?.silu()? * kernels.linear(&b.up, &h)?)?;
        Ok((x + kernels.linear(&b.down, &y)?)?)
    }

    /// Runs x (1, T, hidden) at `positions` after what `cache` holds, and
    /// appends to it. Returns (1, T, hidden) before any final norm.
    pub fn forward(
        &self,
        x: &Tensor,
        positions: &[Position],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.forward_with(x, positions, cache, Kernels::Fused)
    }

    /// [`Stack::forward`] with the chosen kernels.
    pub fn forward_with(
        &self,
        x: &Tensor,
        positions: &[Position],
        cache: &mut KvCache,
        kernels: Kernels,
    ) -> Result<Tensor> {
        let (cos, sin) = self.rotary.cos_sin(positions, x.device())?;
        let mut x = x.clone();
        for (i, b) in self.blocks.iter().enumerate() {
            let h = self.norm(&b.ln1, &x, kernels)?;
            let rot = |t: &Tensor, heads: usize| {
                self.rotary
                    .apply_with(&self.heads(t, heads)?, &cos, &sin, kernels)
            };
            let q = rot(&kernels.linear(&b.q, &h)?, self.cfg.heads)?;
            let k = rot(&kernels.linear(&b.k, &h)?, self.cfg.kv_heads)?;
            let v = self.heads(&kernels.linear(&b.v, &h)?, self.cfg.kv_heads)?;
            let (k, v) = match &cache.layers[i] {
                Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
                None => (k, v),
            };
            let y = self.attend(&q, &k, &v, kernels)?;
            cache.layers[i] = Some((k, v));
            let (bsz, _, t, _) = y.dims4()?;
            let y = y.transpose(1, 2)?.reshape((bsz, t, self.cfg.hidden))?;
            x = (x + kernels.linear(&b.o, &y)?)?;
            x = self.mlp(b, &x, kernels)?;
        }
        cache.len += positions.len();
        Ok(x)
    }

    /// One new token for each of several sequences: x (B, 1, hidden), one
    /// position and one cache per row. Projections and MLPs run batched;
    /// attention runs per sequence over its own cache length.
    pub fn step_batch(
        &self,
        x: &Tensor,
        positions: &[Position],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let n = caches.len();
        let (cos, sin) = self.rotary.cos_sin(positions, x.device())?;
        let mut x = x.clone();
        for (i, b) in self.blocks.iter().enumerate() {
            let h = b.ln1.forward(&x)?;
            // (B, 1, H*hd) → (1, H, B, hd): the batch rides in the time axis for the rotation.
            let rot = |t: Tensor, heads: usize| -> Result<Tensor> {
                let t = t
                    .reshape((n, heads, self.head_dim))?
                    .transpose(0, 1)?
                    .unsqueeze(0)?;
                self.rotary.apply(&t, &cos, &sin)
            };
            let q = rot(b.q.forward(&h)?, self.cfg.heads)?;
            let k = rot(b.k.forward(&h)?, self.cfg.kv_heads)?;
            let v =
                b.v.forward(&h)?
                    .reshape((n, self.cfg.kv_heads, self.head_dim))?
                    .transpose(0, 1)?
                    .unsqueeze(0)?;
            let mut ys = Vec::with_capacity(n);
            for (s, cache) in caches.iter_mut().enumerate() {
                let qs = q.narrow(2, s, 1)?;
                let ks = k.narrow(2, s, 1)?.contiguous()?;
                let vs = v.narrow(2, s, 1)?.contiguous()?;
                let (ks, vs) = match &cache.layers[i] {
                    Some((pk, pv)) => (Tensor::cat(&[pk, &ks], 2)?, Tensor::cat(&[pv, &vs], 2)?),
                    None => (ks, vs),
                };
                ys.push(self.attend(&qs.contiguous()?, &ks, &vs, Kernels::Fused)?);
                cache.layers[i] = Some((ks, vs));
            }
            // each (1, H, 1, hd) → (B, 1, H*hd)
            let y = Tensor::cat(&ys, 0)?.reshape((n, 1, self.cfg.hidden))?;
            x = (x + b.o.forward(&y)?)?;
            x = self.mlp(b, &x, Kernels::Fused)?;
        }
        for c in caches.iter_mut() {
            c.len += 1;
        }
        Ok(x)
    }
}

/// Greedy choice over the last axis of a 1-D logits tensor.
pub fn argmax(logits: &Tensor) -> Result<u32> {
    Ok(logits
        .to_dtype(DType::F32)?
        .argmax(D::Minus1)?
        .to_scalar::<u32>()?)
}
