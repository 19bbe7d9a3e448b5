//! A Qwen2 decoder over GGUF quantised weights whose key/value cache is a
//! value the caller holds: a prompt prefix computed once can be cloned for
//! every request that starts with it (the translation prompt's instruction
//! and examples), and several sequences at different lengths can take one
//! decoding step together ([`QwenLm::step_batch`]), their matrix products
//! batched.
//!
//! Architecture (as GGUF names it): token embedding; per block an RMS-normed
//! attention with biased q/k/v projections, grouped key/value heads and
//! rotary positions in the half-split ("NeoX") layout, then an RMS-normed
//! SwiGLU feed-forward; a final RMS norm and the output projection (tied to
//! the embedding when the file has no `output.weight`). Checked against
//! candle's own quantised Qwen2 on the real GGUF (tests/qwen_real.rs).

use std::io::{Read, Seek};

use candle_core::quantized::{QMatMul, QTensor, gguf_file};
use candle_core::{D, DType, Device, Module, Tensor};

use crate::error::{ModelError, Result};
use crate::q8::Q8Matrix;

/// Which kernel multiplies Q8_0 weights on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Products {
    /// [`Q8Matrix`]: each weight block read once for all of a prompt's rows.
    #[default]
    Q8Rows,
    /// candle's own quantised product (the benchmarks' anchor).
    Candle,
}

/// A projection: Q8_0 weights on the CPU through [`Q8Matrix`] unless told
/// otherwise, anything else through candle's quantised product.
enum Linear {
    Q8(Q8Matrix),
    Candle(QMatMul),
}

impl Linear {
    fn new(t: QTensor, device: &Device, products: Products) -> Result<Self> {
        if device.is_cpu()
            && products == Products::Q8Rows
            && let Some(m) = Q8Matrix::from_qtensor(&t)?
        {
            return Ok(Self::Q8(m));
        }
        Ok(Self::Candle(QMatMul::from_qtensor(t).map_err(load_err)?))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Q8(m) => m.forward(&x.contiguous()?),
            Self::Candle(m) => Ok(m.forward(x)?),
        }
    }
}

/// Positions a sequence may reach: the rotary tables are sized to this. A
/// text translation request's longest text (its byte count bounds its
/// tokens) plus the prompt fits.
pub const MAX_POSITIONS: usize = 16_384;

/// Tokens a prefill runs at once: longer prompts run in pieces, so the
/// attention scores of one piece (heads × piece × positions) stay bounded
/// whatever the prompt's length.
pub const PREFILL_CHUNK: usize = 256;

struct Block {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    bq: Option<Tensor>,
    bk: Option<Tensor>,
    bv: Option<Tensor>,
    o: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// The model.
pub struct QwenLm {
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    device: Device,
}

/// Keys and values of one sequence, per block: `[1, kv_heads, len, head_dim]`.
/// Cloning is cheap (tensors are shared) and the clone grows on its own.
#[derive(Debug, Clone, Default)]
pub struct Cache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl Cache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has run yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the cache holds.
    pub fn bytes(&self) -> usize {
        self.kv
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}

impl std::fmt::Debug for QwenLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QwenLm")
            .field("blocks", &self.blocks.len())
            .field("heads", &self.heads)
            .field("kv_heads", &self.kv_heads)
            .field("head_dim", &self.head_dim)
            .finish()
    }
}

fn load_err(e: candle_core::Error) -> ModelError {
    ModelError::Load(e.to_string())
}

impl QwenLm {
    /// Loads a `qwen2` GGUF.
    pub fn from_gguf<R: Read + Seek>(
        ct: &gguf_file::Content,
        r: &mut R,
        device: &Device,
    ) -> Result<Self> {
        Self::from_gguf_with(ct, r, device, Products::default())
    }

    /// Loads a `qwen2` GGUF, its Q8_0 products on the CPU by `products`.
    pub fn from_gguf_with<R: Read + Seek>(
        ct: &gguf_file::Content,
        r: &mut R,
        device: &Device,
        products: Products,
    ) -> Result<Self> {
        let md = |k: &str| {
            ct.metadata
                .get(&format!("qwen2.{k}"))
                .ok_or_else(|| ModelError::Load(format!("GGUF has no qwen2.{k}")))
        };
        let u = |k: &str| -> Result<usize> {
            Ok(md(k)?
                .to_u32()
                .map_err(|e| ModelError::Load(format!("qwen2.{k}: {e}")))? as usize)
        };
        let heads = u("attention.head_count")?;
        let kv_heads = u("attention.head_count_kv")?;
        let hidden = u("embedding_length")?;
        let blocks = u("block_count")?;
        let eps = md("attention.layer_norm_rms_epsilon")?
            .to_f32()
            .map_err(|e| ModelError::Load(e.to_string()))?;
        let base = md("rope.freq_base")
            .ok()
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(10_000.0);
        if heads == 0 || kv_heads == 0 || hidden % heads != 0 || heads % kv_heads != 0 {
            return Err(ModelError::Load(format!(
                "GGUF heads {heads}/{kv_heads} do not divide hidden size {hidden}"
            )));
        }
        let head_dim = hidden / heads;
        let mut qt = |name: &str| ct.tensor(r, name, device).map_err(load_err);
        let f32_of = |t: candle_core::quantized::QTensor| t.dequantize(device).map_err(load_err);
        // The embedding table is read by rows: kept as f16 it takes half the
        // memory of f32 and rows convert on the way out.
        let embed_q = qt("token_embd.weight")?;
        let embed = embed_q
            .dequantize(device)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(load_err)?;
        let output = match ct.tensor_infos.contains_key("output.weight") {
            true => Linear::new(qt("output.weight")?, device, products)?,
            false => Linear::new(embed_q, device, products)?,
        };
        let norm = f32_of(qt("output_norm.weight")?)?;
        let mut bs = Vec::with_capacity(blocks);
        for i in 0..blocks {
            let p = format!("blk.{i}");
            let mm = |t| Linear::new(t, device, products);
            let has = |n: &str| ct.tensor_infos.contains_key(&format!("{p}.{n}"));
            let (has_bq, has_bk, has_bv) =
                (has("attn_q.bias"), has("attn_k.bias"), has("attn_v.bias"));
            bs.push(Block {
                attn_norm: f32_of(qt(&format!("{p}.attn_norm.weight"))?)?,
                q: mm(qt(&format!("{p}.attn_q.weight"))?)?,
                k: mm(qt(&format!("{p}.attn_k.weight"))?)?,
                v: mm(qt(&format!("{p}.attn_v.weight"))?)?,
                bq: if has_bq {
                    Some(f32_of(qt(&format!("{p}.attn_q.bias"))?)?)
                } else {
                    None
                },
                bk: if has_bk {
                    Some(f32_of(qt(&format!("{p}.attn_k.bias"))?)?)
                } else {
                    None
                },
                bv: if has_bv {
                    Some(f32_of(qt(&format!("{p}.attn_v.bias"))?)?)
                } else {
                    None
                },
                o: mm(qt(&format!("{p}.attn_output.weight"))?)?,
                ffn_norm: f32_of(qt(&format!("{p}.ffn_norm.weight"))?)?,
                gate: mm(qt(&format!("{p}.ffn_gate.weight"))?)?,
                up: mm(qt(&format!("{p}.ffn_up.weight"))?)?,
                down: mm(qt(&format!("{p}.ffn_down.weight"))?)?,
            });
        }
        // Rotary tables: angle(t, i) = t / base^(2i / head_dim).
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / base.powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        let mut angles = Vec::with_capacity(MAX_POSITIONS * half);
        for t in 0..MAX_POSITIONS {
            angles.extend(inv.iter().map(|f| t as f32 * f));
        }
        let angles = Tensor::from_vec(angles, (MAX_POSITIONS, half), device)?;
        Ok(Self {
            embed,
            blocks: bs,
            norm,
            output,
            cos: angles.cos()?,
            sin: angles.sin()?,
            heads,
            kv_heads,
            head_dim,
            eps,
            device: device.clone(),
        })
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> Cache {
        Cache {
            kv: vec![None; self.blocks.len()],
            len: 0,
        }
    }

    fn rms(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, w, self.eps)?)
    }

    fn project(&self, m: &Linear, b: Option<&Tensor>, x: &Tensor) -> Result<Tensor> {
        let y = m.forward(x)?;
        Ok(match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// Attention of one sequence: `q` `[1, L, heads*hd]`, `k`/`v`
    /// `[1, L, kv_heads*hd]` at positions `pos..pos+L`, its cache grown.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        slot: &mut Option<(Tensor, Tensor)>,
        pos: usize,
    ) -> Result<Tensor> {
        let l = q.dim(1)?;
        let hd = self.head_dim;
        let heads = |x: &Tensor, n: usize| -> Result<Tensor> {
            Ok(x.reshape((1, l, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let (cos, sin) = (self.cos.narrow(0, pos, l)?, self.sin.narrow(0, pos, l)?);
        let q = candle_nn::rotary_emb::rope(&heads(q, self.heads)?, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope(&heads(k, self.kv_heads)?, &cos, &sin)?;
        let v = heads(v, self.kv_heads)?;
        let (k, v) = match slot.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        *slot = Some((k.clone(), v.clone()));
        let rep = self.heads / self.kv_heads;
        let k = repeat_kv(k, rep)?.contiguous()?;
        let v = repeat_kv(v, rep)?.contiguous()?;
        let total = pos + l;
        let mut att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        if l > 1 {
            // Query i (at position pos + i) sees keys up to pos + i.
            let mask: Vec<f32> = (0..l)
                .flat_map(|i| {
                    (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (l, total), &self.device)?;
            att = att.broadcast_add(&mask)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        Ok(att
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((1, l, self.heads * hd))?)
    }

    fn check_room(&self, cache: &Cache, n: usize) -> Result<()> {
        if cache.len + n > MAX_POSITIONS {
            return Err(ModelError::Input(format!(
                "the prompt and reply need {} positions; the limit is {MAX_POSITIONS}",
                cache.len + n
            )));
        }
        Ok(())
    }

    /// Runs `ids` after what `cache` holds and returns the logits of the
    /// last position (`[vocab]`).
    pub fn forward(&self, ids: &[u32], cache: &mut Cache) -> Result<Tensor> {
        self.forward_in_pieces(ids, cache, PREFILL_CHUNK)
    }

    /// [`Self::forward`] with the prompt run in pieces of `piece` tokens
    /// (at least 1): the same logits as one whole run, within rounding.
    pub fn forward_in_pieces(
        &self,
        ids: &[u32],
        cache: &mut Cache,
        piece: usize,
    ) -> Result<Tensor> {
        if ids.is_empty() {
            return Err(ModelError::Input("no tokens to run".into()));
        }
        self.check_room(cache, ids.len())?;
        let mut chunks = ids.chunks(piece.max(1));
        let last = chunks.next_back().unwrap_or(ids);
        for c in chunks {
            self.forward_piece(c, cache)?;
        }
        self.forward_piece(last, cache)
    }

    fn forward_piece(&self, ids: &[u32], cache: &mut Cache) -> Result<Tensor> {
        if cache.kv.len() != self.blocks.len() {
            *cache = self.new_cache();
        }
        let pos = cache.len;
        let l = ids.len();
        let ids_t = Tensor::new(ids, &self.device)?;
        let mut x = self
            .embed
            .index_select(&ids_t, 0)?
            .to_dtype(DType::F32)?
            .unsqueeze(0)?;
        for (b, slot) in self.blocks.iter().zip(cache.kv.iter_mut()) {
            let h = self.rms(&x, &b.attn_norm)?;
            let q = self.project(&b.q, b.bq.as_ref(), &h)?;
            let k = self.project(&b.k, b.bk.as_ref(), &h)?;
            let v = self.project(&b.v, b.bv.as_ref(), &h)?;
            let a = self.attend(&q, &k, &v, slot, pos)?;
            x = (x + b.o.forward(&a)?)?;
            x = (&x + self.ffn(b, &x)?)?;
        }
        cache.len += l;
        let last = x.narrow(1, l - 1, 1)?;
        let last = self.rms(&last, &self.norm)?;
        Ok(self.output.forward(&last)?.squeeze(0)?.squeeze(0)?)
    }

    fn ffn(&self, b: &Block, x: &Tensor) -> Result<Tensor> {
        let h = self.rms(x, &b.ffn_norm)?;
        let g = candle_nn::ops::silu(&b.gate.forward(&h)?)?;
        b.down.forward(&(g * b.up.forward(&h)?)?)
    }

    /// One token for each of several sequences at once (each at its own
    /// length); returns their next-token logits `[n, vocab]`. The
    /// projections and the output run as one batch; attention per sequence.
    pub fn step_batch(&self, tokens: &[u32], caches: &mut [&mut Cache]) -> Result<Tensor> {
        let n = tokens.len();
        if n == 0 || n != caches.len() {
            return Err(ModelError::Input(format!(
                "{n} tokens for {} sequences",
                caches.len()
            )));
        }
        for c in caches.iter_mut() {
            self.check_room(c, 1)?;
            if c.kv.len() != self.blocks.len() {
                **c = self.new_cache();
            }
        }
        let ids_t = Tensor::new(tokens, &self.device)?;
        // [n, 1, hidden]: each sequence a batch row of length one.
        let mut x = self
            .embed
            .index_select(&ids_t, 0)?
            .to_dtype(DType::F32)?
            .unsqueeze(1)?;
        for (bi, b) in self.blocks.iter().enumerate() {
            let h = self.rms(&x, &b.attn_norm)?;
            let q = self.project(&b.q, b.bq.as_ref(), &h)?;
            let k = self.project(&b.k, b.bk.as_ref(), &h)?;
            let v = self.project(&b.v, b.bv.as_ref(), &h)?;
            let mut outs = Vec::with_capacity(n);
            for (i, c) in caches.iter_mut().enumerate() {
                let pos = c.len;
                outs.push(self.attend(
                    &q.narrow(0, i, 1)?,
                    &k.narrow(0, i, 1)?,
                    &v.narrow(0, i, 1)?,
                    &mut c.kv[bi],
                    pos,
                )?);
            }
            let a = Tensor::cat(&outs, 0)?;
            x = (x + b.o.forward(&a)?)?;
            x = (&x + self.ffn(b, &x)?)?;
        }
        for c in caches.iter_mut() {
            c.len += 1;
        }
        let x = self.rms(&x, &self.norm)?;
        Ok(self.output.forward(&x)?.squeeze(1)?)
    }

    /// Index of the largest logit.
    pub fn argmax(logits: &Tensor) -> Result<u32> {
        Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?)
    }
}

/// Grouped-query attention's keys or values for every query head:
/// `(batch, kv_heads, seq, head_dim)` to `(batch, kv_heads * rep, seq, head_dim)`,
/// each key/value head repeated for the `rep` query heads that share it.
/// Concatenating along the sequence and reshaping puts the copies of one head
/// next to each other without a strided copy.
fn repeat_kv(x: Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x);
    }
    let (b, kv_heads, seq, hd) = x.dims4()?;
    let copies = vec![&x; rep];
    Ok(Tensor::cat(&copies, 2)?.reshape((b, kv_heads * rep, seq, hd))?)
}
