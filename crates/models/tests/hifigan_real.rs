//! HiFi-GAN V1 universal on real speech: copy-synthesis (mel → waveform →
//! mel) of a LibriVox clip must land far closer to the original's log-mel
//! than noise of the same loudness does.
//!
//! Needs `nexus models pull hifigan-universal` and `scripts/fetch-testdata.sh`
//! (the test script does both).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use nexus_models::vocoder::HifiGan;

fn testdata() -> PathBuf {
    std::env::var_os("NEXUS_TESTDATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/testdata"))
}

fn l1(a: &Tensor, b: &Tensor) -> f32 {
    let n = a.dim(1).unwrap().min(b.dim(1).unwrap());
    (a.narrow(1, 0, n).unwrap() - b.narrow(1, 0, n).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
#[ignore = "needs the hifigan-universal weights and the pocketsphinx test data"]
fn copy_synthesis_of_real_speech_is_far_closer_than_noise() {
    let dir = nexus_weights::Store::new(nexus_weights::Store::default_root())
        .model_dir("hifigan-universal");
    let h = HifiGan::load(&dir, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{e}: run `nexus models pull hifigan-universal` first"));
    let path = testdata().join("librivox/sense_and_sensibility_01_austen_64kb-0870.wav");
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/fetch-testdata.sh", path.display()));
    let a = nexus_audio::decode_bytes(bytes, None, &nexus_audio::AudioLimits::default()).unwrap();
    let rate = h.config().sampling_rate;
    let speech = nexus_audio::resample(&a.channels[..1], a.sample_rate, rate)
        .unwrap()
        .remove(0);
    let speech = &speech[..(4 * rate as usize).min(speech.len())];

    let mel = h.mel_spectrogram(speech).unwrap();
    let t0 = std::time::Instant::now();
    let wave = h.synthesize(&mel).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(wave.len(), mel.dim(1).unwrap() * h.hop());
    let copy = l1(&mel, &h.mel_spectrogram(&wave).unwrap());

    // Noise as loud as the speech (a fixed LCG, so the figure repeats).
    let rms = (speech.iter().map(|x| x * x).sum::<f32>() / speech.len() as f32).sqrt();
    let mut s = 0x2545_f491_u32;
    let noise: Vec<f32> = (0..speech.len())
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * rms * 3f32.sqrt()
        })
        .collect();
    let noise_l1 = l1(&mel, &h.mel_spectrogram(&noise).unwrap());
    eprintln!(
        "log-mel L1: copy-synthesis {copy:.3}, noise {noise_l1:.3}; {:.2} s of audio in {secs:.2} s",
        speech.len() as f64 / f64::from(rate)
    );
    assert!(
        copy < 0.5 * noise_l1,
        "copy-synthesis {copy} vs noise {noise_l1}"
    );
    assert!(copy < 0.6, "copy-synthesis log-mel L1 {copy}");
}
