//! The Piper voice in candle against ONNX Runtime running the voice's own
//! ONNX export (`scripts/piper_reference.py`), with the noise scales at zero:
//! prior means, durations and the waveform.
//!
//! Needs `nexus models pull piper-en-us-joe-medium` (the test script does it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use nexus_models::tts::{PiperVoice, SynthesisOptions};

mod common;
use common::max_abs_diff;

fn voice() -> PiperVoice {
    let dir = nexus_weights::Store::new(nexus_weights::Store::default_root())
        .model_dir("piper-en-us-joe-medium");
    PiperVoice::load(&dir, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{e}: run `nexus models pull piper-en-us-joe-medium` first"))
}

fn golden() -> std::collections::HashMap<String, Tensor> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/piper/golden.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

#[test]
#[ignore = "needs the piper-en-us-joe-medium voice"]
fn vits_in_candle_matches_onnx_runtime() {
    let g = golden();
    let v = voice();
    let ids: Vec<i64> = g["ids"].to_vec1().unwrap();
    assert_eq!(v.phoneme_ids("həlˈoʊ ðˈɛɹ."), ids, "phoneme framing");
    let (m, w, _) = v.latent_without_noise(&ids).unwrap();
    let d = max_abs_diff(&m, &g["m_p"]);
    assert!(d < 1e-3, "prior means: max abs diff {d}");
    let want_w: Vec<f32> = g["w"].flatten_all().unwrap().to_vec1().unwrap();
    let dw = w
        .iter()
        .zip(&want_w)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(
        dw < 1e-3,
        "durations: max abs diff {dw} ({w:?} vs {want_w:?})"
    );
    let opts = SynthesisOptions {
        noise_scale: 0.0,
        length_scale: 1.0,
        noise_w: 0.0,
        seed: 0,
    };
    let out = v.synthesize_ids(&ids, &opts).unwrap();
    let want = &g["wave"];
    assert_eq!(out.samples.len(), want.dim(0).unwrap(), "samples");
    let d = max_abs_diff(
        &Tensor::new(out.samples.as_slice(), &Device::Cpu).unwrap(),
        want,
    );
    eprintln!("waveform max abs diff vs ONNX Runtime: {d:.2e}");
    assert!(d < 1e-3, "waveform: max abs diff {d}");
}
