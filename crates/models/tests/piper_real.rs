//! The Piper voice in candle against ONNX Runtime running the voice's own
//! ONNX export (`scripts/piper_reference.py`), with the noise scales at zero:
//! prior means, durations and the waveform.
//!
//! Needs `nexus models pull piper-en-us-joe-medium` (the test script does it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use nexus_models::tts::{PiperVoice, SynthesisOptions};

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

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
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

/// Twenty everyday sentences of the kind the fleet captions (meetings,
/// plans, news), written for this check and fixed before it was first run.
pub const SENTENCES: [&str; 20] = [
    "Good morning everyone, thank you for joining the call today.",
    "Let's start with a quick review of last week's action items.",
    "The new release is scheduled for the end of next month.",
    "Could you share your screen so we can all see the numbers?",
    "Our customers asked for better support on mobile devices.",
    "I will send the meeting notes to the whole team this afternoon.",
    "The budget for the second quarter has been approved.",
    "We need more time to finish testing the payment system.",
    "Please remember to update your tickets before Friday.",
    "The weather forecast says it will rain all weekend.",
    "She has been working on this project for three years.",
    "Traffic was heavy on the way to the office this morning.",
    "The library closes at six o'clock on weekdays.",
    "He bought fresh bread and cheese at the market.",
    "Our team won the regional competition last spring.",
    "The train to the airport leaves every twenty minutes.",
    "Let me know if you have any questions about the plan.",
    "The results will be published on the website tomorrow.",
    "We should schedule another meeting to discuss the design.",
    "Thank you all for your hard work, and have a great week.",
];

/// Twenty Harvard sentences (IEEE 1969, lists 1 and 2): phonetically
/// balanced and hard on purpose; reported, not held to the bound.
pub const HARVARD: [&str; 20] = [
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
];

/// Word error rate of whisper base on the voice reading `texts` (default
/// scales, one seed per sentence), and the synthesis real-time factor.
fn read_back(texts: &[&str]) -> (f64, f64) {
    let v = voice();
    let dir =
        nexus_weights::Store::new(nexus_weights::Store::default_root()).model_dir("whisper-base");
    let asr = nexus_models::whisper::WhisperEngine::load(&dir, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{e}: run `nexus models pull base` first"));
    let opts = nexus_models::whisper::TranscribeOptions {
        language: Some("en".into()),
        ..Default::default()
    };
    let (mut errors, mut words, mut audio_s, mut synth_s) = (0, 0, 0.0, 0.0);
    for (i, text) in texts.iter().enumerate() {
        let t0 = std::time::Instant::now();
        let samples = v
            .synthesize_text(
                text,
                &SynthesisOptions {
                    seed: i as u64,
                    ..v.default_options()
                },
            )
            .unwrap();
        synth_s += t0.elapsed().as_secs_f64();
        audio_s += samples.len() as f64 / f64::from(v.sample_rate());
        let pcm16k = nexus_audio::resample(&[samples], v.sample_rate(), 16_000)
            .unwrap()
            .remove(0);
        let heard = asr.transcribe(&pcm16k, &opts, &mut |_| {}).unwrap().text();
        let e = nexus_eval::wer(text, &heard);
        eprintln!("{:>2} errors  {text:?} → {heard:?}", e.errors);
        errors += e.errors;
        words += e.reference_len;
    }
    let wer = errors as f64 / words as f64;
    let rtf = synth_s / audio_s;
    eprintln!(
        "WER {:.2} % ({errors}/{words} words); synthesis RTF {rtf:.3} ({audio_s:.1} s of audio in {synth_s:.1} s)",
        100.0 * wer
    );
    (wer, rtf)
}

#[test]
#[ignore = "needs the piper-en-us-joe-medium voice and whisper base"]
fn twenty_sentences_read_back_by_whisper_base_within_5_percent_wer() {
    let (wer, _) = read_back(&SENTENCES);
    assert!(wer <= 0.05, "WER {wer}");
}
