//! Int8 matrix products for inputs of many rows: the Whisper encoder's
//! frames, the audio's cross-attention keys and values, a decoder prompt.
//!
//! [`crate::q8`] keeps ggml's Q8_0 blocks (a scale per 32 values), which
//! suits a token step: it reads each weight byte once. Over 1500 rows the
//! per-block scale costs a conversion and a float multiply-add every 32
//! products and the rows meet in dot products that end in horizontal sums;
//! that loses to the float matrix product. Here, as in CTranslate2's int8,
//! each weight row (an output) has one scale and each activation row one
//! scale, so a product is a pure integer sum, scaled once at the end.
//!
//! The weights are packed for the integer instructions: in blocks of 16
//! outputs, four consecutive inputs of each output side by side (64 bytes
//! per step), so one vector multiply-add takes four activation bytes,
//! broadcast, against sixteen outputs at once, and a tile keeps a few
//! activation rows × 16 or 32 outputs in registers for the whole input
//! width. No horizontal sums.
//!
//! Kernels: AMX-INT8 (`tdpbusd` on tiles: 16 activation rows × 64 bytes
//! against the packed weights exactly as they lie, 16 steps of four inputs
//! × 16 outputs, the sums kept in tile registers for the whole input
//! width), detected at run time with Linux's grant of the tile state;
//! AVX-512 VNNI (`vpdpbusd`: unsigned × signed bytes, four per
//! 32-bit lane; activations are offset by 128 to be unsigned, and 128 × the
//! weight row's sum is taken off at the end; AMX's products are unsigned ×
//! signed too), detected at run time; AVX2
//! (the sign trick: |a| × (w with a's sign), `maddubs` then `madd`), which
//! this project's x86 builds always have; a portable loop elsewhere. The
//! sums are exact integers, so every kernel gives the same bits. Only
//! VNNI's and AMX's beat the float product ([`Kernel::beats_float`]); where
//! a CPU has neither, Whisper keeps those products in f32
//! (`Whisper::quantize`). At tiny.en's encoder shapes over 1500 rows (Intel
//! Xeon, 2 threads, debug build, `nexus bench whisper`): 384 → 384 1.25 ms
//! on AMX against 1.74 on VNNI and 6.66 in f32; 384 → 1536 3.53 against
//! 5.50 and 25.69; 1536 → 384 3.47 against 5.66 and 25.04.

use rayon::prelude::*;

/// Outputs per packed block.
const NB: usize = 16;
/// Activation rows one worker task takes (a multiple of every kernel's
/// tile height).
const ROWS_PER_TASK: usize = 64;
/// Multiply-adds below which a product runs on the calling thread.
const SERIAL_BELOW: usize = 1 << 18;

/// Which inner loop runs the products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Plain integer loops.
    Portable,
    /// AVX2 byte products (x86-64-v3, this project's x86 target).
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    Avx2,
    /// AVX-512 VNNI, where the CPU has it.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    Avx512Vnni,
    /// AMX-INT8 tiles, where the CPU has them and Linux grants the process
    /// their state.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_os = "linux"))]
    Amx,
}

impl Kernel {
    /// The fastest kernel this CPU runs (detected once).
    pub fn best() -> Self {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| *Self::available().last().unwrap_or(&Kernel::Portable))
    }

    /// Every kernel this CPU runs, slowest first.
    pub fn available() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut k = vec![Kernel::Portable];
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
        {
            k.push(Kernel::Avx2);
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
            {
                k.push(Kernel::Avx512Vnni);
            }
        }
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_os = "linux"))]
        if amx::runs_here() {
            k.push(Kernel::Amx);
        }
        k
    }

    /// Whether products on this kernel beat the float ones: VNNI's did by
    /// 1.9-3x at the Whisper encoder's shapes, AVX2's ran at 0.8-1.2x of
    /// gemm's f32 product (`nexus bench whisper`, AMD EPYC, 2 threads).
    pub fn beats_float(self) -> bool {
        self.offset()
    }

    /// Whether activations are stored offset by 128 (unsigned bytes): the
    /// kernels whose instructions multiply unsigned by signed bytes.
    fn offset(self) -> bool {
        match self {
            Kernel::Portable => false,
            #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
            Kernel::Avx2 => false,
            #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
            Kernel::Avx512Vnni => true,
            #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_os = "linux"))]
            Kernel::Amx => true,
        }
    }

    /// Activation rows per tile.
    fn rows(self) -> usize {
        match self {
            Kernel::Portable => 4,
            #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
            Kernel::Avx2 => 4,
            #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
            Kernel::Avx512Vnni => 8,
            #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_os = "linux"))]
            Kernel::Amx => TILE_ROWS,
        }
    }

    /// Outputs per tile.
    fn cols(self) -> usize {
        match self {
            Kernel::Portable => NB,
            #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
            Kernel::Avx2 => NB,
            #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
            Kernel::Avx512Vnni => 2 * NB,
            #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_os = "linux"))]
            Kernel::Amx => 2 * NB,
        }
    }
}

/// Activation rows a tile holds at most (AMX's; the vector kernels take 8
/// or 4).
const TILE_ROWS: usize = 16;

/// The sums of one tile: up to [`TILE_ROWS`] activation rows × 32 outputs.
type Tile = [[i32; 2 * NB]; TILE_ROWS];

/// A weight matrix `(out, in)` in 8-bit values with one scale per output,
/// multiplied as `x · Wᵀ`.
#[derive(Clone)]
pub struct I8Matrix {
    n: usize,
    k: usize,
    /// `k` rounded up to whole steps of four.
    kp: usize,
    /// `[n / 16 blocks, rounded up to an even count][kp / 4][16][4]`.
    packed: Vec<i8>,
    /// Per output: its scale, and what offsetting the activations by 128
    /// adds to its sums (128 × the sum of its 8-bit values).
    scale: Vec<f32>,
    offset_sums: Vec<i32>,
}

impl std::fmt::Debug for I8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8Matrix")
            .field("out", &self.n)
            .field("in", &self.k)
            .finish()
    }
}

/// `v` (one row) as bytes against its own scale: scale = largest
/// magnitude / 127, values rounded to the nearest (ties to even) in
/// -127..=127, stored plus `offset` (0, or 128 for unsigned bytes).
/// Returns the scale (NaN where the row is not finite, so its products are).
fn quantize_row(v: &[f32], out: &mut [u8], offset: i32) -> f32 {
    let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    if amax == 0.0 || !amax.is_finite() {
        out.iter_mut().for_each(|q| *q = offset as u8);
        return if amax.is_finite() { 0.0 } else { f32::NAN };
    }
    let inv = 127.0 / amax;
    for (q, x) in out.iter_mut().zip(v) {
        *q = ((x * inv).round_ties_even().clamp(-127.0, 127.0) as i32 + offset) as u8;
    }
    amax / 127.0
}

impl I8Matrix {
    /// `w`, `(out, in)` row-major, quantised row by row.
    pub fn quantize(w: &[f32], out: usize, inp: usize) -> Self {
        assert_eq!(w.len(), out * inp, "weights are not {out} × {inp}");
        let kp = inp.div_ceil(4) * 4;
        let blocks = out.div_ceil(2 * NB) * 2;
        let mut packed = vec![0i8; blocks * NB * kp];
        let mut scale = vec![0f32; out];
        let mut offset_sums = vec![0i32; out];
        let mut q = vec![0u8; inp];
        for j in 0..out {
            scale[j] = quantize_row(&w[j * inp..(j + 1) * inp], &mut q, 0);
            offset_sums[j] = 128 * q.iter().map(|&v| i32::from(v as i8)).sum::<i32>();
            let (block, c) = (j / NB, j % NB);
            for (t, &v) in q.iter().enumerate() {
                packed[block * NB * kp + (t / 4) * NB * 4 + c * 4 + t % 4] = v as i8;
            }
        }
        Self {
            n: out,
            k: inp,
            kp,
            packed,
            scale,
            offset_sums,
        }
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.n
    }

    /// Input width.
    pub fn in_dim(&self) -> usize {
        self.k
    }

    /// `x` (`m × in`, row-major) times `Wᵀ`: `m × out`, row-major, on the
    /// fastest kernel this CPU has.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_on(Kernel::best(), x, m)
    }

    /// [`Self::matmul`] on a given kernel (one of [`Kernel::available`]).
    pub fn matmul_on(&self, kernel: Kernel, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "input is not {m} × {}", self.k);
        let (n, k, kp) = (self.n, self.k, self.kp);
        if m == 0 || n == 0 {
            return Vec::new();
        }
        // Activations, one scale per row; offset to unsigned for VNNI.
        let mut qa = vec![0u8; m * kp];
        let mut sa = vec![0f32; m];
        let offset = if kernel.offset() { 128 } else { 0 };
        let quantize = |(row, (dst, s)): (&[f32], (&mut [u8], &mut f32))| {
            *s = quantize_row(row, &mut dst[..k], offset);
            // The padding: zero, offset as the values are (its weights are 0).
            dst[k..].fill(offset as u8);
        };
        // What to take off each output's sums: the offset's share, or nothing.
        let correction: std::borrow::Cow<[i32]> = if kernel.offset() {
            std::borrow::Cow::Borrowed(&self.offset_sums)
        } else {
            std::borrow::Cow::Owned(vec![0; n])
        };
        let mut y = vec![0f32; m * n];
        if m * n * k < SERIAL_BELOW {
            x.chunks_exact(k)
                .zip(qa.chunks_exact_mut(kp).zip(sa.iter_mut()))
                .for_each(quantize);
            self.rows_into(kernel, &qa, &sa, &correction, &mut y);
        } else {
            x.par_chunks_exact(k)
                .zip(qa.par_chunks_exact_mut(kp).zip(sa.par_iter_mut()))
                .for_each(quantize);
            y.par_chunks_mut(ROWS_PER_TASK * n)
                .zip(
                    qa.par_chunks(ROWS_PER_TASK * kp)
                        .zip(sa.par_chunks(ROWS_PER_TASK)),
                )
                .for_each(|(y, (qa, sa))| self.rows_into(kernel, qa, sa, &correction, y));
        }
        y
    }

    /// The rows of `qa` (scales `sa`) against every output, less
    /// `correction` per output, into `y`.
    fn rows_into(&self, kernel: Kernel, qa: &[u8], sa: &[f32], correction: &[i32], y: &mut [f32]) {
        let (n, kp) = (self.n, self.kp);
        let rows = sa.len();
        let (mr, nc) = (kernel.rows(), kernel.cols());
        let mut tile: Tile = [[0; 2 * NB]; TILE_ROWS];
        for j0 in (0..n).step_by(nc) {
            let b = &self.packed[(j0 / NB) * NB * kp..];
            let cols = nc.min(n - j0);
            for i0 in (0..rows).step_by(mr) {
                let r = mr.min(rows - i0);
                let a = &qa[i0 * kp..(i0 + r) * kp];
                match kernel {
                    Kernel::Portable => portable::tile(a, r, kp, b, &mut tile),
                    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
                    Kernel::Avx2 => avx2::tile(a, r, kp, b, &mut tile),
                    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
                    Kernel::Avx512Vnni => vnni::tile(a, r, kp, b, &mut tile),
                    #[cfg(all(
                        target_arch = "x86_64",
                        target_feature = "avx2",
                        target_os = "linux"
                    ))]
                    Kernel::Amx => amx::tile(a, r, kp, b, &mut tile),
                }
                let (scale, correction) = (&self.scale[j0..j0 + cols], &correction[j0..j0 + cols]);
                for (rr, sums) in tile.iter().enumerate().take(r) {
                    let s = sa[i0 + rr];
                    let out = &mut y[(i0 + rr) * n + j0..(i0 + rr) * n + j0 + cols];
                    for (((o, &v), &c), &w) in out.iter_mut().zip(sums).zip(correction).zip(scale) {
                        *o = (v - c) as f32 * (s * w);
                    }
                }
            }
        }
    }
}

mod portable {
    use super::{NB, Tile};

    /// `r` rows of `a` (stride `kp`, signed bytes) against the 16 outputs of
    /// block `b`.
    pub(super) fn tile(a: &[u8], r: usize, kp: usize, b: &[i8], out: &mut Tile) {
        for (i, sums) in out.iter_mut().enumerate().take(r) {
            let row = &a[i * kp..(i + 1) * kp];
            let mut acc = [0i32; NB];
            for (s, quad) in row.chunks_exact(4).enumerate() {
                let w = &b[s * NB * 4..(s + 1) * NB * 4];
                for (c, acc) in acc.iter_mut().enumerate() {
                    for t in 0..4 {
                        *acc += i32::from(quad[t] as i8) * i32::from(w[c * 4 + t]);
                    }
                }
            }
            sums[..NB].copy_from_slice(&acc);
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{NB, Tile};

    /// `r` (1..=4) rows of `a` (stride `kp`, signed bytes) against the 16
    /// outputs of block `b`.
    pub(super) fn tile(a: &[u8], r: usize, kp: usize, b: &[i8], out: &mut Tile) {
        assert!(r <= 4 && a.len() >= r * kp && b.len() >= kp * NB && kp.is_multiple_of(4));
        // SAFETY: this module is built only where the build targets AVX2;
        // the bounds just checked cover every load in `run`.
        #[allow(unsafe_code)]
        unsafe {
            match r {
                1 => run::<1>(a, kp, b, out),
                2 => run::<2>(a, kp, b, out),
                3 => run::<3>(a, kp, b, out),
                _ => run::<4>(a, kp, b, out),
            }
        }
    }

    #[allow(unsafe_code)]
    #[target_feature(enable = "avx2")]
    unsafe fn run<const R: usize>(a: &[u8], kp: usize, b: &[i8], out: &mut Tile) {
        let ones = _mm256_set1_epi16(1);
        let mut lo = [_mm256_setzero_si256(); R];
        let mut hi = [_mm256_setzero_si256(); R];
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        for s in 0..kp / 4 {
            // SAFETY: s * 64 + 64 ≤ kp * 16 ≤ b.len(); unaligned loads.
            let (w0, w1) = unsafe {
                (
                    _mm256_loadu_si256(bp.add(s * 64).cast()),
                    _mm256_loadu_si256(bp.add(s * 64 + 32).cast()),
                )
            };
            for i in 0..R {
                // SAFETY: i * kp + s * 4 + 4 ≤ R * kp ≤ a.len().
                let q = unsafe { ap.add(i * kp + s * 4).cast::<i32>().read_unaligned() };
                let av = _mm256_set1_epi32(q);
                let au = _mm256_abs_epi8(av);
                let p0 = _mm256_maddubs_epi16(au, _mm256_sign_epi8(w0, av));
                let p1 = _mm256_maddubs_epi16(au, _mm256_sign_epi8(w1, av));
                lo[i] = _mm256_add_epi32(lo[i], _mm256_madd_epi16(p0, ones));
                hi[i] = _mm256_add_epi32(hi[i], _mm256_madd_epi16(p1, ones));
            }
        }
        for i in 0..R {
            // SAFETY: each row of the tile holds 32 sums; 16 are written.
            unsafe {
                _mm256_storeu_si256(out[i].as_mut_ptr().cast(), lo[i]);
                _mm256_storeu_si256(out[i].as_mut_ptr().add(8).cast(), hi[i]);
            }
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
mod vnni {
    use std::arch::x86_64::*;

    use super::{NB, Tile};

    /// `r` (1..=8) rows of `a` (stride `kp`, bytes offset by 128) against
    /// the 32 outputs of blocks `b` and the one after it.
    pub(super) fn tile(a: &[u8], r: usize, kp: usize, b: &[i8], out: &mut Tile) {
        assert!(r <= 8 && a.len() >= r * kp && b.len() >= 2 * kp * NB && kp.is_multiple_of(4));
        assert!(
            std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512bw")
        );
        // SAFETY: the CPU has AVX-512 F/BW/VNNI (just checked; `Kernel`
        // offers this kernel only then); the bounds just checked cover every
        // load in `run`.
        #[allow(unsafe_code)]
        unsafe {
            match r {
                1 => run::<1>(a, kp, b, out),
                2 => run::<2>(a, kp, b, out),
                3 => run::<3>(a, kp, b, out),
                4 => run::<4>(a, kp, b, out),
                5 => run::<5>(a, kp, b, out),
                6 => run::<6>(a, kp, b, out),
                7 => run::<7>(a, kp, b, out),
                _ => run::<8>(a, kp, b, out),
            }
        }
    }

    #[allow(unsafe_code)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn run<const R: usize>(a: &[u8], kp: usize, b: &[i8], out: &mut Tile) {
        let mut lo = [_mm512_setzero_si512(); R];
        let mut hi = [_mm512_setzero_si512(); R];
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        let second = kp * NB;
        for s in 0..kp / 4 {
            // SAFETY: second + s * 64 + 64 ≤ 2 * kp * 16 ≤ b.len().
            let (w0, w1) = unsafe {
                (
                    _mm512_loadu_si512(bp.add(s * 64).cast()),
                    _mm512_loadu_si512(bp.add(second + s * 64).cast()),
                )
            };
            for i in 0..R {
                // SAFETY: i * kp + s * 4 + 4 ≤ R * kp ≤ a.len().
                let q = unsafe { ap.add(i * kp + s * 4).cast::<i32>().read_unaligned() };
                let av = _mm512_set1_epi32(q);
                lo[i] = _mm512_dpbusd_epi32(lo[i], av, w0);
                hi[i] = _mm512_dpbusd_epi32(hi[i], av, w1);
            }
        }
        for i in 0..R {
            // SAFETY: each row of the tile holds 32 sums.
            unsafe {
                _mm512_storeu_si512(out[i].as_mut_ptr().cast(), lo[i]);
                _mm512_storeu_si512(out[i].as_mut_ptr().add(NB).cast(), hi[i]);
            }
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_os = "linux"))]
mod amx {
    use std::arch::asm;

    use super::{NB, Tile};

    /// Whether this CPU has AMX-TILE and AMX-INT8 and Linux granted this
    /// process the tiles' state (asked once; the grant holds for every
    /// thread of the process).
    pub(super) fn runs_here() -> bool {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            // CPUID leaf 7: EDX bit 24 is AMX-TILE, bit 25 AMX-INT8.
            let id = std::arch::x86_64::__cpuid_count(7, 0);
            if id.edx & (3 << 24) != 3 << 24 {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: arch_prctl takes two integers here and touches no
            // memory of this process.
            #[allow(unsafe_code)]
            let r = unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            };
            r == 0
        })
    }

    /// A tile configuration (palette 1): per tile register its rows and
    /// bytes per row.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    impl Config {
        fn new(tiles: &[(u8, u16)]) -> Self {
            let mut c = [0u8; 64];
            c[0] = 1;
            for (t, &(rows, bytes)) in tiles.iter().enumerate() {
                c[16 + 2 * t..18 + 2 * t].copy_from_slice(&bytes.to_le_bytes());
                c[48 + t] = rows;
            }
            Self(c)
        }
    }

    /// `r` (1..=16) rows of `a` (stride `kp`, bytes offset by 128) against
    /// the 32 outputs of blocks `b` and the one after it: per 64 input
    /// bytes one tile of activations (r × 64) and one of each block's
    /// weights (16 steps of four inputs × 16 outputs, the packed layout as
    /// it lies), multiplied into two tiles of r × 16 sums that stay in the
    /// tile registers for the whole input width. The same exact integer
    /// sums as the other kernels.
    pub(super) fn tile(a: &[u8], r: usize, kp: usize, b: &[i8], out: &mut Tile) {
        assert!(
            (1..=super::TILE_ROWS).contains(&r)
                && a.len() >= r * kp
                && b.len() >= 2 * kp * NB
                && kp.is_multiple_of(4)
                && runs_here()
        );
        let (full, rem) = (kp / 64, kp % 64);
        let rows = r as u8;
        // tmm0, tmm1: sums; tmm2: activations; tmm3: the last, shorter
        // activations; tmm4, tmm5: weights; tmm6, tmm7: the last weights.
        let cfg = Config::new(&[
            (rows, 64),
            (rows, 64),
            (rows, 64),
            (rows, rem.max(4) as u16),
            (16, 64),
            (16, 64),
            ((rem / 4).max(1) as u8, 64),
            ((rem / 4).max(1) as u8, 64),
        ]);
        let second = kp * NB;
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        // SAFETY: AMX-INT8 is there and granted (asserted above). Each
        // tile load reads `rows` rows of its configured bytes at the given
        // stride: activations up to (r - 1) * kp + kp ≤ a.len(); weights up
        // to second + kp * 16 ≤ b.len(), all inside the slices (asserted);
        // the stores write r rows of 64 bytes at a 128-byte stride into
        // `out` (16 rows of 128 bytes). The tiles are released at the end.
        #[allow(unsafe_code)]
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
            asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
            // One step of 64 input bytes (the last one shorter) at byte
            // `at`: its activation tile and its weight tiles, then both
            // blocks' multiply-adds into the sums.
            macro_rules! step {
                ($a:literal, $b0:literal, $b1:literal, $at:expr) => {
                    asm!(
                        concat!("tileloadd ", $a, ", [{a} + {sa}*1]"),
                        concat!("tileloadd ", $b0, ", [{b0} + {sb}*1]"),
                        concat!("tileloadd ", $b1, ", [{b1} + {sb}*1]"),
                        concat!("tdpbusd tmm0, ", $a, ", ", $b0),
                        concat!("tdpbusd tmm1, ", $a, ", ", $b1),
                        a = in(reg) ap.add($at),
                        sa = in(reg) kp,
                        b0 = in(reg) bp.add(NB * $at),
                        b1 = in(reg) bp.add(second + NB * $at),
                        sb = in(reg) 64usize,
                        options(nostack, readonly),
                    )
                };
            }
            for j in 0..full {
                step!("tmm2", "tmm4", "tmm5", 64 * j);
            }
            if rem > 0 {
                step!("tmm3", "tmm6", "tmm7", 64 * full);
            }
            let o = out.as_mut_ptr().cast::<i32>();
            asm!(
                "tilestored [{c0} + {sc}*1], tmm0",
                "tilestored [{c1} + {sc}*1], tmm1",
                "tilerelease",
                c0 = in(reg) o,
                c1 = in(reg) o.add(NB),
                sc = in(reg) 2 * NB * 4,
                options(nostack),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::q8::tests::lcg;

    fn float_product(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
            }
        }
        y
    }

    /// Every kernel this CPU has gives the portable loop's bits, over
    /// shapes with every remainder (outputs not a multiple of 16 or 32,
    /// inputs not a multiple of 4, rows not a multiple of a tile, and past
    /// the size that splits over workers), and lands within the 8-bit
    /// rounding of the float product.
    #[test]
    fn every_kernel_gives_the_same_bits_near_the_float_product() {
        const { assert!(70 * 40 * 100 >= SERIAL_BELOW) };
        let kernels = Kernel::available();
        eprintln!("kernels: {kernels:?}");
        for (m, n, k) in [
            (1, 1, 1),
            (3, 5, 7),
            (9, 17, 33),
            (8, 32, 64),
            (13, 50, 130),
            (70, 40, 100),
            (130, 96, 384),
        ] {
            let w = lcg(n * k, n as u64 + 1);
            let x = lcg(m * k, m as u64 + 11);
            let q = I8Matrix::quantize(&w, n, k);
            assert_eq!((q.out_dim(), q.in_dim()), (n, k));
            let reference = q.matmul_on(Kernel::Portable, &x, m);
            for &kernel in &kernels {
                assert_eq!(
                    q.matmul_on(kernel, &x, m),
                    reference,
                    "{kernel:?} m {m} n {n} k {k}"
                );
            }
            let f = float_product(&x, &w, m, n, k);
            // Two 8-bit roundings: each product off by about half a step
            // of either scale, over k terms of random sign.
            let tol = 0.02 * (k as f32).sqrt();
            for (p, e) in reference.iter().zip(&f) {
                assert!((p - e).abs() < tol, "m {m} n {n} k {k}: {p} vs {e}");
            }
        }
    }

    #[test]
    fn zero_rows_and_extreme_bytes_stay_exact() {
        // A zero row, and rows whose bytes hit ±127 everywhere: the sign
        // trick and the unsigned offset must not saturate.
        let k = 1536;
        let w: Vec<f32> = (0..2 * k).map(|i| if i < k { 1.0 } else { -1.0 }).collect();
        let mut x = vec![0f32; 3 * k];
        x[k..2 * k].fill(1.0);
        x[2 * k..].fill(-1.0);
        let q = I8Matrix::quantize(&w, 2, k);
        for kernel in Kernel::available() {
            let y = q.matmul_on(kernel, &x, 3);
            let kf = k as f32;
            assert_eq!(y, vec![0.0, 0.0, kf, -kf, -kf, kf], "{kernel:?}");
        }
    }
}
