//! Live Ogg Opus byte streams (RFC 7845), as browsers' MediaRecorder sends them
//! in arbitrary chunks: pages are parsed as bytes arrive, their CRC checked,
//! packets reassembled across pages, and audio decoded with libopus.

use crate::error::{AudioError, Result};
use crate::opus::{OpusPacketDecoder, pre_skip};

const CAPTURE: &[u8; 4] = b"OggS";
/// Longest page: header (27) + 255 lacing values + 255 * 255 bytes.
const MAX_PAGE: usize = 27 + 255 + 255 * 255;

fn crc32(data: &[u8]) -> u32 {
    // Ogg's CRC: polynomial 0x04c11db7, no reflection, zero initial value.
    let mut crc = 0u32;
    for &b in data {
        crc ^= u32::from(b) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04c1_1db7
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// An incremental Ogg Opus decoder for one stream.
#[derive(Debug, Default)]
pub struct OggOpusStream {
    buf: Vec<u8>,
    partial: Vec<u8>,
    serial: Option<u32>,
    packets_seen: u64,
    decoder: Option<OpusPacketDecoder>,
    skip: usize,
}

impl OggOpusStream {
    /// A decoder waiting for the stream's first page.
    pub fn new() -> Self {
        Self::default()
    }

    /// Channels of the decoded audio, known after the `OpusHead` packet.
    pub fn channels(&self) -> Option<usize> {
        self.decoder.as_ref().map(OpusPacketDecoder::channels)
    }

    /// Feeds bytes; returns the interleaved 48 kHz samples they completed.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<f32>> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut used = 0;
        loop {
            let rest = &self.buf[used..];
            if rest.len() < 27 {
                break;
            }
            if &rest[..4] != CAPTURE {
                return Err(AudioError::Corrupt(format!(
                    "Ogg stream lost sync at byte {}: expected a page starting with OggS",
                    used
                )));
            }
            if rest[4] != 0 {
                return Err(AudioError::Unsupported(format!("Ogg version {}", rest[4])));
            }
            let n_seg = usize::from(rest[26]);
            if rest.len() < 27 + n_seg {
                break;
            }
            let lacing = &rest[27..27 + n_seg];
            let body_len: usize = lacing.iter().map(|l| usize::from(*l)).sum();
            let page_len = 27 + n_seg + body_len;
            debug_assert!(page_len <= MAX_PAGE);
            if rest.len() < page_len {
                break;
            }
            let page = &rest[..page_len];
            let stored = u32::from_le_bytes([page[22], page[23], page[24], page[25]]);
            let mut zeroed = page.to_vec();
            zeroed[22..26].fill(0);
            if crc32(&zeroed) != stored {
                return Err(AudioError::Corrupt(
                    "Ogg page checksum mismatch: the stream is damaged".into(),
                ));
            }
            let serial = u32::from_le_bytes([page[14], page[15], page[16], page[17]]);
            match self.serial {
                None => self.serial = Some(serial),
                // Other logical streams (e.g. a video track) are skipped.
                Some(s) if s != serial => {
                    used += page_len;
                    continue;
                }
                Some(_) => {}
            }
            let mut at = 27 + n_seg;
            let mut packets = Vec::new();
            for &l in lacing {
                self.partial
                    .extend_from_slice(&page[at..at + usize::from(l)]);
                at += usize::from(l);
                if l < 255 {
                    packets.push(std::mem::take(&mut self.partial));
                }
            }
            used += page_len;
            for p in packets {
                self.packet(&p, &mut out)?;
            }
        }
        self.buf.drain(..used);
        if self.buf.len() > MAX_PAGE {
            return Err(AudioError::Corrupt(
                "Ogg page larger than the format allows".into(),
            ));
        }
        Ok(out)
    }

    fn packet(&mut self, p: &[u8], out: &mut Vec<f32>) -> Result<()> {
        self.packets_seen += 1;
        match self.packets_seen {
            1 => {
                if p.len() < 19 || &p[..8] != b"OpusHead" {
                    return Err(AudioError::Unsupported(
                        "the Ogg stream is not Opus (no OpusHead)".into(),
                    ));
                }
                let channels = u32::from(p[9]);
                self.decoder = Some(OpusPacketDecoder::new(channels)?);
                self.skip = pre_skip(p) * channels as usize;
            }
            2 => {
                if !p.starts_with(b"OpusTags") {
                    return Err(AudioError::Corrupt(
                        "the Ogg Opus stream has no OpusTags".into(),
                    ));
                }
            }
            _ => {
                let dec = self
                    .decoder
                    .as_mut()
                    .expect("OpusHead came first; this is a bug");
                let pcm = dec.decode(p)?;
                let drop = self.skip.min(pcm.len());
                self.skip -= drop;
                out.extend_from_slice(&pcm[drop..]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_non_opus_are_refused() {
        let mut s = OggOpusStream::new();
        let e = s.push(&[0u8; 64]).unwrap_err();
        assert!(e.to_string().contains("lost sync at byte 0"), "{e}");
        let mut s = OggOpusStream::new();
        assert!(
            s.push(b"OggS").unwrap().is_empty(),
            "a partial header waits for more bytes"
        );
    }
}
