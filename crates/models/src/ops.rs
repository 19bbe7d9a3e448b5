//! Element-wise operations the models run often enough on CPUs that candle's
//! generic kernels cost real time, with the same results.
//!
//! [`gelu_erf`]: candle evaluates the erf of every element with a scalar
//! library call; on a Whisper encoder the activation took about a quarter of
//! the encoder's time. Here erf is a rational approximation (odd polynomial
//! over even polynomial in x, clamped to ±4 where erf is ±1 in f32) with no
//! branches or calls, which the compiler vectorises, and the elements are
//! split across the rayon pool. Other devices and dtypes keep candle's kernel.

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
        let CpuStorage::F32(all) = storage else {
            candle_core::bail!("gelu_erf: f32 only, got {:?}", storage.dtype())
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("gelu_erf: the input must be contiguous")
        };
        let src = &all[start..end];
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
