//! Arbitrary bytes through the container decoder: errors are fine, panics,
//! hangs and unbounded allocations are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nexus_audio::{AudioLimits, decode_bytes};

fuzz_target!(|data: &[u8]| {
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
