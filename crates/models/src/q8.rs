//! Q8_0 matrix products on the CPU that read each weight block once for all
//! of a product's rows.
//!
//! ggml's Q8_0 keeps a matrix in blocks of 32 signed bytes with one scale
//! each. candle 0.11 multiplies such a matrix with one dot product call per
//! (row, column) pair that converts both blocks' f16 scales on every call,
//! so a prompt of N tokens costs N single-token passes (measured on
//! Qwen2.5-0.5B: 29-31 ms per token at 1, 16, 64 and 160 tokens,
//! `nexus bench translate --prefill`), and where the fleet serves, those
//! kernels run on the calling thread only (`threads.rs`).
//!
//! Here each block's scale is held as an f32, the activations are
//! quantised to the same blocks once per product, and the weights are held
//! in one of two layouts ([`Layout`]):
//! - **Rows** (AVX2; a portable loop elsewhere): each row's blocks in
//!   order, so a row is one stream of memory. Two weight rows meet two
//!   activation rows while both sit in registers: per block and pair, a
//!   sign fix-up, one byte multiply-add, one pair add, a conversion, a scale
//!   product and a float multiply-add, then a horizontal sum per pair. A
//!   single row (a decoding step) streams four weight rows at once.
//! - **Packed** (AVX-512 VNNI, detected at run time): sixteen rows
//!   interleaved per block, four bytes of each side by side, so one
//!   `vpdpbusd` takes four activation bytes, broadcast, against all sixteen
//!   rows, and a block's sixteen integer sums land in one register beside
//!   the sixteen rows' scales. The per-block conversion and scaling, which
//!   bound the row layout, are then paid once per sixteen rows, and no
//!   horizontal sums remain. Up to eight activation rows share each loaded
//!   weight register.
//!
//! Both layouts compute each block's exact integer sum and scale it by the
//! same f32 factor; only the float summation order differs. Weight rows
//! (groups of sixteen) are split across rayon's workers, which sleep when
//! idle.
//!
//! Measured on this project's 2-core machine (Intel Xeon with AVX-512 VNNI,
//! two threads, test build), 4864×896, ms per product over two runs:
//! candle at 8 rows 2.2, at 64 rows 18.3; the row layout at 8 rows
//! 0.77-0.80, at 64 rows 7.2-8.4; packed at 8 rows 0.29-0.51, at 64 rows
//! 1.9-2.2 (up to 144 G multiply-adds/s). A single row is bound by
//! reading the weights: 0.2-0.33 ms in either layout, candle 0.33.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::error::{ModelError, Result};

/// Values per block.
pub const BLOCK: usize = 32;
/// Bytes of one stored ggml Q8_0 block: an f16 scale, then 32 bytes.
const STORED_BLOCK: usize = 2 + BLOCK;
/// Multiply-adds below which a product runs on the calling thread.
const SERIAL_BELOW: usize = 1 << 17;
/// Weight rows one worker task takes.
const ROWS_PER_TASK: usize = 32;

/// One block: its scale and 32 values, kept together so a row is one
/// stream of memory.
#[derive(Clone, Copy)]
#[repr(C)]
struct Block {
    d: f32,
    qs: [i8; BLOCK],
}

/// Rows of 8-bit values in blocks of [`BLOCK`] with one scale each.
#[derive(Clone)]
struct Blocks {
    rows: usize,
    cols: usize,
    b: Vec<Block>,
}

impl Blocks {
    #[inline]
    fn row(&self, r: usize) -> &[Block] {
        let nb = self.cols / BLOCK;
        &self.b[r * nb..(r + 1) * nb]
    }

    /// `x` (`rows × cols`, row-major) quantised as ggml does: scale =
    /// largest magnitude / 127, values rounded against it, the scale then
    /// kept at f16 precision (as ggml stores it, so products agree with
    /// ggml's and candle's to the float rounding of their sums).
    fn quantize(x: &[f32], rows: usize, cols: usize) -> Self {
        debug_assert_eq!(x.len(), rows * cols);
        let b = x
            .chunks_exact(BLOCK)
            .map(|src| {
                let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                let mut qs = [0i8; BLOCK];
                for (q, v) in qs.iter_mut().zip(src) {
                    *q = (v * inv).round() as i8;
                }
                Block {
                    d: round_to_f16(d),
                    qs,
                }
            })
            .collect();
        Self { rows, cols, b }
    }
}

/// How a [`Q8Matrix`] holds its blocks; the layout picks the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Each row's blocks in order: the AVX2 kernel (a portable loop where
    /// the build has no AVX2).
    Rows,
    /// Sixteen rows interleaved per block for AVX-512 VNNI ([`Packed`]).
    Packed,
}

impl Layout {
    /// The fastest layout this CPU runs (detected once).
    pub fn best() -> Self {
        static BEST: std::sync::OnceLock<Layout> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| *Self::available().last().unwrap_or(&Layout::Rows))
    }

    /// Every layout this CPU runs, slowest first.
    pub fn available() -> Vec<Self> {
        let mut v = vec![Layout::Rows];
        if packed::runs_here() {
            v.push(Layout::Packed);
        }
        v
    }
}

/// A matrix's Q8_0 blocks for AVX-512 VNNI: rows in groups of [`GROUP`]
/// (the last padded with zero rows), and per group and block the 32 values
/// of its 16 rows as 8 steps of 64 bytes, each step four consecutive
/// values of every row side by side, offset by 128 (`vpdpbusd` multiplies
/// unsigned by signed bytes). One instruction then takes four activation
/// bytes, broadcast, against all 16 rows, and a block's 16 integer sums
/// sit in one register's lanes beside the 16 rows' scales: no horizontal
/// sums, and one conversion and one float multiply-add per block per 16
/// rows (the row layout spends that per block per row).
#[derive(Clone)]
struct Packed {
    groups: usize,
    /// Blocks per row.
    nb: usize,
    /// `groups × nb × 512` bytes.
    q: Vec<u8>,
    /// `groups × nb × 16` scales.
    d: Vec<f32>,
}

/// Rows per packed group: one 512-bit register of 32-bit sums.
const GROUP: usize = 16;
/// Bytes of one packed group's block.
const PACKED_BLOCK: usize = GROUP * BLOCK;

impl Packed {
    fn new(w: &Blocks) -> Self {
        let nb = w.cols / BLOCK;
        let groups = w.rows.div_ceil(GROUP);
        let mut q = vec![0x80u8; groups * nb * PACKED_BLOCK];
        let mut d = vec![0f32; groups * nb * GROUP];
        for r in 0..w.rows {
            let (g, lane) = (r / GROUP, r % GROUP);
            for (b, blk) in w.row(r).iter().enumerate() {
                let at = (g * nb + b) * PACKED_BLOCK;
                for (s, four) in blk.qs.chunks_exact(4).enumerate() {
                    for (e, &v) in four.iter().enumerate() {
                        // v + 128 as an unsigned byte: the top bit flipped.
                        q[at + s * 64 + lane * 4 + e] = (v as u8) ^ 0x80;
                    }
                }
                d[(g * nb + b) * GROUP + lane] = blk.d;
            }
        }
        Self { groups, nb, q, d }
    }
}

/// A weight matrix `(out, in)` in Q8_0 blocks, multiplied as `x · Wᵀ`.
#[derive(Clone)]
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    form: Form,
}

#[derive(Clone)]
enum Form {
    Rows(Blocks),
    Packed(Packed),
}

impl std::fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q8Matrix")
            .field("out", &self.rows)
            .field("in", &self.cols)
            .field("layout", &self.layout())
            .finish()
    }
}

/// `v` rounded to the nearest f16 value (ties to even), as an f32.
fn round_to_f16(v: f32) -> f32 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let a = v.abs();
    if a >= 65_520.0 {
        return f32::INFINITY.copysign(v);
    }
    // f16 keeps 11 significant bits down to 2^-14, then steps of 2^-24.
    let exp = ((a.to_bits() >> 23) & 0xff) as i32 - 127;
    let step = f32::from_bits(((exp.max(-14) - 10 + 127) as u32) << 23);
    ((a / step).round_ties_even() * step).copysign(v)
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    match exp {
        // Zero and subnormals: man × 2^-24.
        0 => {
            let v = man as f32 * f32::powi(2.0, -24);
            if sign == 0 { v } else { -v }
        }
        31 => f32::from_bits(sign | 0x7f80_0000 | (man << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (man << 13)),
    }
}

impl Q8Matrix {
    /// The matrix of a ggml Q8_0 tensor `(out, in)` in this CPU's fastest
    /// layout; `None` for any other format or an input width that is not
    /// whole blocks.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        Self::from_qtensor_in(t, Layout::best())
    }

    /// As [`Q8Matrix::from_qtensor`], in `layout` (on a CPU without AVX-512
    /// VNNI the packed layout runs as plain loops: for tests).
    pub fn from_qtensor_in(t: &QTensor, layout: Layout) -> Result<Option<Self>> {
        if t.dtype() != GgmlDType::Q8_0 {
            return Ok(None);
        }
        let (rows, cols) = t.shape().dims2()?;
        if cols % BLOCK != 0 {
            return Ok(None);
        }
        let data = t.data()?;
        let nb = rows * cols / BLOCK;
        if data.len() != nb * STORED_BLOCK {
            return Err(ModelError::Load(format!(
                "Q8_0 tensor ({rows}, {cols}) holds {} bytes, not {}",
                data.len(),
                nb * STORED_BLOCK
            )));
        }
        let b = data
            .chunks_exact(STORED_BLOCK)
            .map(|b| Block {
                d: f16_to_f32(u16::from_le_bytes([b[0], b[1]])),
                qs: std::array::from_fn(|i| b[2 + i] as i8),
            })
            .collect();
        let blocks = Blocks { rows, cols, b };
        let form = match layout {
            Layout::Rows => Form::Rows(blocks),
            Layout::Packed => Form::Packed(Packed::new(&blocks)),
        };
        Ok(Some(Self { rows, cols, form }))
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.rows
    }

    /// Input width.
    pub fn in_dim(&self) -> usize {
        self.cols
    }

    /// How the blocks are held (which kernel runs).
    pub fn layout(&self) -> Layout {
        match self.form {
            Form::Rows(_) => Layout::Rows,
            Form::Packed(_) => Layout::Packed,
        }
    }

    /// `x · Wᵀ` for `x` of any shape whose last dimension is the input
    /// width; the result has the output width there. CPU, f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some(&k) = dims.last() else {
            return Err(ModelError::Input(
                "a product needs at least one dimension".into(),
            ));
        };
        if k != self.cols {
            return Err(ModelError::Input(format!(
                "input width {k} does not match the weights' {}",
                self.cols
            )));
        }
        let m = x.elem_count() / k.max(1);
        let xs: Vec<f32> = x
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let y = self.matmul(&xs, m);
        let mut out = dims;
        if let Some(last) = out.last_mut() {
            *last = self.rows;
        }
        Ok(Tensor::from_vec(y, out, &Device::Cpu)?)
    }

    /// `x` (`m × in`, row-major) times `Wᵀ`: `m × out`, row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        if m == 0 || self.rows == 0 {
            return Vec::new();
        }
        let xq = Blocks::quantize(x, m, self.cols);
        match &self.form {
            Form::Rows(w) => matmul_rows(w, &xq),
            Form::Packed(p) => matmul_packed(p, self.rows, &xq, packed::runs_here()),
        }
    }
}

/// Whether a product of `macs` multiply-adds runs on the calling thread:
/// waking the pool's workers costs more than they save.
fn serial(macs: usize) -> bool {
    macs < SERIAL_BELOW
}

/// The row layout's product: `m × out`, row-major.
fn matmul_rows(w: &Blocks, xq: &Blocks) -> Vec<f32> {
    let (n, m) = (w.rows, xq.rows);
    // Computed as (out × m), so each task owns a contiguous run of it.
    let mut yt = vec![0f32; n * m];
    if serial(n * w.cols * m) {
        product_rows(w, 0, n, xq, &mut yt);
    } else {
        // A few tasks per worker: fewer, longer ones for a single row.
        let per_task = match m {
            1 => (n / (rayon::current_num_threads() * 4)).max(ROWS_PER_TASK) / 4 * 4,
            _ => ROWS_PER_TASK,
        };
        yt.par_chunks_mut(per_task * m)
            .enumerate()
            .for_each(|(t, chunk)| {
                product_rows(w, t * per_task, chunk.len() / m, xq, chunk);
            });
    }
    if m == 1 {
        return yt;
    }
    let mut y = vec![0f32; m * n];
    for (j, col) in yt.chunks_exact(m).enumerate() {
        for (i, v) in col.iter().enumerate() {
            y[i * n + j] = *v;
        }
    }
    y
}

/// The packed layout's product of a matrix of `n` real rows: `m × n`,
/// row-major; `vnni` takes the AVX-512 kernel where the CPU has it.
fn matmul_packed(p: &Packed, n: usize, xq: &Blocks, vnni: bool) -> Vec<f32> {
    let m = xq.rows;
    // −128 × each activation block's sum: what the weights' offset adds.
    let neg: Vec<i32> =
        xq.b.iter()
            .map(|b| -128 * b.qs.iter().map(|&v| i32::from(v)).sum::<i32>())
            .collect();
    let nb = p.nb;
    let run = |g: usize, out: &mut [f32]| {
        packed::group(
            &p.q[g * nb * PACKED_BLOCK..(g + 1) * nb * PACKED_BLOCK],
            &p.d[g * nb * GROUP..(g + 1) * nb * GROUP],
            &xq.b,
            &neg,
            out,
            vnni,
        );
    };
    // Group by group: (groups × m × 16), so each task owns a contiguous run.
    let per_group = m * GROUP;
    let mut yt = vec![0f32; p.groups * per_group];
    if serial(n * xq.cols * m) {
        for (g, out) in yt.chunks_exact_mut(per_group).enumerate() {
            run(g, out);
        }
    } else {
        let per_task = p.groups.div_ceil(rayon::current_num_threads() * 4).max(1);
        yt.par_chunks_mut(per_task * per_group)
            .enumerate()
            .for_each(|(t, chunk)| {
                for (i, out) in chunk.chunks_exact_mut(per_group).enumerate() {
                    run(t * per_task + i, out);
                }
            });
    }
    if m == 1 {
        yt.truncate(n);
        return yt;
    }
    let mut y = vec![0f32; m * n];
    for (g, rows) in yt.chunks_exact(per_group).enumerate() {
        let width = GROUP.min(n - g * GROUP);
        for (i, row) in rows.chunks_exact(GROUP).enumerate() {
            y[i * n + g * GROUP..i * n + g * GROUP + width].copy_from_slice(&row[..width]);
        }
    }
    y
}

/// Rows `j0..j0 + count` of `w` against every row of `x`, into `out`
/// (`count × x.rows`).
fn product_rows(w: &Blocks, j0: usize, count: usize, x: &Blocks, out: &mut [f32]) {
    let m = x.rows;
    let mut j = 0;
    if m == 1 {
        // One row (a decoding step): the product streams the weights once,
        // four rows side by side.
        while j + 4 <= count {
            let rows = std::array::from_fn(|a| w.row(j0 + j + a));
            out[j..j + 4].copy_from_slice(&kernel::dot_4x1(rows, x.row(0)));
            j += 4;
        }
    }
    // Two weight rows against two activation rows, then what is left.
    while j < count {
        let w0 = w.row(j0 + j);
        let mut i = 0;
        if count - j >= 2 {
            let w1 = w.row(j0 + j + 1);
            while i < m {
                if m - i >= 2 {
                    let [p, q, r, s] = kernel::dot_2x2(w0, w1, x.row(i), x.row(i + 1));
                    out[j * m + i..j * m + i + 2].copy_from_slice(&[p, q]);
                    out[(j + 1) * m + i..(j + 1) * m + i + 2].copy_from_slice(&[r, s]);
                    i += 2;
                } else {
                    let [p, r] = kernel::dot_2x1(w0, w1, x.row(i));
                    (out[j * m + i], out[(j + 1) * m + i]) = (p, r);
                    i += 1;
                }
            }
            j += 2;
        } else {
            for (i, o) in out[j * m..(j + 1) * m].iter_mut().enumerate() {
                *o = kernel::dot_1x1(w0, x.row(i));
            }
            j += 1;
        }
    }
}

/// The products' inner loops: AVX2 where the build targets it, a portable
/// loop elsewhere, behind the same calls.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
use avx2 as kernel;
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
use portable as kernel;

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BLOCK, Block};

    // SAFETY (each call below): this module is built only where the build
    // targets AVX2 and FMA (its cfg), so every CPU it runs on has them.

    /// `[w0·x0, w0·x1, w1·x0, w1·x1]`.
    #[allow(unsafe_code)]
    pub(super) fn dot_2x2(w0: &[Block], w1: &[Block], x0: &[Block], x1: &[Block]) -> [f32; 4] {
        unsafe { tile_2x2(w0, w1, x0, x1) }
    }

    /// `[w0·x, w1·x, w2·x, w3·x]`.
    #[allow(unsafe_code)]
    pub(super) fn dot_4x1(w: [&[Block]; 4], x: &[Block]) -> [f32; 4] {
        unsafe { tile_4x1(w, x) }
    }

    /// `[w0·x, w1·x]`.
    #[allow(unsafe_code)]
    pub(super) fn dot_2x1(w0: &[Block], w1: &[Block], x: &[Block]) -> [f32; 2] {
        unsafe { tile_2x1(w0, w1, x) }
    }

    /// `w·x`.
    #[allow(unsafe_code)]
    pub(super) fn dot_1x1(w: &[Block], x: &[Block]) -> f32 {
        unsafe { tile_1x1(w, x) }
    }

    /// The 32 bytes of one block as a vector.
    #[allow(unsafe_code)]
    #[inline(always)]
    fn load32(qs: &[i8; BLOCK]) -> __m256i {
        // SAFETY: the array holds the 32 bytes read; the load has no
        // alignment requirement.
        unsafe { _mm256_loadu_si256(qs.as_ptr().cast()) }
    }

    /// One block's contribution to a dot product: `acc + Σ w·x × scale`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn step(acc: __m256, wv: __m256i, xv: __m256i, scale: __m256) -> __m256 {
        // |w| · (x with w's sign): the products w·x, as unsigned × signed
        // bytes, summed in pairs, then in fours.
        let aw = _mm256_sign_epi8(wv, wv);
        let sx = _mm256_sign_epi8(xv, wv);
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1));
        _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc)
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn hsum(v: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_movehdup_ps(h));
        _mm_cvtss_f32(h)
    }

    /// `[w0·x0, w0·x1, w1·x0, w1·x1]`.
    #[target_feature(enable = "avx2,fma")]
    fn tile_2x2(w0: &[Block], w1: &[Block], x0: &[Block], x1: &[Block]) -> [f32; 4] {
        let z = _mm256_setzero_ps();
        let (mut a00, mut a01, mut a10, mut a11) = (z, z, z, z);
        for ((u0, u1), (v0, v1)) in w0.iter().zip(w1).zip(x0.iter().zip(x1)) {
            let (wv0, wv1) = (load32(&u0.qs), load32(&u1.qs));
            let (xv0, xv1) = (load32(&v0.qs), load32(&v1.qs));
            let (wd0, wd1) = (_mm256_set1_ps(u0.d), _mm256_set1_ps(u1.d));
            let (xd0, xd1) = (_mm256_set1_ps(v0.d), _mm256_set1_ps(v1.d));
            a00 = step(a00, wv0, xv0, _mm256_mul_ps(wd0, xd0));
            a01 = step(a01, wv0, xv1, _mm256_mul_ps(wd0, xd1));
            a10 = step(a10, wv1, xv0, _mm256_mul_ps(wd1, xd0));
            a11 = step(a11, wv1, xv1, _mm256_mul_ps(wd1, xd1));
        }
        [hsum(a00), hsum(a01), hsum(a10), hsum(a11)]
    }

    /// `[w0·x, w1·x, w2·x, w3·x]`.
    #[target_feature(enable = "avx2,fma")]
    fn tile_4x1(w: [&[Block]; 4], x: &[Block]) -> [f32; 4] {
        let z = _mm256_setzero_ps();
        let (mut a0, mut a1, mut a2, mut a3) = (z, z, z, z);
        let [w0, w1, w2, w3] = w;
        for (((u0, u1), (u2, u3)), v) in w0.iter().zip(w1).zip(w2.iter().zip(w3)).zip(x) {
            let xv = load32(&v.qs);
            a0 = step(a0, load32(&u0.qs), xv, _mm256_set1_ps(u0.d * v.d));
            a1 = step(a1, load32(&u1.qs), xv, _mm256_set1_ps(u1.d * v.d));
            a2 = step(a2, load32(&u2.qs), xv, _mm256_set1_ps(u2.d * v.d));
            a3 = step(a3, load32(&u3.qs), xv, _mm256_set1_ps(u3.d * v.d));
        }
        [hsum(a0), hsum(a1), hsum(a2), hsum(a3)]
    }

    /// `[w0·x, w1·x]`.
    #[target_feature(enable = "avx2,fma")]
    fn tile_2x1(w0: &[Block], w1: &[Block], x: &[Block]) -> [f32; 2] {
        let z = _mm256_setzero_ps();
        let (mut a0, mut a1) = (z, z);
        for ((u0, u1), v) in w0.iter().zip(w1).zip(x) {
            let xv = load32(&v.qs);
            a0 = step(a0, load32(&u0.qs), xv, _mm256_set1_ps(u0.d * v.d));
            a1 = step(a1, load32(&u1.qs), xv, _mm256_set1_ps(u1.d * v.d));
        }
        [hsum(a0), hsum(a1)]
    }

    /// `w·x`.
    #[target_feature(enable = "avx2,fma")]
    fn tile_1x1(w: &[Block], x: &[Block]) -> f32 {
        let mut a = _mm256_setzero_ps();
        for (u, v) in w.iter().zip(x) {
            a = step(a, load32(&u.qs), load32(&v.qs), _mm256_set1_ps(u.d * v.d));
        }
        hsum(a)
    }
}

#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
mod portable {
    use super::Block;

    /// `w·x`.
    pub(super) fn dot_1x1(w: &[Block], x: &[Block]) -> f32 {
        w.iter()
            .zip(x)
            .map(|(u, v)| {
                let dot: i32 =
                    u.qs.iter()
                        .zip(&v.qs)
                        .map(|(&p, &q)| i32::from(p) * i32::from(q))
                        .sum();
                dot as f32 * u.d * v.d
            })
            .sum()
    }

    /// `[w0·x0, w0·x1, w1·x0, w1·x1]`.
    pub(super) fn dot_2x2(w0: &[Block], w1: &[Block], x0: &[Block], x1: &[Block]) -> [f32; 4] {
        [
            dot_1x1(w0, x0),
            dot_1x1(w0, x1),
            dot_1x1(w1, x0),
            dot_1x1(w1, x1),
        ]
    }

    /// `[w0·x, w1·x, w2·x, w3·x]`.
    pub(super) fn dot_4x1(w: [&[Block]; 4], x: &[Block]) -> [f32; 4] {
        w.map(|w| dot_1x1(w, x))
    }

    /// `[w0·x, w1·x]`.
    pub(super) fn dot_2x1(w0: &[Block], w1: &[Block], x: &[Block]) -> [f32; 2] {
        [dot_1x1(w0, x), dot_1x1(w1, x)]
    }
}

/// The packed layout's products: AVX-512 VNNI where the CPU has it, the
/// same integer sums and float steps in plain loops elsewhere (so the
/// layout is correct on any CPU, and both give the same bits).
mod packed {
    use super::{Block, GROUP, PACKED_BLOCK};

    /// Whether this CPU has AVX-512 F, BW and VNNI.
    pub(super) fn runs_here() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// One group's blocks (`wq`: `nb × 512` bytes, `wd`: `nb × 16` scales)
    /// against activation rows `x` (`rows × nb` blocks; `neg`: −128 × each
    /// block's sum), into `out` (`rows × 16`, row-major).
    /// `vnni` takes the AVX-512 kernel (where [`runs_here`]).
    pub(super) fn group(
        wq: &[u8],
        wd: &[f32],
        x: &[Block],
        neg: &[i32],
        out: &mut [f32],
        vnni: bool,
    ) {
        let nb = wd.len() / GROUP;
        let rows = out.len() / GROUP;
        assert!(
            wq.len() == nb * PACKED_BLOCK
                && wd.len() == nb * GROUP
                && x.len() == rows * nb
                && neg.len() == rows * nb
                && out.len() == rows * GROUP
        );
        #[cfg(target_arch = "x86_64")]
        if vnni && runs_here() {
            let mut i = 0;
            while i < rows {
                let r = (rows - i).min(8);
                let (xs, ns) = (&x[i * nb..(i + r) * nb], &neg[i * nb..(i + r) * nb]);
                let o = &mut out[i * GROUP..(i + r) * GROUP];
                // SAFETY: the CPU has AVX-512 F/BW/VNNI (just checked); the
                // lengths asserted above cover every access in `tile` for
                // these r rows.
                #[allow(unsafe_code)]
                unsafe {
                    match r {
                        1 => vnni::tile::<1>(wq, wd, xs, ns, nb, o),
                        2 => vnni::tile::<2>(wq, wd, xs, ns, nb, o),
                        3 => vnni::tile::<3>(wq, wd, xs, ns, nb, o),
                        4 => vnni::tile::<4>(wq, wd, xs, ns, nb, o),
                        5 => vnni::tile::<5>(wq, wd, xs, ns, nb, o),
                        6 => vnni::tile::<6>(wq, wd, xs, ns, nb, o),
                        7 => vnni::tile::<7>(wq, wd, xs, ns, nb, o),
                        _ => vnni::tile::<8>(wq, wd, xs, ns, nb, o),
                    }
                }
                i += r;
            }
            return;
        }
        for i in 0..rows {
            for lane in 0..GROUP {
                let mut acc = 0f32;
                for b in 0..nb {
                    let blk = &x[i * nb + b];
                    let at = b * PACKED_BLOCK + lane * 4;
                    let mut s = neg[i * nb + b];
                    for (j, &v) in blk.qs.iter().enumerate() {
                        s += i32::from(wq[at + j / 4 * 64 + j % 4]) * i32::from(v);
                    }
                    acc = (s as f32).mul_add(wd[b * GROUP + lane] * blk.d, acc);
                }
                out[i * GROUP + lane] = acc;
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod vnni {
        use std::arch::x86_64::*;

        use super::{Block, GROUP, PACKED_BLOCK};

        /// `R` activation rows against one group, accumulators in registers
        /// for the whole input width.
        ///
        /// # Safety
        /// The CPU has AVX-512 F/BW/VNNI; `wq` holds `nb × 512` bytes, `wd`
        /// `nb × 16` scales, `x` and `neg` `R × nb` entries, `out` `R × 16`.
        #[allow(unsafe_code)]
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        pub(super) unsafe fn tile<const R: usize>(
            wq: &[u8],
            wd: &[f32],
            x: &[Block],
            neg: &[i32],
            nb: usize,
            out: &mut [f32],
        ) {
            let mut acc = [_mm512_setzero_ps(); R];
            let mut w = [_mm512_setzero_si512(); 8];
            for b in 0..nb {
                // SAFETY (loads below): b < nb, so the block's 512 bytes and
                // 16 scales lie inside `wq` and `wd`; i < R, so i * nb + b
                // indexes `x` and `neg`, and each block holds 32 bytes.
                unsafe {
                    let base = wq.as_ptr().add(b * PACKED_BLOCK);
                    for (s, v) in w.iter_mut().enumerate() {
                        *v = _mm512_loadu_si512(base.add(s * 64).cast());
                    }
                    let ws = _mm512_loadu_ps(wd.as_ptr().add(b * GROUP));
                    for (i, a) in acc.iter_mut().enumerate() {
                        let blk = x.get_unchecked(i * nb + b);
                        let qp = blk.qs.as_ptr().cast::<i32>();
                        let mut sum = _mm512_set1_epi32(*neg.get_unchecked(i * nb + b));
                        for (s, v) in w.iter().enumerate() {
                            let four = _mm512_set1_epi32(qp.add(s).read_unaligned());
                            sum = _mm512_dpbusd_epi32(sum, *v, four);
                        }
                        let scale = _mm512_mul_ps(ws, _mm512_set1_ps(blk.d));
                        *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, *a);
                    }
                }
            }
            for (i, a) in acc.iter().enumerate() {
                // SAFETY: out holds R × 16 floats.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(i * GROUP), *a) };
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{DType, Module};

    /// `n` values in [-1, 1) from a linear congruential generator: the
    /// same inputs on every machine.
    pub(crate) fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn f16_scales_decode_exactly() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0000), 0.0);
        assert_eq!(f16_to_f32(0x0001), f32::powi(2.0, -24));
        assert_eq!(f16_to_f32(0x8001), -f32::powi(2.0, -24));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
    }

    #[test]
    fn scales_round_to_f16_values() {
        assert_eq!(round_to_f16(1.0), 1.0);
        assert_eq!(round_to_f16(1.0 / 3.0), f16_to_f32(0x3555));
        assert_eq!(round_to_f16(-0.1), -f16_to_f32(0x2e66));
        // Ties go to the even neighbour: 1 + 2^-11 lies between 1 and 1 + 2^-10.
        assert_eq!(round_to_f16(1.0 + f32::powi(2.0, -11)), 1.0);
        assert_eq!(round_to_f16(3.0 * f32::powi(2.0, -25)), f32::powi(2.0, -23));
        assert_eq!(round_to_f16(65_519.0), 65_504.0);
        assert!(round_to_f16(1e6).is_infinite());
        for h in [0x0001u16, 0x03ff, 0x0400, 0x3c01, 0x7bff, 0x1234] {
            assert_eq!(round_to_f16(f16_to_f32(h)), f16_to_f32(h), "{h:#x}");
        }
    }

    /// Every tile shape and remainder in both layouts (out 1..=9 rows and
    /// groups of 16 that do not divide 70 or 300, 1..=5, 9 and 17
    /// activation rows), on the calling thread and split over workers
    /// (300 × 512 is past [`SERIAL_BELOW`], in tasks that do not divide it),
    /// against candle's own Q8_0 product on the same blocks and against the
    /// float product of the dequantised weights.
    #[test]
    fn products_match_candle_and_the_float_product() {
        const { assert!(300 * 512 >= SERIAL_BELOW && 300 % ROWS_PER_TASK != 0) };
        for layout in [Layout::Rows, Layout::Packed] {
            for (n, k) in [(1, 32), (5, 64), (9, 96), (70, 128), (300, 512)] {
                let w = Tensor::from_vec(lcg(n * k, n as u64), (n, k), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
                let ours = Q8Matrix::from_qtensor_in(&q, layout).unwrap().unwrap();
                assert_eq!((ours.out_dim(), ours.in_dim()), (n, k));
                assert_eq!(ours.layout(), layout);
                let wf = q.dequantize(&Device::Cpu).unwrap();
                let theirs = QMatMul::from_qtensor(q).unwrap();
                for m in [1, 2, 3, 4, 5, 9, 17] {
                    let x = Tensor::from_vec(lcg(m * k, 7 + m as u64), (1, m, k), &Device::Cpu)
                        .unwrap();
                    let a = ours.forward(&x).unwrap();
                    assert_eq!(a.dims(), &[1, m, n]);
                    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
                    let b: Vec<f32> = theirs
                        .forward(&x)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let f: Vec<f32> = x
                        .matmul(&wf.t().unwrap().unsqueeze(0).unwrap())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    // The same blocks on both sides: candle's sums differ in
                    // order only. The activations' 8-bit rounding bounds the
                    // error against floats by a few hundredths of the scale.
                    let tol = 0.02 * (k as f32).sqrt();
                    for ((p, r), e) in a.iter().zip(&b).zip(&f) {
                        assert!(
                            (p - r).abs() < 1e-4 * (1.0 + r.abs()),
                            "{layout:?} n {n} k {k} m {m}: {p} vs candle {r}"
                        );
                        assert!(
                            (p - e).abs() < tol,
                            "{layout:?} n {n} k {k} m {m}: {p} vs float {e}"
                        );
                    }
                }
            }
        }
    }

    /// The packed layout's AVX-512 kernel and its plain loops give the same
    /// bits, extreme bytes included (-128 weights, ±127 activations: the
    /// offset sums' largest magnitudes). Skipped where the CPU has no VNNI.
    #[test]
    fn packed_kernels_give_the_same_bits() {
        if !packed::runs_here() {
            eprintln!("no AVX-512 VNNI here: only the plain loops run");
            return;
        }
        let (n, k) = (37, 256);
        let mut w = Blocks::quantize(&lcg(n * k, 3), n, k);
        w.b[0].qs = [-128; BLOCK];
        w.b[1].qs = [127; BLOCK];
        let p = Packed::new(&w);
        for m in [1, 7, 8, 13] {
            let mut x = lcg(m * k, 11 + m as u64);
            x[..BLOCK].iter_mut().for_each(|v| *v = 1.0);
            x[BLOCK..2 * BLOCK].iter_mut().for_each(|v| *v = -1.0);
            let xq = Blocks::quantize(&x, m, k);
            let fast = matmul_packed(&p, n, &xq, true);
            let slow = matmul_packed(&p, n, &xq, false);
            assert_eq!(fast.len(), m * n);
            for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "m {m} at {i}: {a} vs {b}");
            }
        }
    }

    /// A row's product does not depend on the rows it is batched with (a
    /// sequence's words must not change with its batch): in both layouts,
    /// every row of a 13-row product (a whole tile of eight and a
    /// remainder; split over workers) equals that row's product alone, bit
    /// for bit.
    #[test]
    fn rows_do_not_depend_on_their_batch() {
        let (n, k) = (200, 1024);
        const { assert!(200 * 1024 >= SERIAL_BELOW) };
        let w = Tensor::from_vec(lcg(n * k, 5), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let m = 13;
        let x = lcg(m * k, 6);
        for layout in Layout::available() {
            let ours = Q8Matrix::from_qtensor_in(&q, layout).unwrap().unwrap();
            let all = ours.matmul(&x, m);
            for i in 0..m {
                let one = ours.matmul(&x[i * k..(i + 1) * k], 1);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&all[i * n..(i + 1) * n]),
                    bits(&one),
                    "{layout:?} row {i}"
                );
            }
        }
    }

    #[test]
    fn other_formats_and_widths_are_left_to_candle() {
        let w = Tensor::zeros((4, 256), DType::F32, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        assert!(Q8Matrix::from_qtensor(&q).unwrap().is_none());
        let ours = Q8Matrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q8_0).unwrap())
            .unwrap()
            .unwrap();
        let x = Tensor::zeros((2, 128), DType::F32, &Device::Cpu).unwrap();
        let e = ours.forward(&x).unwrap_err().to_string();
        assert!(e.contains("input width 128"), "{e}");
    }
}
