//! Raw PCM streams in arbitrary chunkings and declared formats.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nexus_audio::{AudioLimits, PcmDecoder, PcmSpec, SampleFormat};

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else { return };
    let spec = PcmSpec {
        format: if head & 1 == 0 { SampleFormat::S16Le } else { SampleFormat::F32Le },
        sample_rate: [8_000, 16_000, 44_100, 48_000, 1][usize::from(head >> 1) % 5],
        channels: u32::from(head >> 4),
    };
    let Ok(mut dec) = PcmDecoder::new(spec, AudioLimits::default()) else { return };
    let mut out = vec![Vec::new(); spec.channels as usize];
    let step = usize::from(head % 7) + 1;
    for chunk in rest.chunks(step) {
        if dec.push(chunk, &mut out).is_err() {
            return;
        }
    }
    let _ = dec.finish();
});
