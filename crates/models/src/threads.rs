//! How candle's CPU kernels use the cores, settled once per process.
//!
//! Two of candle's defaults cost a loaded server dearly:
//!
//! - Unless `RAYON_NUM_THREADS` is set, candle counts the physical cores
//!   again for every matrix product, and where the kernel exposes no CPU
//!   capacities (virtual machines) that means reading `/proc/cpuinfo`: about
//!   5 % of a 16-stream live process's CPU went to the kernel formatting it.
//! - Its element-wise and Q8_0 kernels run on a pool of workers that spin
//!   while they wait for work, and a caller that spins while they finish.
//!   A server runs several model threads at once (encoder, decoder, voice
//!   activity), more than it has cores, so the spinners took the cores that
//!   the other stages' threads were waiting for (a quarter of the samples of
//!   that profile). Served, those kernels run on the calling thread; matrix
//!   products still split across the cores (rayon, which sleeps when idle).
//!
//! On this 2-core machine, 16 live streams of tiny.en: final p95 1.7-1.9 s
//! with candle's defaults, 0.9-1.2 s with the first fix, 0.8 s with both
//! (`nexus-loadtest`, BENCHMARKS.md).

/// What the process does with its cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuUse {
    /// One job at a time (`nexus transcribe`, benches): every kernel may
    /// use every core.
    Offline,
    /// Stages side by side (`nexus serve`, the stage processes).
    Serving,
}

/// Sets `RAYON_NUM_THREADS` to candle's own core count and, when serving,
/// `CANDLE_NUM_THREADS` to 1, each unless the environment already sets it.
///
/// Call it first thing in `main`, before any other thread exists (so before
/// an async runtime is built): changing the environment while another
/// thread may read it is undefined behaviour.
#[allow(unsafe_code)]
pub fn settle_cpu_threads(cpu: CpuUse) {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // SAFETY: the caller runs this before starting any thread (above).
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    if cpu == CpuUse::Serving && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: as above.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}
