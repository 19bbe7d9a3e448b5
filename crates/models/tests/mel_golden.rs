//! The log-mel frontend against values from an independent numpy + librosa
//! implementation (`tests/golden/make_mel_golden.py`).

use candle_core::{Device, Tensor};
use nexus_models::mel::{MelFrontend, N_FFT, SAMPLE_RATE, mel_filter_bank};

fn golden(name: &str) -> Vec<f32> {
    let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    Tensor::read_npy(&path)
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn filter_banks_match_librosa() {
    for n in [80, 128] {
        let ours = mel_filter_bank(SAMPLE_RATE, N_FFT, n);
        let theirs = golden(&format!("mel_filters_{n}.npy"));
        let d = max_abs_diff(&ours, &theirs);
        assert!(d < 1e-6, "{n} bins: max abs diff {d}");
    }
}

#[test]
fn log_mel_matches_reference() {
    let audio = golden("mel_input.npy");
    for n in [80, 128] {
        let fe = MelFrontend::new(n).unwrap();
        let ours = fe.compute(&audio, 0).unwrap();
        let theirs = golden(&format!("log_mel_{n}.npy"));
        assert_eq!(ours.frames * n, theirs.len());
        let d = max_abs_diff(&ours.data, &theirs);
        // f32 FFT against a float64 reference; values span about [-1, 1.5].
        assert!(d < 2e-4, "{n} bins: max abs diff {d}");
        let t = ours.to_tensor(&Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, n, ours.frames]);
    }
}
