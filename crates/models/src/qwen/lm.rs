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

use rayon::prelude::*;

use crate::error::{ModelError, Result};
use crate::ops::dot;
use crate::q8::{Layout, Q8Matrix};

/// Which kernel multiplies Q8_0 weights on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Products {
    /// [`Q8Matrix`] in this CPU's fastest layout ([`Layout::best`]: packed
    /// for AVX-512 VNNI where the CPU has it).
    #[default]
    Q8,
    /// [`Q8Matrix`] in its row layout (the AVX2 kernel) whatever the CPU:
    /// each weight block read once for all of a prompt's rows.
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
        let layout = match products {
            Products::Q8 => Some(Layout::best()),
            Products::Q8Rows => Some(Layout::Rows),
            Products::Candle => None,
        };
        if device.is_cpu()
            && let Some(layout) = layout
            && let Some(m) = Q8Matrix::from_qtensor_in(&t, layout)?
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
    /// The rotary tables on the host, `[MAX_POSITIONS, head_dim / 2]`.
    cos_host: Vec<f32>,
    sin_host: Vec<f32>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    device: Device,
}

/// Keys (after their rotation) and values of one block, entry by entry:
/// entry `t` holds `kv_heads × head_dim` keys at `t * width` of `k`, its
/// values at the same place of `v`.
#[derive(Debug, Clone, Default)]
struct Kv {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Keys and values of one sequence, per block, kept on the host whatever
/// the model's device: a token step appends to them in place, and a CPU
/// step reads them where they lie ([`attend_one`]).
///
/// Entries computed for a prompt prefix shared by many sequences sit in
/// `base`, shared by every clone ([`Cache::share`]); a sequence's own
/// entries follow in `own`, so a clone copies only those. Entries can be
/// dropped from the front of `own` ([`Cache::drop_front`]): positions are
/// never reused, so the entries left keep the positions they were computed
/// at, and the sequence goes on at the next one (a conversation that
/// forgets its oldest turns).
#[derive(Debug, Clone, Default)]
pub struct Cache {
    base: Option<std::sync::Arc<Vec<Kv>>>,
    base_entries: usize,
    own: Vec<Kv>,
    own_entries: usize,
    width: usize,
    pos: usize,
}

impl Cache {
    /// Positions used: the next token goes at this position.
    pub fn len(&self) -> usize {
        self.pos
    }

    /// Whether nothing has run yet.
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Entries held (positions used less those dropped).
    pub fn entries(&self) -> usize {
        self.base_entries + self.own_entries
    }

    /// Entries of the sequence's own, after the shared ones.
    pub fn own_entries(&self) -> usize {
        self.own_entries
    }

    /// Bytes the cache holds, the shared entries included.
    pub fn bytes(&self) -> usize {
        let kv = |l: &Kv| (l.k.len() + l.v.len()) * std::mem::size_of::<f32>();
        self.base
            .iter()
            .flat_map(|b| b.iter())
            .map(kv)
            .sum::<usize>()
            + self.own.iter().map(kv).sum::<usize>()
    }

    /// Bytes of the sequence's own entries.
    pub fn own_bytes(&self) -> usize {
        self.own
            .iter()
            .map(|l| (l.k.len() + l.v.len()) * std::mem::size_of::<f32>())
            .sum()
    }

    /// The same cache with every entry shared: its clones copy nothing
    /// until they grow, and then only what they add.
    pub fn share(self) -> Self {
        if self.own_entries == 0 {
            return self;
        }
        let own = self.own;
        let layers = match self.base {
            None => own,
            Some(b) => b
                .iter()
                .zip(own)
                .map(|(b, o)| Kv {
                    k: [b.k.as_slice(), &o.k].concat(),
                    v: [b.v.as_slice(), &o.v].concat(),
                })
                .collect(),
        };
        let blocks = layers.len();
        Self {
            base: Some(std::sync::Arc::new(layers)),
            base_entries: self.base_entries + self.own_entries,
            own: vec![Kv::default(); blocks],
            own_entries: 0,
            width: self.width,
            pos: self.pos,
        }
    }

    /// Drops the first `n` of the sequence's own entries (at most all of
    /// them); the shared ones and the position stay.
    pub fn drop_front(&mut self, n: usize) {
        let n = n.min(self.own_entries);
        for l in &mut self.own {
            l.k.drain(..n * self.width);
            l.v.drain(..n * self.width);
        }
        self.own_entries -= n;
    }

    /// Block `b`'s shared and own entries.
    fn block(&self, b: usize) -> (&[f32], &[f32], &[f32], &[f32]) {
        let (bk, bv) = match &self.base {
            Some(base) => (base[b].k.as_slice(), base[b].v.as_slice()),
            None => (&[][..], &[][..]),
        };
        (bk, bv, &self.own[b].k, &self.own[b].v)
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
        let cos_host: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin_host: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        Ok(Self {
            embed,
            blocks: bs,
            norm,
            output,
            cos: Tensor::from_slice(&cos_host, (MAX_POSITIONS, half), device)?,
            sin: Tensor::from_slice(&sin_host, (MAX_POSITIONS, half), device)?,
            cos_host,
            sin_host,
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
            own: vec![Kv::default(); self.blocks.len()],
            width: self.kv_heads * self.head_dim,
            ..Cache::default()
        }
    }

    /// `cache` as it is when it fits this model, else a new one.
    fn fit(&self, cache: &mut Cache) {
        if cache.own.len() != self.blocks.len() || cache.width != self.kv_heads * self.head_dim {
            *cache = self.new_cache();
        }
    }

    fn shape(&self) -> Shape {
        Shape {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
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

    /// Attention of one sequence over `l` new positions by tensor
    /// operations (any device): `q` `[1, L, heads*hd]`, `k`/`v`
    /// `[1, L, kv_heads*hd]` at positions `cache.len()..+L`; their keys and
    /// values are appended to block `b` of `cache`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &mut Cache,
        b: usize,
    ) -> Result<Tensor> {
        let l = q.dim(1)?;
        let hd = self.head_dim;
        let heads = |x: &Tensor, n: usize| -> Result<Tensor> {
            Ok(x.reshape((1, l, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let pos = cache.pos;
        let (cos, sin) = (self.cos.narrow(0, pos, l)?, self.sin.narrow(0, pos, l)?);
        let q = candle_nn::rotary_emb::rope(&heads(q, self.heads)?, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope(&heads(k, self.kv_heads)?, &cos, &sin)?;
        // Entry by entry, as the cache keeps them.
        let k_rows: Vec<f32> = k.transpose(1, 2)?.flatten_all()?.to_vec1()?;
        let v_rows: Vec<f32> = v.flatten_all()?.to_vec1()?;
        cache.own[b].k.extend_from_slice(&k_rows);
        cache.own[b].v.extend_from_slice(&v_rows);
        let (bk, bv, ok, ov) = cache.block(b);
        let total = (bk.len() + ok.len()) / cache.width;
        let all = |s: &[f32], o: &[f32]| -> Result<Tensor> {
            let t = Tensor::from_vec([s, o].concat(), (total, self.kv_heads, hd), &self.device)?;
            Ok(t.transpose(0, 1)?.unsqueeze(0)?.contiguous()?)
        };
        let rep = self.heads / self.kv_heads;
        let k = repeat_kv(all(bk, ok)?, rep)?.contiguous()?;
        let v = repeat_kv(all(bv, ov)?, rep)?.contiguous()?;
        let mut att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        if l > 1 {
            // Every entry held before sees nothing new; new query i sees
            // the new keys up to its own.
            let before = total - l;
            let mask: Vec<f32> = (0..l)
                .flat_map(|i| {
                    (0..total).map(move |j| {
                        if j > before + i {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
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
        if cache.pos + n > MAX_POSITIONS {
            return Err(ModelError::Input(format!(
                "the prompt and reply need {} positions; the limit is {MAX_POSITIONS}",
                cache.pos + n
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
        let l = ids.len();
        if l == 1 {
            // A token step: the batched step's path, as a batch of one.
            return Ok(self.step_batch(ids, &mut [cache])?.squeeze(0)?);
        }
        self.fit(cache);
        let ids_t = Tensor::new(ids, &self.device)?;
        let mut x = self
            .embed
            .index_select(&ids_t, 0)?
            .to_dtype(DType::F32)?
            .unsqueeze(0)?;
        for (bi, b) in self.blocks.iter().enumerate() {
            let h = self.rms(&x, &b.attn_norm)?;
            let q = self.project(&b.q, b.bq.as_ref(), &h)?;
            let k = self.project(&b.k, b.bk.as_ref(), &h)?;
            let v = self.project(&b.v, b.bv.as_ref(), &h)?;
            let a = self.attend(&q, &k, &v, cache, bi)?;
            x = (x + b.o.forward(&a)?)?;
            x = (&x + self.ffn(b, &x)?)?;
        }
        cache.own_entries += l;
        cache.pos += l;
        let last = x.narrow(1, l - 1, 1)?;
        let last = self.rms(&last, &self.norm)?;
        Ok(self.output.forward(&last)?.squeeze(0)?.squeeze(0)?)
    }

    fn ffn(&self, b: &Block, x: &Tensor) -> Result<Tensor> {
        let h = self.rms(x, &b.ffn_norm)?;
        let g = candle_nn::ops::silu(&b.gate.forward(&h)?)?;
        b.down.forward(&(g * b.up.forward(&h)?)?)
    }

    /// The rotary tables and head shape a host attention step needs.
    fn rope_tables(&self) -> HostStep<'_> {
        HostStep {
            cos: &self.cos_host,
            sin: &self.sin_host,
            shape: self.shape(),
        }
    }

    /// One token for each of several sequences at once (each at its own
    /// position); returns their next-token logits `[n, vocab]`. The
    /// projections and the output run as one batch. Attention is per
    /// sequence: on the CPU by [`attend_one`] over the cache where it
    /// lies, the sequences in parallel; elsewhere by tensor operations.
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
            self.fit(c);
        }
        let on_host = self.device.is_cpu();
        let (qd, kd) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
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
            let a = if on_host {
                let mut q: Vec<f32> = q.flatten_all()?.to_vec1()?;
                let mut k: Vec<f32> = k.flatten_all()?.to_vec1()?;
                let v: Vec<f32> = v.flatten_all()?.to_vec1()?;
                let step = self.rope_tables();
                let out: Vec<f32> = q
                    .par_chunks_mut(qd)
                    .zip(k.par_chunks_mut(kd))
                    .zip(v.par_chunks(kd))
                    .zip(caches.par_iter_mut())
                    .flat_map_iter(|(((q, k), v), c)| step.step(q, k, v, c, bi))
                    .collect();
                Tensor::from_vec(out, (n, 1, qd), &self.device)?
            } else {
                let mut outs = Vec::with_capacity(n);
                for (i, c) in caches.iter_mut().enumerate() {
                    outs.push(self.attend(
                        &q.narrow(0, i, 1)?,
                        &k.narrow(0, i, 1)?,
                        &v.narrow(0, i, 1)?,
                        c,
                        bi,
                    )?);
                }
                Tensor::cat(&outs, 0)?
            };
            x = (x + b.o.forward(&a)?)?;
            x = (&x + self.ffn(b, &x)?)?;
        }
        for c in caches.iter_mut() {
            c.own_entries += 1;
            c.pos += 1;
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

/// The head counts and width of the attention.
#[derive(Debug, Clone, Copy)]
struct Shape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// What one token's attention on the host needs besides its cache.
#[derive(Clone, Copy)]
struct HostStep<'a> {
    cos: &'a [f32],
    sin: &'a [f32],
    shape: Shape,
}

impl HostStep<'_> {
    /// Rotates `q` (`heads × head_dim`) and `k` (`kv_heads × head_dim`) to
    /// the cache's next position, appends `k` and `v` to block `b` of
    /// `cache` (its entry count is the caller's to advance, once for every
    /// block), and returns the attention output (`heads × head_dim`).
    fn step(
        &self,
        q: &mut [f32],
        k: &mut [f32],
        v: &[f32],
        cache: &mut Cache,
        b: usize,
    ) -> Vec<f32> {
        let hd = self.shape.head_dim;
        let half = hd / 2;
        let at = cache.pos * half;
        let (cos, sin) = (&self.cos[at..at + half], &self.sin[at..at + half]);
        for h in q.chunks_exact_mut(hd).chain(k.chunks_exact_mut(hd)) {
            rotate(h, cos, sin);
        }
        cache.own[b].k.extend_from_slice(k);
        cache.own[b].v.extend_from_slice(v);
        let (bk, bv, ok, ov) = cache.block(b);
        attend_one(q, [bk, ok], [bv, ov], self.shape)
    }
}

/// The half-split ("NeoX") rotation of one head at one position, as
/// candle's `rope`: the first half `a` and second half `b` become
/// `a·cos − b·sin` and `b·cos + a·sin`.
fn rotate(h: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = h.len() / 2;
    let (a, b) = h.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x2 * cos[i] + x1 * sin[i];
    }
}

/// Attention of one query position over the entries of `ks`/`vs` (each
/// given in parts, read in order as one sequence), by plain loops the
/// compiler vectorises: for each key/value head, the query heads sharing
/// it score every entry, take the softmax, and sum the values by it. The
/// cache is read where it lies, once per key/value head, where a tensor
/// step would copy it for every query head.
fn attend_one(q: &[f32], ks: [&[f32]; 2], vs: [&[f32]; 2], shape: Shape) -> Vec<f32> {
    let Shape {
        heads,
        kv_heads,
        head_dim: hd,
    } = shape;
    let width = kv_heads * hd;
    let rep = heads / kv_heads;
    let n = (ks[0].len() + ks[1].len()) / width;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; heads * hd];
    let mut scores = vec![0f32; rep * n];
    for g in 0..kv_heads {
        let qs = &q[g * rep * hd..(g + 1) * rep * hd];
        let rows = ks.iter().flat_map(|p| p.chunks_exact(width));
        for (t, row) in rows.enumerate() {
            let key = &row[g * hd..(g + 1) * hd];
            for (r, qh) in qs.chunks_exact(hd).enumerate() {
                scores[r * n + t] = dot(qh, key) * scale;
            }
        }
        for s in scores.chunks_exact_mut(n.max(1)) {
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for x in s.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            for x in s.iter_mut() {
                *x /= sum;
            }
        }
        let o = &mut out[g * rep * hd..(g + 1) * rep * hd];
        let rows = vs.iter().flat_map(|p| p.chunks_exact(width));
        for (t, row) in rows.enumerate() {
            let value = &row[g * hd..(g + 1) * hd];
            for (r, oh) in o.chunks_exact_mut(hd).enumerate() {
                let p = scores[r * n + t];
                for (y, x) in oh.iter_mut().zip(value) {
                    *y += p * x;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::q8::tests::lcg as noise;

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    }

    /// The host step's attention, over entries held in two parts, equals
    /// softmax(q·Kᵀ/√d)·V by candle's tensor operations with every key and
    /// value head repeated for the query heads that share it.
    #[test]
    fn host_attention_equals_the_tensor_product() {
        let shape = Shape {
            heads: 6,
            kv_heads: 2,
            head_dim: 16,
        };
        let (n, width) = (37, 2 * 16);
        let q = noise(6 * 16, 1);
        let k = noise(n * width, 2);
        let v = noise(n * width, 3);
        let split = 11 * width;
        let ours = attend_one(
            &q,
            [&k[..split], &k[split..]],
            [&v[..split], &v[split..]],
            shape,
        );
        let dev = Device::Cpu;
        let q = Tensor::from_vec(q, (6, 1, 16), &dev).unwrap();
        let heads = |x: Vec<f32>| {
            let t = Tensor::from_vec(x, (n, 2, 16), &dev)
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            repeat_kv(t.contiguous().unwrap(), 3)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (kt, vt) = (heads(k), heads(v));
        let att = (q.matmul(&kt.t().unwrap()).unwrap() / 4.0).unwrap();
        let att = candle_nn::ops::softmax_last_dim(&att).unwrap();
        let theirs = flat(&att.matmul(&vt).unwrap());
        let d = max_diff(&ours, &theirs);
        assert!(d < 1e-5, "differs by {d}");
    }

    /// The host rotation equals candle's `rope` at the same position.
    #[test]
    fn host_rotation_equals_candles_rope() {
        let (hd, pos, positions) = (16, 5, 8);
        let angles: Vec<f32> = (0..positions)
            .flat_map(|t| {
                (0..hd / 2).map(move |i| t as f32 / 10_000f32.powf(2.0 * i as f32 / hd as f32))
            })
            .collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let x = noise(3 * hd, 4);
        let mut ours = x.clone();
        for h in ours.chunks_exact_mut(hd) {
            rotate(
                h,
                &cos[pos * hd / 2..][..hd / 2],
                &sin[pos * hd / 2..][..hd / 2],
            );
        }
        let dev = Device::Cpu;
        let t = |v: &[f32]| Tensor::from_slice(v, (positions, hd / 2), &dev).unwrap();
        let xt = Tensor::from_vec(x, (1, 3, 1, hd), &dev).unwrap();
        let theirs = flat(
            &candle_nn::rotary_emb::rope(
                &xt,
                &t(&cos).narrow(0, pos, 1).unwrap(),
                &t(&sin).narrow(0, pos, 1).unwrap(),
            )
            .unwrap(),
        );
        let d = max_diff(&ours, &theirs);
        assert!(d < 1e-6, "differs by {d}");
    }

    /// A shared cache's clones copy none of its entries; dropping entries
    /// from a clone's front keeps the shared ones and the position.
    #[test]
    fn shared_entries_stay_and_own_ones_drop_from_the_front() {
        let width = 4;
        let own = |vals: &[f32]| Kv {
            k: vals.to_vec(),
            v: vals.iter().map(|x| -x).collect(),
        };
        let cache = Cache {
            own: vec![own(&[1.0; 8]), own(&[2.0; 8])],
            own_entries: 2,
            width,
            pos: 2,
            ..Cache::default()
        }
        .share();
        assert_eq!(
            (cache.entries(), cache.own_entries(), cache.len()),
            (2, 0, 2)
        );
        let mut a = cache.clone();
        for (b, l) in a.own.iter_mut().enumerate() {
            l.k.extend((0..12).map(|i| (10 * b + i) as f32));
            l.v.extend((0..12).map(|i| -((10 * b + i) as f32)));
        }
        a.own_entries = 3;
        a.pos = 7;
        a.drop_front(2);
        assert_eq!((a.entries(), a.own_entries(), a.len()), (3, 1, 7));
        let (bk, bv, ok, ov) = a.block(1);
        assert_eq!((bk, ok), (&[2.0; 8][..], &[18.0, 19.0, 20.0, 21.0][..]));
        assert_eq!((bv.len(), ov), (8, &[-18.0, -19.0, -20.0, -21.0][..]));
        // The shared entries are one allocation for both.
        assert!(std::sync::Arc::ptr_eq(
            cache.base.as_ref().unwrap(),
            a.base.as_ref().unwrap()
        ));
        a.drop_front(5);
        assert_eq!((a.entries(), a.own_entries()), (2, 0));
    }
}
