//! Arbitrary bytes through the container decoder: errors are fine, panics,
//! hangs and unbounded allocations are not.
//!
//! `decode_bytes` contains panics raised inside third-party demuxers and returns
//! them as errors, which is the behaviour under test. libFuzzer's default hook
//! aborts on any panic, even a contained one, so the hook is silenced here; a
//! panic that escapes `decode_bytes` still aborts at the fuzzer's FFI boundary
//! and is reported as a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nexus_audio::{AudioLimits, decode_bytes};

fuzz_target!(init: { std::panic::set_hook(Box::new(|_| {})); }, |data: &[u8]| {
    let limits = AudioLimits {
        max_seconds: 120.0,
        max_bytes: 4 << 20,
        ..AudioLimits::default()
    };
    if let Ok(a) = decode_bytes(data.to_vec(), None, &limits) {
        assert!(!a.channels.is_empty());
        let _ = nexus_audio::to_model_rate(&a.channels, a.sample_rate);
    }
});
