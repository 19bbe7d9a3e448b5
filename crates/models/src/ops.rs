//! Element-wise operations the models run often enough on CPUs that candle's
//! generic kernels cost real time, with the same results.
//!
//! [`gelu_erf`]: candle evaluates the erf of every element with a scalar
//! library call; on a Whisper encoder the activation took about a quarter of
//! the encoder's time. Here erf is a rational approximation (odd polynomial
//! over even polynomial in x, clamped to ±4 where erf is ±1 in f32) with no
//! branches or calls, which the compiler vectorises, and the elements are
//! split across the rayon pool. Other devices and dtypes keep candle's kernel.
//!
//! [`softmax_last_dim`]: candle's CPU softmax calls the library's scalar
//! `expf` for every score; in the Whisper encoder's self-attention (1500 ×
//! 1500 scores per head) that and its packing were about a third of the
//! int8 encoder's time (`perf`, tiny.en, 30 s windows). Here exp is
//! Cephes' polynomial with a power-of-two scale built from its bits, again
//! branch-free so the compiler vectorises it, rows split across the pool.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// GELU in its exact (erf) form, as Whisper and the NEXUS adapter use it.
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1_no_bwd(&GeluErf)
    } else {
        x.gelu_erf()
    }
}

struct GeluErf;

/// Elements per rayon task: large enough that scheduling is noise.
const CHUNK: usize = 16 * 1024;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "nexus-gelu-erf"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = contiguous_f32("gelu_erf", storage, layout)?;
        let mut out = vec![0f32; src.len()];
        if src.len() <= CHUNK {
            gelu_slice(src, &mut out);
        } else {
            out.par_chunks_mut(CHUNK)
                .zip(src.par_chunks(CHUNK))
                .for_each(|(o, s)| gelu_slice(s, o));
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// The f32 values a custom op reads: its input must be f32 and contiguous.
fn contiguous_f32<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(all) = storage else {
        candle_core::bail!("{op}: f32 only, got {:?}", storage.dtype())
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: the input must be contiguous")
    };
    Ok(&all[start..end])
}

fn gelu_slice(src: &[f32], dst: &mut [f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// erf(x) to within a few f32 ulps: a rational minimax approximation on
/// [-4, 4]; beyond it erf rounds to ±1 in f32.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.954_6e-3;
    p = p * x2 - 1.609_603_3e-2;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329e-3;
    q = q * x2 - 1.426_474e-2;
    x * p / q
}

/// Softmax over the last dimension, as `candle_nn::ops::softmax_last_dim`
/// computes it (minus the row's largest value, exp, divided by the sum).
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() > 0 {
        x.contiguous()?.apply_op1_no_bwd(&Softmax)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "nexus-softmax-last-dim"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = contiguous_f32("softmax", storage, layout)?;
        let width = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; src.len()];
        let rows_per_task = (CHUNK / width).max(1);
        if src.len() <= CHUNK {
            out.chunks_mut(width)
                .zip(src.chunks(width))
                .for_each(|(o, s)| softmax_row(s, o));
        } else {
            out.par_chunks_mut(rows_per_task * width)
                .zip(src.par_chunks(rows_per_task * width))
                .for_each(|(o, s)| {
                    o.chunks_mut(width)
                        .zip(s.chunks(width))
                        .for_each(|(o, s)| softmax_row(s, o));
                });
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

fn softmax_row(src: &[f32], dst: &mut [f32]) {
    // The largest value, eight lanes at a time (a plain fold of f32::max
    // is not vectorised).
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = src.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    let mut max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in chunks.remainder() {
        max = max.max(v);
    }
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = exp(v - max);
    }
    let mut sums = [0f32; 8];
    let mut chunks = dst.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in sums.iter_mut().zip(c) {
            *l += v;
        }
    }
    let sum = sums.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
    let inv = 1.0 / sum;
    dst.iter_mut().for_each(|d| *d *= inv);
}

/// e^x to within a couple of f32 ulps (Cephes' `expf`: x = n·ln 2 + r,
/// a degree-6 polynomial in r, times 2^n built from its bits); 0 below
/// -87.3 (where f32 underflows; -inf included), NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let c = x.clamp(-87.3, 88.3);
    let n = (c * std::f32::consts::LOG2_E).round_ties_even();
    let r = c - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_310_2e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n from the bits of n + 127 (a whole number in 1..=254): added to
    // 1.5 · 2^23 it sits in the low mantissa bits, and the shift moves it
    // into the exponent (a float-to-int conversion would not vectorise).
    let scale = f32::from_bits((n + (127.0 + 12_582_912.0)).to_bits() << 23);
    let e = y * scale;
    if x < -87.3 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        e
    }
}

/// A dot product in eight independent lanes (which the compiler vectorises).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf by its Taylor series in f64: exact to far below f32 on |x| <= 4.
    fn erf_reference(x: f64) -> f64 {
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            let next = term / (2 * n + 1) as f64;
            sum += next;
            if next.abs() < 1e-18 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_matches_the_series_to_within_f32_rounding() {
        let mut worst = 0f64;
        for i in -6000..=6000 {
            let x = i as f32 / 1000.0;
            let want = if x.abs() >= 4.0 {
                x.signum() as f64
            } else {
                erf_reference(x as f64)
            };
            let err = (erf(x) as f64 - want).abs();
            worst = worst.max(err);
        }
        assert!(worst < 1e-6, "erf off by {worst:e}");
    }

    #[test]
    fn exp_matches_the_library_to_within_f32_rounding() {
        let mut worst = 0f32;
        for i in -87_000..=88_000 {
            let x = i as f32 / 1000.0 + 0.000_37;
            let want = x.exp();
            worst = worst.max((exp(x) - want).abs() / want);
        }
        assert!(worst < 4e-7, "exp off by {worst:e} relative");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn softmax_matches_candle_with_masks_and_any_width() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        for shape in [(1, 1, 1), (2, 3, 7), (2, 6, 1500), (1, 40, 448)] {
            let x = (Tensor::randn(0f32, 4f32, shape, &dev)? * 1.0)?;
            let want = candle_nn::ops::softmax_last_dim(&x)?;
            let diff = (softmax_last_dim(&x)? - &want)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-6, "{shape:?}: softmax differs by {diff}");
        }
        // A causal mask's -inf: those weights are exactly 0, the rest as candle.
        let mask: Vec<f32> = (0..16)
            .flat_map(|i| (0..16).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let x = Tensor::randn(0f32, 1f32, (16, 16), &dev)?.broadcast_add(&Tensor::from_vec(
            mask,
            (16, 16),
            &dev,
        )?)?;
        let got = softmax_last_dim(&x)?;
        let want = candle_nn::ops::softmax_last_dim(&x)?;
        let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "masked softmax differs by {diff}");
        let rows: Vec<Vec<f32>> = got.to_vec2()?;
        assert!(rows[0][1..].iter().all(|&v| v == 0.0));
        // A strided view and other dtypes.
        let xt = Tensor::randn(0f32, 1f32, (30, 20), &dev)?.t()?;
        let diff = (softmax_last_dim(&xt)? - candle_nn::ops::softmax_last_dim(&xt.contiguous()?)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "strided softmax differs by {diff}");
        let h = x.to_dtype(DType::F64)?;
        assert_eq!(softmax_last_dim(&h)?.dtype(), DType::F64);
        Ok(())
    }

    #[test]
    fn gelu_matches_candle_on_any_layout() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        // Large enough to split across tasks, and a transposed (strided) view.
        let x = (Tensor::randn(0f32, 3f32, (3, 200, 100), &dev)? * 1.0)?;
        let want = x.gelu_erf()?;
        let got = gelu_erf(&x)?;
        let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "gelu differs from candle's by {diff}");
        let xt = x.transpose(1, 2)?;
        let diff = (gelu_erf(&xt)? - xt.gelu_erf()?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "strided gelu differs by {diff}");
        // Other dtypes take candle's kernel.
        let h = x.to_dtype(DType::F64)?;
        assert_eq!(gelu_erf(&h)?.dtype(), DType::F64);
        Ok(())
    }
}
