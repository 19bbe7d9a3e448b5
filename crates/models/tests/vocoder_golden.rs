//! Vocoders against the PyTorch reference (`scripts/nexus_reference.py`):
//! FireFly-GAN waveforms from codes (whole and in chunks), and HiFi-GAN
//! waveforms from a checkpoint saved like the universal one (legacy torch
//! pickle with weight norm), converted by `nexus-weights`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use nexus_models::vocoder::{Firefly, FireflyStream, HifiGan};

mod common;
use common::max_abs_diff;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/nexus")
}

fn golden() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("golden.safetensors"), &Device::Cpu).unwrap()
}

fn firefly() -> Firefly {
    Firefly::load(&dir().join("firefly-tiny"), &Device::Cpu).unwrap()
}

fn frames_of(codes: &Tensor) -> Vec<Vec<u32>> {
    // (1, groups, T) → T × groups
    let c = codes
        .squeeze(0)
        .unwrap()
        .t()
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    c.to_vec2::<u32>().unwrap()
}

#[test]
fn firefly_dequantisation_and_waveform_match() {
    let g = golden();
    let f = firefly();
    let codes = g["firefly.codes"].to_dtype(DType::U32).unwrap();
    let z = f.dequantize(&codes).unwrap();
    let d = max_abs_diff(&z, &g["firefly.latent"]);
    assert!(d < 1e-4, "latent: max abs diff {d}");
    let wave = f.decode(&codes).unwrap();
    assert_eq!(wave.dims(), &[1, 23 * f.hop()]);
    let d = max_abs_diff(&wave, &g["firefly.wave"]);
    assert!(d < 1e-4, "waveform: max abs diff {d}");
}

#[test]
fn firefly_decodes_the_audio_decoders_codes() {
    let g = golden();
    let f = firefly();
    let frames: Vec<Vec<u32>> = g["audio.codes"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let wave = f.decode_frames(&frames).unwrap();
    let want = g["firefly.from_audio"].flatten_all().unwrap();
    let d = max_abs_diff(&Tensor::new(wave.as_slice(), &Device::Cpu).unwrap(), &want);
    assert!(d < 1e-4, "max abs diff {d}");
}

#[test]
fn firefly_in_chunks_equals_one_decode() {
    let g = golden();
    let f = Arc::new(firefly());
    let frames = frames_of(&g["firefly.codes"]);
    let whole = f.decode_frames(&frames).unwrap();
    let ctx = f.receptive_frames();
    assert!(
        ctx > 0 && ctx < frames.len(),
        "receptive field {ctx} frames"
    );
    let mut stream = FireflyStream::new(f.clone());
    let mut chunked = Vec::new();
    let mut at = 0;
    for n in [1, 4, 2, 7, 9] {
        let end = (at + n).min(frames.len());
        chunked.extend(stream.push(&frames[at..end]).unwrap());
        at = end;
    }
    assert_eq!(at, frames.len());
    assert_eq!(chunked.len(), whole.len());
    let d = chunked
        .iter()
        .zip(&whole)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(d < 1e-5, "chunked vs whole: max abs diff {d}");
}

#[test]
fn firefly_refuses_codes_outside_its_codebook() {
    let f = firefly();
    let e = f.decode_frames(&[vec![15; 8]]).unwrap_err().to_string();
    assert!(e.contains("code 15") && e.contains("15"), "{e}");
    let e = f.decode_frames(&[vec![1; 7]]).unwrap_err().to_string();
    assert!(e.contains("7 codebooks"), "{e}");
}

#[test]
fn hifigan_from_a_legacy_pickle_with_weight_norm_matches() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let report = nexus_weights::hifigan::import(&dir().join("hifigan-tiny"), tmp.path()).unwrap();
    assert!(report.folded > 10, "{report:?}");
    let h = HifiGan::load(tmp.path(), &Device::Cpu).unwrap();
    let wave = h.forward(&g["hifigan.mel"]).unwrap();
    assert_eq!(wave.dims(), &[1, 30 * h.hop()]);
    let d = max_abs_diff(&wave, &g["hifigan.wave"]);
    assert!(d < 1e-4, "waveform: max abs diff {d}");
}
