//! Opus with libopus: raw packets as WebRTC carries them (with loss
//! concealment and in-band FEC recovery), and Ogg Opus files through the
//! container decoder.

use crate::error::{AudioError, Result};

/// Opus always decodes at 48 kHz here; callers resample.
pub const OPUS_RATE: u32 = 48_000;
/// Longest Opus frame (120 ms) at 48 kHz, per channel.
const MAX_FRAME: usize = 5_760;

/// A decoder for one Opus stream's packets.
pub struct OpusPacketDecoder {
    dec: opus::Decoder,
    channels: usize,
    last_frame: usize,
}

impl std::fmt::Debug for OpusPacketDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpusPacketDecoder")
            .field("channels", &self.channels)
            .finish()
    }
}

fn opus_err(what: &str, e: opus::Error) -> AudioError {
    AudioError::Corrupt(format!("opus {what}: {e}"))
}

impl OpusPacketDecoder {
    /// A decoder producing `channels` (1 or 2) interleaved channels at 48 kHz.
    pub fn new(channels: u32) -> Result<Self> {
        let ch = match channels {
            1 => opus::Channels::Mono,
            2 => opus::Channels::Stereo,
            n => {
                return Err(AudioError::Channels {
                    channels: n,
                    max: 2,
                });
            }
        };
        Ok(Self {
            dec: opus::Decoder::new(OPUS_RATE, ch).map_err(|e| opus_err("decoder", e))?,
            channels: channels as usize,
            last_frame: 960,
        })
    }

    /// Channels of the output.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Decodes one packet into interleaved samples.
    pub fn decode(&mut self, packet: &[u8]) -> Result<Vec<f32>> {
        if packet.is_empty() {
            return self.conceal();
        }
        let mut out = vec![0f32; MAX_FRAME * self.channels];
        let n = self
            .dec
            .decode_float(packet, &mut out, false)
            .map_err(|e| opus_err("packet", e))?;
        self.last_frame = n;
        out.truncate(n * self.channels);
        Ok(out)
    }

    /// Audio for a lost packet, extrapolated by libopus (PLC), one frame long.
    pub fn conceal(&mut self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.last_frame * self.channels];
        let n = self
            .dec
            .decode_float(&[], &mut out, false)
            .map_err(|e| opus_err("concealment", e))?;
        out.truncate(n * self.channels);
        Ok(out)
    }

    /// Audio for a lost packet recovered from the in-band FEC of the packet
    /// that follows it (call before decoding `next` itself).
    pub fn recover(&mut self, next: &[u8]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.last_frame * self.channels];
        let n = self
            .dec
            .decode_float(next, &mut out, true)
            .map_err(|e| opus_err("FEC recovery", e))?;
        out.truncate(n * self.channels);
        Ok(out)
    }
}

/// Pre-skip (samples at 48 kHz to drop from the start) from an `OpusHead` header.
pub fn pre_skip(head: &[u8]) -> usize {
    if head.len() >= 12 && &head[..8] == b"OpusHead" {
        usize::from(u16::from_le_bytes([head[10], head[11]]))
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(frames: &[Vec<f32>], fec: bool) -> Vec<Vec<u8>> {
        let mut enc =
            opus::Encoder::new(OPUS_RATE, opus::Channels::Mono, opus::Application::Voip).unwrap();
        if fec {
            enc.set_inband_fec(true).unwrap();
            enc.set_packet_loss_perc(20).unwrap();
        }
        frames
            .iter()
            .map(|f| enc.encode_vec_float(f, 4000).unwrap())
            .collect()
    }

    fn tone_frames(n: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|k| {
                (0..960)
                    .map(|i| {
                        let t = (k * 960 + i) as f32 / OPUS_RATE as f32;
                        0.5 * (2.0 * std::f32::consts::PI * 300.0 * t).sin()
                    })
                    .collect()
            })
            .collect()
    }

    fn energy(x: &[f32]) -> f32 {
        x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32
    }

    #[test]
    fn packets_decode_and_losses_are_concealed() {
        let frames = tone_frames(20);
        let packets = encode(&frames, true);
        let mut dec = OpusPacketDecoder::new(1).unwrap();
        let mut out = Vec::new();
        for (k, p) in packets.iter().enumerate() {
            match k {
                // Packet 8 is lost and recovered from packet 9's FEC; packet 14 is lost outright.
                8 => {}
                9 => {
                    out.extend(dec.recover(p).unwrap());
                    out.extend(dec.decode(p).unwrap());
                }
                14 => out.extend(dec.conceal().unwrap()),
                _ => out.extend(dec.decode(p).unwrap()),
            }
        }
        assert_eq!(
            out.len(),
            20 * 960,
            "every 20 ms slot yields 20 ms of audio"
        );
        // The tone's energy (0.125) survives in the recovered and concealed slots.
        for k in [8, 14] {
            let e = energy(&out[k * 960..(k + 1) * 960]);
            assert!(e > 0.03, "slot {k} energy {e}");
        }
        assert!((energy(&out[5 * 960..6 * 960]) - 0.125).abs() < 0.03);
    }

    #[test]
    fn garbage_packets_and_bad_channels_are_errors() {
        let mut dec = OpusPacketDecoder::new(1).unwrap();
        // A TOC byte claiming a code-3 packet with an impossible frame count.
        let e = dec.decode(&[0x03, 0xff, 0xff]).unwrap_err();
        assert!(
            e.to_string().starts_with("corrupt audio: opus packet"),
            "{e}"
        );
        assert!(matches!(
            OpusPacketDecoder::new(3),
            Err(AudioError::Channels { channels: 3, .. })
        ));
        assert_eq!(
            pre_skip(b"OpusHead\x01\x02\x38\x01\x80\xbb\x00\x00\x00\x00\x00"),
            312
        );
        assert_eq!(pre_skip(b"nope"), 0);
    }
}
