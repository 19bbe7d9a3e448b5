//! Whole files in any container symphonia reads (WAV, FLAC, MP3, Ogg Vorbis,
//! AAC/M4A, AIFF, CAF, MKV/WebM audio), decoded to planar `f32`.

use std::io::Cursor;

use symphonia::core::codecs::CodecParameters;
use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, TrackType};
use symphonia::core::io::{MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;

use crate::MODEL_SAMPLE_RATE;
use crate::error::{AudioError, Result};
use crate::limits::AudioLimits;
use crate::resample::StreamResampler;

/// Decoded audio at its native rate.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedAudio {
    /// Frames per second.
    pub sample_rate: u32,
    /// Planar samples, one vector per channel.
    pub channels: Vec<Vec<f32>>,
}

impl DecodedAudio {
    /// Duration in seconds.
    pub fn duration(&self) -> f64 {
        self.channels.first().map_or(0, Vec::len) as f64 / f64::from(self.sample_rate.max(1))
    }
}

fn sym_err(e: SymError) -> AudioError {
    match e {
        SymError::Unsupported(what) => AudioError::Unsupported(what.to_owned()),
        SymError::DecodeError(what) => AudioError::Corrupt(what.to_owned()),
        SymError::LimitError(what) => {
            AudioError::Corrupt(format!("exceeds a decoder limit: {what}"))
        }
        SymError::IoError(e) => AudioError::Corrupt(format!("truncated or unreadable: {e}")),
        other => AudioError::Corrupt(other.to_string()),
    }
}

/// Checks a WAV file's `fmt ` chunk against the limits before any decoder
/// reads it, so absurd headers get a precise error (the fuzzer found one that
/// overflows arithmetic inside symphonia's WAV reader).
fn check_wav_header(bytes: &[u8], limits: &AudioLimits) -> Result<()> {
    // The probe skips leading junk (ID3/APE tags, garbage), so look where it would.
    let window = &bytes[..bytes.len().min(1 << 20)];
    let Some(riff) = window
        .windows(12)
        .position(|w| &w[..4] == b"RIFF" && &w[8..12] == b"WAVE")
    else {
        return Ok(());
    };
    let mut pos = riff + 12;
    while pos.saturating_add(8) <= bytes.len() {
        let id = &bytes[pos..pos + 4];
        let size = u32::from_le_bytes([
            bytes[pos + 4],
            bytes[pos + 5],
            bytes[pos + 6],
            bytes[pos + 7],
        ]) as usize;
        if id == b"fmt " {
            let body = &bytes[pos + 8..bytes.len().min(pos.saturating_add(8).saturating_add(size))];
            if body.len() < 16 {
                return Err(AudioError::Corrupt(
                    "WAV fmt chunk is shorter than 16 bytes".into(),
                ));
            }
            let channels = u32::from(u16::from_le_bytes([body[2], body[3]]));
            let rate = u32::from_le_bytes([body[4], body[5], body[6], body[7]]);
            return limits.check_format(rate, channels);
        }
        // Chunks are word-aligned.
        pos = pos
            .saturating_add(8)
            .saturating_add(size)
            .saturating_add(size & 1);
    }
    Ok(())
}

/// Where decoded packets go: planar `f32` at the file's rate, one call per packet.
type Sink<'a> = dyn FnMut(u32, &[Vec<f32>]) -> Result<()> + 'a;

/// Decodes a whole file held in memory. `extension` (e.g. `"mp3"`) is a hint
/// only; the container is detected from its bytes.
///
/// A panic inside a third-party demuxer or codec on malformed data is contained
/// and reported as [`AudioError::Corrupt`]: bad input must never take down the
/// task (or the other sessions) that decodes it.
pub fn decode_bytes(
    bytes: Vec<u8>,
    extension: Option<&str>,
    limits: &AudioLimits,
) -> Result<DecodedAudio> {
    let mut rate = 0;
    let mut channels: Vec<Vec<f32>> = Vec::new();
    decode_with(bytes, extension, limits, &mut |r, planar| {
        rate = r;
        if channels.is_empty() {
            channels = vec![Vec::new(); planar.len()];
        }
        for (dst, src) in channels.iter_mut().zip(planar) {
            dst.extend_from_slice(src);
        }
        Ok(())
    })?;
    Ok(DecodedAudio {
        sample_rate: rate,
        channels,
    })
}

/// What to keep of a file's channels at the model rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// All channels averaged into one.
    Mono,
    /// Each channel on its own.
    PerChannel,
}

/// Decodes a whole file straight to [`MODEL_SAMPLE_RATE`]: each packet is
/// downmixed (or kept per channel) and resampled as it comes, so memory holds
/// the model-rate output, never the file's native samples, and the output is
/// bounded by `limits.max_decoded_samples` whatever the header claims.
pub fn decode_to_model_rate(
    bytes: Vec<u8>,
    extension: Option<&str>,
    limits: &AudioLimits,
    layout: Layout,
) -> Result<Vec<Vec<f32>>> {
    let mut out: Vec<Vec<f32>> = Vec::new();
    let mut resamplers: Vec<StreamResampler> = Vec::new();
    let mut stored = 0u64;
    decode_with(bytes, extension, limits, &mut |rate, planar| {
        if resamplers.is_empty() {
            let n = match layout {
                Layout::Mono => 1,
                Layout::PerChannel => planar.len(),
            };
            resamplers = (0..n)
                .map(|_| StreamResampler::new(rate, MODEL_SAMPLE_RATE))
                .collect::<Result<_>>()?;
            out = vec![Vec::new(); n];
        }
        let before: usize = out.iter().map(Vec::len).sum();
        match layout {
            Layout::Mono => resamplers[0].push(&crate::pcm::downmix(planar), &mut out[0])?,
            Layout::PerChannel => {
                for ((r, o), c) in resamplers.iter_mut().zip(&mut out).zip(planar) {
                    r.push(c, o)?;
                }
            }
        }
        stored += (out.iter().map(Vec::len).sum::<usize>() - before) as u64;
        limits.check_decoded(stored)
    })?;
    for (r, o) in resamplers.iter_mut().zip(&mut out) {
        r.finish(o)?;
    }
    Ok(out)
}

fn decode_with(
    bytes: Vec<u8>,
    extension: Option<&str>,
    limits: &AudioLimits,
    sink: &mut Sink<'_>,
) -> Result<()> {
    if bytes.is_empty() {
        return Err(AudioError::Empty);
    }
    limits.check_bytes(bytes.len() as u64)?;
    let bytes = crate::wav::repair_riff(bytes);
    check_wav_header(&bytes, limits)?;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        decode_inner(bytes, extension, limits, sink)
    }))
    .unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown failure".into());
        Err(AudioError::Corrupt(format!(
            "the decoder failed on malformed data ({what})"
        )))
    })
}

fn decode_inner(
    bytes: Vec<u8>,
    extension: Option<&str>,
    limits: &AudioLimits,
    sink: &mut Sink<'_>,
) -> Result<()> {
    let mut hint = Hint::new();
    if let Some(ext) = extension {
        hint.with_extension(ext);
    }
    let mss = MediaSourceStream::new(
        Box::new(Cursor::new(bytes)),
        MediaSourceStreamOptions::default(),
    );
    let mut format = symphonia::default::get_probe()
        .probe(
            &hint,
            mss,
            FormatOptions::default(),
            MetadataOptions::default(),
        )
        .map_err(|e| match e {
            SymError::Unsupported(_) => AudioError::Unsupported(
                "not a recognised audio container (WAV, FLAC, MP3, Ogg, M4A/AAC, AIFF, CAF, MKV)"
                    .into(),
            ),
            other => sym_err(other),
        })?;
    let track = format
        .default_track(TrackType::Audio)
        .ok_or_else(|| AudioError::Unsupported("the file has no audio track".into()))?;
    let track_id = track.id;
    let Some(CodecParameters::Audio(params)) = track.codec_params.clone() else {
        return Err(AudioError::Unsupported(
            "the audio track has no codec parameters".into(),
        ));
    };
    if params.codec == symphonia::core::codecs::audio::well_known::CODEC_ID_OPUS {
        return decode_opus_packets(format.as_mut(), track_id, &params, limits, sink);
    }
    let mut decoder = symphonia::default::get_codecs()
        .make_audio_decoder(&params, &AudioDecoderOptions::default())
        .map_err(sym_err)?;
    let mut rate = params.sample_rate.unwrap_or(0);
    let mut n_channels = 0;
    let mut frames = 0u64;
    let mut planar: Vec<Vec<f32>> = Vec::new();
    loop {
        let packet = match format.next_packet() {
            Ok(Some(p)) => p,
            Ok(None) => break,
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(SymError::ResetRequired) => break,
            Err(e) => return Err(sym_err(e)),
        };
        if packet.track_id != track_id {
            continue;
        }
        let buf = match decoder.decode(&packet) {
            Ok(b) => b,
            // A damaged packet is skipped, as players do; a file of nothing but damage fails below.
            Err(SymError::DecodeError(_)) => continue,
            Err(e) => return Err(sym_err(e)),
        };
        let spec = buf.spec();
        if rate == 0 {
            rate = spec.rate();
        }
        let n_ch = spec.channels().count();
        if n_channels == 0 {
            limits.check_format(rate, n_ch as u32)?;
            n_channels = n_ch;
        } else if n_ch != n_channels {
            return Err(AudioError::Corrupt(format!(
                "channel count changed from {n_channels} to {n_ch} mid-stream"
            )));
        }
        buf.copy_to_vecs_planar::<f32>(&mut planar);
        let n = planar.first().map_or(0, Vec::len);
        if n == 0 {
            continue;
        }
        frames += n as u64;
        limits.check_frames(frames, rate)?;
        sink(rate, &planar)?;
    }
    if frames == 0 {
        return Err(AudioError::Empty);
    }
    Ok(())
}

/// Ogg Opus: symphonia demuxes, libopus decodes; the header's pre-skip is dropped.
fn decode_opus_packets(
    format: &mut dyn symphonia::core::formats::FormatReader,
    track_id: u32,
    params: &symphonia::core::codecs::audio::AudioCodecParameters,
    limits: &AudioLimits,
    sink: &mut Sink<'_>,
) -> Result<()> {
    let head = params.extra_data.as_deref().unwrap_or(&[]);
    let n_ch = params
        .channels
        .as_ref()
        .map(|c| c.count())
        .filter(|c| *c > 0)
        .or_else(|| head.get(9).map(|c| usize::from(*c)))
        .unwrap_or(1);
    limits.check_format(crate::opus::OPUS_RATE, n_ch as u32)?;
    let mut dec = crate::opus::OpusPacketDecoder::new(n_ch as u32)?;
    let mut skip = crate::opus::pre_skip(head) * n_ch;
    let mut planar = vec![Vec::new(); n_ch];
    let mut frames = 0u64;
    loop {
        let packet = match format.next_packet() {
            Ok(Some(p)) => p,
            Ok(None) => break,
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(sym_err(e)),
        };
        if packet.track_id != track_id {
            continue;
        }
        let pcm = dec.decode(&packet.data)?;
        let drop = skip.min(pcm.len());
        skip -= drop;
        planar.iter_mut().for_each(Vec::clear);
        for (i, v) in pcm[drop..].iter().enumerate() {
            planar[i % n_ch].push(*v);
        }
        let n = planar[0].len();
        if n == 0 {
            continue;
        }
        frames += n as u64;
        limits.check_frames(frames, crate::opus::OPUS_RATE)?;
        sink(crate::opus::OPUS_RATE, &planar)?;
    }
    if frames == 0 {
        return Err(AudioError::Empty);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 16-bit PCM WAV of interleaved samples.
    pub(crate) fn wav(samples: &[i16], rate: u32, channels: u16) -> Vec<u8> {
        let ch = usize::from(channels);
        let planar: Vec<Vec<f32>> = (0..ch)
            .map(|c| {
                samples
                    .iter()
                    .skip(c)
                    .step_by(ch)
                    .map(|v| f32::from(*v) / 32767.0)
                    .collect()
            })
            .collect();
        crate::wav::encode_pcm16(&planar, rate)
    }

    fn tone(n: usize) -> Vec<i16> {
        (0..n)
            .map(|i| ((i as f32 * 0.05).sin() * 12_000.0) as i16)
            .collect()
    }

    #[test]
    fn wav_decodes_to_the_samples() {
        let s = tone(4_000);
        let a = decode_bytes(wav(&s, 22_050, 1), Some("wav"), &AudioLimits::default()).unwrap();
        assert_eq!(a.sample_rate, 22_050);
        assert_eq!(a.channels.len(), 1);
        assert_eq!(a.channels[0].len(), s.len());
        let err = a.channels[0]
            .iter()
            .zip(&s)
            .map(|(x, y)| (x - f32::from(*y) / 32768.0).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-6, "{err}");
        // Stereo keeps its channels apart.
        let inter: Vec<i16> = s.iter().flat_map(|v| [*v, -*v]).collect();
        let a = decode_bytes(wav(&inter, 16_000, 2), None, &AudioLimits::default()).unwrap();
        assert_eq!(a.channels.len(), 2);
        assert!((a.channels[0][10] + a.channels[1][10]).abs() < 1e-6);
    }

    #[test]
    fn bad_audio_gives_named_errors_not_panics() {
        let limits = AudioLimits::default();
        assert_eq!(
            decode_bytes(Vec::new(), None, &limits).unwrap_err(),
            AudioError::Empty
        );
        let e = decode_bytes(
            b"this is a text file, not audio at all".to_vec(),
            Some("wav"),
            &limits,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("not a recognised audio container"),
            "{e}"
        );
        let full = wav(&tone(2_000), 16_000, 1);
        // Every truncation point: an error or a shorter decode, never a panic.
        for cut in [0usize, 4, 12, 20, 36, 40, 43, 44, 45, 1_000] {
            match decode_bytes(full[..cut].to_vec(), None, &limits) {
                Ok(a) => assert!(a.channels[0].len() < 2_000, "cut {cut}"),
                Err(e) => assert!(!e.to_string().is_empty(), "cut {cut}"),
            }
        }
        let tight = AudioLimits {
            max_seconds: 0.05,
            ..AudioLimits::default()
        };
        let e = decode_bytes(full.clone(), None, &tight).unwrap_err();
        assert!(matches!(e, AudioError::TooLong { .. }), "{e}");
        let e = decode_bytes(wav(&tone(100), 4_000, 1), None, &limits).unwrap_err();
        assert!(
            e.to_string()
                .contains("sample rate 4000 Hz is not supported"),
            "{e}"
        );
        // Headers that claim absurd sizes: refused or decoded as far as the bytes go, never trusted.
        let mut huge_channels = wav(&tone(64), 16_000, 1);
        huge_channels[22..24].copy_from_slice(&500u16.to_le_bytes());
        let e = decode_bytes(huge_channels, None, &limits).unwrap_err();
        assert_eq!(e.to_string(), "500 channels is more than the limit of 8");
        // The fuzzer's find: 63489 channels overflowed symphonia's block-align arithmetic.
        let crash: Vec<u8> = [
            82, 73, 70, 70, 100, 31, 0, 0, 87, 65, 86, 69, 102, 109, 116, 32, 16, 0, 0, 0, 1, 0, 1,
            248, 136, 62, 0, 0, 0, 125, 0, 0, 2, 0, 16, 0, 100, 97, 116, 97, 64, 31, 0, 0, 0, 0,
            205, 8, 87, 17, 93, 25,
        ]
        .to_vec();
        let e = decode_bytes(crash, None, &limits).unwrap_err();
        assert!(
            matches!(
                e,
                AudioError::Channels {
                    channels: 63489,
                    ..
                }
            ),
            "{e}"
        );
        let mut zero_rate = wav(&tone(64), 16_000, 1);
        zero_rate[24..28].copy_from_slice(&0u32.to_le_bytes());
        assert!(decode_bytes(zero_rate, None, &limits).is_err());
        let mut huge_data = wav(&tone(64), 16_000, 1);
        huge_data[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
        huge_data[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        match decode_bytes(huge_data, None, &limits) {
            Ok(a) => assert!(a.channels[0].len() <= 64),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        let small = AudioLimits {
            max_bytes: 100,
            ..AudioLimits::default()
        };
        assert!(matches!(
            decode_bytes(full, None, &small),
            Err(AudioError::TooLarge { .. })
        ));
    }

    #[test]
    fn model_rate_decoding_equals_decoding_then_resampling() {
        let s = tone(48_000);
        let inter: Vec<i16> = s.iter().flat_map(|v| [*v, v / 2]).collect();
        let f = wav(&inter, 48_000, 2);
        let limits = AudioLimits::default();
        let whole = decode_bytes(f.clone(), None, &limits).unwrap();
        let want = crate::to_model_rate(&whole.channels, 48_000).unwrap();
        let got = decode_to_model_rate(f.clone(), None, &limits, Layout::Mono).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].len(), want.len());
        let err = got[0]
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-3, "{err}");
        let per = decode_to_model_rate(f.clone(), None, &limits, Layout::PerChannel).unwrap();
        assert_eq!(per.len(), 2);
        assert_eq!(per[0].len(), 16_000);
        // The budget counts what is kept: two channels need twice the samples of one.
        let budget = AudioLimits {
            max_decoded_samples: 20_000,
            ..AudioLimits::default()
        };
        assert!(decode_to_model_rate(f.clone(), None, &budget, Layout::Mono).is_ok());
        let e = decode_to_model_rate(f, None, &budget, Layout::PerChannel).unwrap_err();
        assert!(
            e.to_string()
                .contains("the limit is 20000 samples (max_decoded_samples)"),
            "{e}"
        );
    }

    #[test]
    fn a_wav_whose_riff_length_is_off_decodes() {
        let s = tone(3_000);
        let mut f = wav(&s, 16_000, 1);
        let riff = (f.len() - 8 - 6) as u32;
        f[4..8].copy_from_slice(&riff.to_le_bytes());
        let a = decode_bytes(f, None, &AudioLimits::default()).unwrap();
        assert_eq!(a.channels[0].len(), s.len());
        let mut f = wav(&s, 16_000, 1);
        f[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        f[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
        let a = decode_bytes(f, None, &AudioLimits::default()).unwrap();
        assert_eq!(a.channels[0].len(), s.len());
    }
}
