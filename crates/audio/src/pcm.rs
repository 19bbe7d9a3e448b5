//! Raw PCM as sent on live streams: interleaved s16le or f32le at a declared
//! rate and channel count, in chunks that may split a sample anywhere.

use crate::error::{AudioError, Result};
use crate::limits::AudioLimits;

/// Encoding of one raw sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleFormat {
    /// Signed 16-bit little-endian.
    S16Le,
    /// IEEE 754 32-bit float little-endian, nominally in [-1, 1].
    F32Le,
    /// ITU-T G.711 mu-law, one byte a sample (North American telephony).
    MuLaw,
    /// ITU-T G.711 A-law, one byte a sample (European telephony).
    ALaw,
}

/// The 16-bit linear value of a G.711 mu-law byte.
pub fn mulaw(byte: u8) -> i16 {
    const BIAS: i32 = 0x84;
    let u = !byte;
    let t = ((i32::from(u & 0x0f) << 3) + BIAS) << ((u & 0x70) >> 4);
    (if u & 0x80 != 0 { BIAS - t } else { t - BIAS }) as i16
}

/// The 16-bit linear value of a G.711 A-law byte.
pub fn alaw(byte: u8) -> i16 {
    let a = byte ^ 0x55;
    let mut t = i32::from(a & 0x0f) << 4;
    match (a & 0x70) >> 4 {
        0 => t += 8,
        1 => t += 0x108,
        seg => t = (t + 0x108) << (seg - 1),
    }
    (if a & 0x80 != 0 { t } else { -t }) as i16
}

impl SampleFormat {
    /// Bytes per sample.
    pub fn bytes(self) -> usize {
        match self {
            SampleFormat::S16Le => 2,
            SampleFormat::F32Le => 4,
            SampleFormat::MuLaw | SampleFormat::ALaw => 1,
        }
    }
}

/// Declared layout of a raw PCM stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcmSpec {
    /// Sample encoding.
    pub format: SampleFormat,
    /// Frames per second.
    pub sample_rate: u32,
    /// Interleaved channels per frame.
    pub channels: u32,
}

impl PcmSpec {
    fn frame_bytes(&self) -> usize {
        self.format.bytes() * self.channels as usize
    }
}

/// Incremental decoder for a raw PCM stream. Bytes of a frame split across
/// chunks are kept until the rest arrives; limits are enforced as bytes come.
#[derive(Debug)]
pub struct PcmDecoder {
    spec: PcmSpec,
    limits: AudioLimits,
    carry: Vec<u8>,
    bytes_seen: u64,
    frames_out: u64,
}

impl PcmDecoder {
    /// Validates the declared spec against `limits`.
    pub fn new(spec: PcmSpec, limits: AudioLimits) -> Result<Self> {
        limits.check_format(spec.sample_rate, spec.channels)?;
        Ok(Self {
            spec,
            limits,
            carry: Vec::new(),
            bytes_seen: 0,
            frames_out: 0,
        })
    }

    /// The declared spec.
    pub fn spec(&self) -> PcmSpec {
        self.spec
    }

    /// Frames decoded so far.
    pub fn frames(&self) -> u64 {
        self.frames_out
    }

    /// Decodes a chunk into planar channels (`out[c]` gets the new samples of
    /// channel `c`). Returns the number of whole frames appended.
    pub fn push(&mut self, chunk: &[u8], out: &mut [Vec<f32>]) -> Result<usize> {
        assert_eq!(
            out.len(),
            self.spec.channels as usize,
            "one output per channel; this is a bug"
        );
        self.bytes_seen += chunk.len() as u64;
        self.limits.check_bytes(self.bytes_seen)?;
        let fb = self.spec.frame_bytes();
        let mut data = std::mem::take(&mut self.carry);
        data.extend_from_slice(chunk);
        let whole = data.len() / fb * fb;
        let frames = whole / fb;
        self.limits
            .check_frames(self.frames_out + frames as u64, self.spec.sample_rate)?;
        let ch = self.spec.channels as usize;
        for o in out.iter_mut() {
            o.reserve(frames);
        }
        match self.spec.format {
            SampleFormat::S16Le => {
                for (i, s) in data[..whole].chunks_exact(2).enumerate() {
                    let v = i16::from_le_bytes([s[0], s[1]]);
                    out[i % ch].push(f32::from(v) / 32768.0);
                }
            }
            SampleFormat::F32Le => {
                for (i, s) in data[..whole].chunks_exact(4).enumerate() {
                    let v = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                    if !v.is_finite() {
                        return Err(AudioError::NonFinite {
                            index: self.frames_out as usize * ch + i,
                        });
                    }
                    out[i % ch].push(v.clamp(-1.0, 1.0));
                }
            }
            SampleFormat::MuLaw => {
                for (i, b) in data[..whole].iter().enumerate() {
                    out[i % ch].push(f32::from(mulaw(*b)) / 32768.0);
                }
            }
            SampleFormat::ALaw => {
                for (i, b) in data[..whole].iter().enumerate() {
                    out[i % ch].push(f32::from(alaw(*b)) / 32768.0);
                }
            }
        }
        self.carry = data.split_off(whole);
        self.frames_out += frames as u64;
        Ok(frames)
    }

    /// Ends the stream; stray bytes of an incomplete frame are an error.
    pub fn finish(self) -> Result<u64> {
        if !self.carry.is_empty() {
            return Err(AudioError::PartialFrame {
                leftover: self.carry.len(),
                frame_bytes: self.spec.frame_bytes(),
                channels: self.spec.channels,
                sample_bytes: self.spec.format.bytes(),
            });
        }
        Ok(self.frames_out)
    }
}

/// Decodes a whole raw PCM buffer into planar channels.
pub fn decode_all(bytes: &[u8], spec: PcmSpec, limits: &AudioLimits) -> Result<Vec<Vec<f32>>> {
    if bytes.is_empty() {
        return Err(AudioError::Empty);
    }
    let mut dec = PcmDecoder::new(spec, limits.clone())?;
    let mut out = vec![Vec::new(); spec.channels as usize];
    dec.push(bytes, &mut out)?;
    dec.finish()?;
    Ok(out)
}

/// Mixes planar channels down to mono by averaging.
pub fn downmix(channels: &[Vec<f32>]) -> Vec<f32> {
    match channels {
        [] => Vec::new(),
        [mono] => mono.clone(),
        _ => {
            let n = channels.iter().map(Vec::len).min().unwrap_or(0);
            let scale = 1.0 / channels.len() as f32;
            (0..n)
                .map(|i| channels.iter().map(|c| c[i]).sum::<f32>() * scale)
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(format: SampleFormat, channels: u32) -> PcmSpec {
        PcmSpec {
            format,
            sample_rate: 16_000,
            channels,
        }
    }

    #[test]
    fn g711_bytes_decode_to_the_standard_linear_values() {
        // Points and sums of the ITU-T G.711 tables (as CPython's audioop gives them).
        let mu = [
            (0x00, -32124),
            (0x0f, -16764),
            (0x55, -716),
            (0x7f, 0),
            (0x80, 32124),
            (0xaa, 5372),
            (0xd5, 716),
            (0xff, 0),
        ];
        let a = [
            (0x00, -5504),
            (0x0f, -6784),
            (0x55, -8),
            (0x7f, -848),
            (0x80, 5504),
            (0xaa, 32256),
            (0xd5, 8),
            (0xff, 848),
        ];
        for (b, v) in mu {
            assert_eq!(mulaw(b), v, "mu-law {b:#04x}");
        }
        for (b, v) in a {
            assert_eq!(alaw(b), v, "A-law {b:#04x}");
        }
        let abs = |f: fn(u8) -> i16| (0..=255u8).map(|b| i64::from(f(b)).abs()).sum::<i64>();
        assert_eq!(abs(mulaw), 1_532_928);
        assert_eq!(abs(alaw), 1_564_672);
        let mut dec =
            PcmDecoder::new(spec(SampleFormat::MuLaw, 1), AudioLimits::default()).unwrap();
        let mut out = vec![Vec::new()];
        assert_eq!(dec.push(&[0x80, 0xff, 0x00], &mut out).unwrap(), 3);
        assert_eq!(out[0], vec![32124.0 / 32768.0, 0.0, -32124.0 / 32768.0]);
    }

    #[test]
    fn s16_stereo_split_mid_sample_equals_whole() {
        let frames: Vec<(i16, i16)> = (0..1000)
            .map(|i| ((i * 37) as i16, -(i as i16) * 11))
            .collect();
        let bytes: Vec<u8> = frames
            .iter()
            .flat_map(|(l, r)| [l.to_le_bytes(), r.to_le_bytes()].concat())
            .collect();
        let whole = decode_all(
            &bytes,
            spec(SampleFormat::S16Le, 2),
            &AudioLimits::default(),
        )
        .unwrap();
        let mut dec =
            PcmDecoder::new(spec(SampleFormat::S16Le, 2), AudioLimits::default()).unwrap();
        let mut out = vec![Vec::new(), Vec::new()];
        // Chunk sizes that are not multiples of the 4-byte frame.
        for chunk in bytes.chunks(7) {
            dec.push(chunk, &mut out).unwrap();
        }
        assert_eq!(dec.finish().unwrap(), 1000);
        assert_eq!(out, whole);
        assert_eq!(out[0][3], f32::from(frames[3].0) / 32768.0);
        assert_eq!(out[1][999], f32::from(frames[999].1) / 32768.0);
    }

    #[test]
    fn f32_roundtrip_and_non_finite_refused() {
        let samples = [0.5f32, -0.25, 1.0, -1.0];
        let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        let out = decode_all(
            &bytes,
            spec(SampleFormat::F32Le, 1),
            &AudioLimits::default(),
        )
        .unwrap();
        assert_eq!(out[0], samples);
        let bad: Vec<u8> = [0.1f32, f32::NAN]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        let err =
            decode_all(&bad, spec(SampleFormat::F32Le, 1), &AudioLimits::default()).unwrap_err();
        assert_eq!(err, AudioError::NonFinite { index: 1 });
    }

    #[test]
    fn stray_bytes_and_empty_are_errors() {
        let err = decode_all(
            &[1, 2, 3],
            spec(SampleFormat::S16Le, 1),
            &AudioLimits::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("PCM stream ended with 1 stray bytes"),
            "{err}"
        );
        let err =
            decode_all(&[], spec(SampleFormat::S16Le, 1), &AudioLimits::default()).unwrap_err();
        assert_eq!(err, AudioError::Empty);
    }

    #[test]
    fn limits_apply_while_streaming() {
        let limits = AudioLimits {
            max_seconds: 0.01,
            ..AudioLimits::default()
        };
        let mut dec = PcmDecoder::new(spec(SampleFormat::S16Le, 1), limits).unwrap();
        let mut out = vec![Vec::new()];
        dec.push(&[0u8; 2 * 160], &mut out).unwrap();
        let err = dec.push(&[0u8; 2], &mut out).unwrap_err();
        assert!(matches!(err, AudioError::TooLong { .. }), "{err}");
        let err = PcmDecoder::new(
            spec(SampleFormat::S16Le, 1).with_rate(1_000),
            AudioLimits::default(),
        )
        .unwrap_err();
        assert!(matches!(err, AudioError::SampleRate { rate: 1_000, .. }));
    }

    #[test]
    fn downmix_averages() {
        let m = downmix(&[vec![1.0, 0.0, 0.5], vec![0.0, 1.0, 0.5]]);
        assert_eq!(m, vec![0.5, 0.5, 0.5]);
        assert_eq!(downmix(&[vec![0.1, 0.2]]), vec![0.1, 0.2]);
    }

    impl PcmSpec {
        fn with_rate(mut self, rate: u32) -> Self {
            self.sample_rate = rate;
            self
        }
    }
}
