//! Silero VAD in candle against the silero-vad package's own reference forward
//! pass (`tinygrad_model.py`, run by tinygrad: `tests/golden/vad/make_vad_golden.py`)
//! on a committed clip of silence, real speech, faint noise and a loud hum.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use nexus_models::vad::{CHUNK, SileroVad, VadState};

fn weights() -> PathBuf {
    nexus_weights::Store::new(nexus_weights::Store::default_root())
        .source_dir("silero-vad")
        .join("model.safetensors")
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/vad")
}

fn clip() -> Vec<f32> {
    let bytes = std::fs::read(golden_dir().join("vad_clip.wav")).expect("committed clip");
    let a = nexus_audio::decode_bytes(bytes, Some("wav"), &nexus_audio::AudioLimits::default())
        .expect("wav");
    assert_eq!(a.sample_rate, 16_000);
    a.channels.into_iter().next().expect("mono")
}

#[test]
#[ignore = "needs the silero-vad weights (nexus models pull silero-vad)"]
fn matches_reference_probabilities() {
    let vad = SileroVad::load(&weights(), &Device::Cpu).expect("nexus models pull silero-vad");
    let ours = vad.probabilities(&clip()).unwrap();
    let reference: Vec<f32> = Tensor::read_npy(golden_dir().join("vad_probs.npy"))
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(ours.len(), reference.len());
    let max_diff = ours
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    let agree = ours
        .iter()
        .zip(&reference)
        .filter(|(a, b)| (**a > 0.5) == (**b > 0.5))
        .count();
    eprintln!(
        "max |diff| {max_diff:.2e}; decisions agree on {agree}/{} steps",
        reference.len()
    );
    assert!(max_diff < 1e-3, "max abs diff {max_diff}");
    assert!(agree * 100 >= reference.len() * 99);
    // The clip's parts: silence, then speech, then noise and hum are not speech.
    assert!(ours[..25].iter().all(|p| *p < 0.5));
    assert!(ours[40..120].iter().filter(|p| **p > 0.5).count() > 50);
}

#[test]
#[ignore = "needs the silero-vad weights (nexus models pull silero-vad)"]
fn batched_streams_equal_single_streams() {
    let vad = SileroVad::load(&weights(), &Device::Cpu).unwrap();
    let a = clip();
    let b: Vec<f32> = a.iter().rev().copied().collect();
    let single_a = vad.probabilities(&a).unwrap();
    let single_b = vad.probabilities(&b).unwrap();
    let (mut sa, mut sb) = (VadState::default(), VadState::default());
    for (k, (ca, cb)) in a.chunks_exact(CHUNK).zip(b.chunks_exact(CHUNK)).enumerate() {
        let p = vad.step(&mut [&mut sa, &mut sb], &[ca, cb]).unwrap();
        assert!(
            (p[0] - single_a[k]).abs() < 1e-5 && (p[1] - single_b[k]).abs() < 1e-5,
            "step {k}"
        );
    }
}

#[test]
fn bad_inputs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let e = SileroVad::load(&tmp.path().join("absent.safetensors"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("absent.safetensors"), "{e}");
}
