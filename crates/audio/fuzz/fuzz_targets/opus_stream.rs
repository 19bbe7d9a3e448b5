//! Live Opus as the fleet takes it: raw packets (WebRTC, OPUS_PACKETS) with
//! loss recovery and concealment, and Ogg Opus pages split anywhere (OGG_OPUS
//! streams). The first byte picks channels and the chunking; the rest are
//! length-prefixed packets, and the same bytes are fed as an Ogg stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nexus_audio::{OggOpusStream, OpusPacketDecoder};

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else { return };
    let channels = u32::from(head & 1) + 1;
    if let Ok(mut dec) = OpusPacketDecoder::new(channels) {
        let mut packets = Vec::new();
        let mut at = 0;
        while at < rest.len() {
            let len = usize::from(rest[at]);
            let end = (at + 1 + len).min(rest.len());
            packets.push(&rest[at + 1..end]);
            at = end;
        }
        for (i, p) in packets.iter().enumerate() {
            // A lost packet every so often: recovered from the next one, or concealed.
            let _ = match (i + usize::from(head >> 1)) % 5 {
                0 => match packets.get(i + 1) {
                    Some(next) => dec.recover(next),
                    None => dec.conceal(),
                },
                1 => dec.conceal(),
                _ => dec.decode(p),
            };
        }
    }
    let mut ogg = OggOpusStream::new();
    let step = usize::from(head >> 2) + 1;
    for chunk in rest.chunks(step) {
        if ogg.push(chunk).is_err() {
            return;
        }
    }
});
