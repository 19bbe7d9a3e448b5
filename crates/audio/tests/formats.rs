//! Every container and codec users send, encoded by a real encoder (Debian's
//! flac, lame, oggenc; a committed AAC fixture) and decoded by our path, then
//! compared with the source signal.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic with its error

use std::path::Path;
use std::process::Command;

use nexus_audio::{AudioLimits, decode_bytes};

const RATE: u32 = 16_000;

fn source() -> Vec<f32> {
    (0..RATE as usize)
        .map(|i| {
            let t = i as f32 / RATE as f32;
            0.4 * (2.0 * std::f32::consts::PI * 440.0 * t).sin()
                + 0.2 * (2.0 * std::f32::consts::PI * 1000.0 * t).sin()
        })
        .collect()
}

fn wav_bytes(x: &[f32]) -> Vec<u8> {
    nexus_audio::wav::encode_pcm16(&[x.to_vec()], RATE)
}

/// Signal-to-noise ratio (dB) of `got` against `want` at the best alignment
/// within `max_lag` samples (lossy encoders add delay).
fn best_snr(want: &[f32], got: &[f32], max_lag: usize) -> (f32, usize) {
    let mut best = (f32::NEG_INFINITY, 0);
    let n = 12_000.min(want.len());
    for lag in 0..=max_lag {
        if lag + n > got.len() {
            break;
        }
        let (mut sig, mut err) = (0f32, 0f32);
        for i in 1_000..n {
            sig += want[i] * want[i];
            let d = got[i + lag] - want[i];
            err += d * d;
        }
        let snr = 10.0 * (sig / err.max(1e-12)).log10();
        if snr > best.0 {
            best = (snr, lag);
        }
    }
    best
}

fn encode(tool: &str, args: &[&str], input: &Path, output: &Path) {
    let mut cmd = Command::new(tool);
    for a in args {
        match *a {
            "IN" => cmd.arg(input),
            "OUT" => cmd.arg(output),
            a => cmd.arg(a),
        };
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e} (scripts/setup.sh installs it)"));
    assert!(
        out.status.success(),
        "{tool}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Encodes the source with `tool`, decodes the result; checks it comes back at `rate`, mono.
fn roundtrip_at(tool: &str, args: &[&str], ext: &str, rate: u32) -> Vec<f32> {
    let tmp = tempfile::tempdir().unwrap();
    let wav = tmp.path().join("in.wav");
    std::fs::write(&wav, wav_bytes(&source())).unwrap();
    let out = tmp.path().join(format!("out.{ext}"));
    encode(tool, args, &wav, &out);
    let a = decode_bytes(std::fs::read(&out).unwrap(), None, &AudioLimits::default())
        .unwrap_or_else(|e| panic!("{ext}: {e}"));
    assert_eq!((a.sample_rate, a.channels.len()), (rate, 1), "{ext}");
    a.channels.into_iter().next().unwrap()
}

fn roundtrip(tool: &str, args: &[&str], ext: &str) -> Vec<f32> {
    roundtrip_at(tool, args, ext, RATE)
}

/// The source as a 16-bit file holds it, read back at 1/32768 per step.
fn quantized() -> Vec<f32> {
    source()
        .iter()
        .map(|v| f32::from((v * 32767.0).round() as i16) / 32768.0)
        .collect()
}

#[test]
fn wav_pcm_is_exact() {
    let got = decode_bytes(wav_bytes(&source()), None, &AudioLimits::default()).unwrap();
    assert_eq!(got.channels[0], quantized());
}

#[test]
fn flac_is_lossless() {
    let got = roundtrip("flac", &["--silent", "-f", "-o", "OUT", "IN"], "flac");
    assert_eq!(got, quantized());
}

#[test]
fn mp3_decodes_close_to_the_source() {
    let got = roundtrip("lame", &["--quiet", "-b", "128", "IN", "OUT"], "mp3");
    let (snr, lag) = best_snr(&source(), &got, 2_500);
    assert!(snr > 20.0, "mp3 SNR {snr:.1} dB at lag {lag}");
}

#[test]
fn ogg_vorbis_decodes_close_to_the_source() {
    let got = roundtrip("oggenc", &["--quiet", "-q", "6", "-o", "OUT", "IN"], "ogg");
    let (snr, lag) = best_snr(&source(), &got, 2_500);
    assert!(snr > 20.0, "vorbis SNR {snr:.1} dB at lag {lag}");
}

#[test]
fn ogg_opus_decodes_close_to_the_source() {
    let got = roundtrip_at(
        "opusenc",
        &["--quiet", "--bitrate", "64", "IN", "OUT"],
        "opus",
        48_000,
    );
    // Opus decodes at 48 kHz: bring it back to the source rate before comparing.
    let got = nexus_audio::resample(&[got], 48_000, RATE)
        .unwrap()
        .remove(0);
    let (snr, lag) = best_snr(&source(), &got, 2_500);
    assert!(snr > 15.0, "opus SNR {snr:.1} dB at lag {lag}");
}

/// Ogg Opus bytes from opusenc for the source signal.
fn opus_file() -> Vec<u8> {
    let tmp = tempfile::tempdir().unwrap();
    let wav = tmp.path().join("in.wav");
    std::fs::write(&wav, wav_bytes(&source())).unwrap();
    let out = tmp.path().join("out.opus");
    encode(
        "opusenc",
        &["--quiet", "--bitrate", "64", "IN", "OUT"],
        &wav,
        &out,
    );
    std::fs::read(out).unwrap()
}

#[test]
fn ogg_opus_stream_in_odd_chunks_equals_the_whole_file() {
    let bytes = opus_file();
    let whole = decode_bytes(bytes.clone(), None, &AudioLimits::default()).unwrap();
    let mut stream = nexus_audio::OggOpusStream::new();
    let mut got = Vec::new();
    // MediaRecorder-like chunking: sizes unrelated to page boundaries (every page CRC is checked).
    for chunk in bytes.chunks(997) {
        got.extend(stream.push(chunk).unwrap());
    }
    assert_eq!(stream.channels(), Some(1));
    assert_eq!(got, whole.channels[0]);
    // A damaged byte inside a page is caught by its checksum.
    let mut damaged = bytes.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x40;
    let mut stream = nexus_audio::OggOpusStream::new();
    let err = damaged
        .chunks(997)
        .map(|c| stream.push(c))
        .find_map(Result::err)
        .expect("damage must be detected");
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
}

#[test]
fn aac_in_mp4_decodes_close_to_the_source() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tone.m4a");
    let a = decode_bytes(
        std::fs::read(path).unwrap(),
        Some("m4a"),
        &AudioLimits::default(),
    )
    .unwrap();
    assert_eq!((a.sample_rate, a.channels.len()), (RATE, 1));
    let (snr, lag) = best_snr(&source(), &a.channels[0], 3_000);
    assert!(snr > 15.0, "aac SNR {snr:.1} dB at lag {lag}");
}
