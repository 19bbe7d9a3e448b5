//! The GE2E speaker encoder and diarization on real speech.
//!
//! - Golden: our mel frames, partial embeddings and utterance embeddings
//!   against Resemblyzer's own (PyTorch) on three readers' clips
//!   (`tests/golden/speaker/make_speaker_golden.py`).
//! - Diarization of the meeting set (`nexus_eval::meetings`): DER under 15 %
//!   (250 ms collar) on every 2-4 speaker recording, exactly one speaker for
//!   one reader, nothing for silence, and speaker counts given.
//!
//! Needs `nexus models pull ge2e silero-vad` and `scripts/fetch-testdata.sh`
//! (the test script does both).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use candle_core::Device;
use nexus_eval::der::{Segment, der};
use nexus_eval::meetings::{self, MEETINGS};
use nexus_models::speaker::mel::{N_MELS, normalize_volume};
use nexus_models::speaker::{DiarizeOptions, SpeakerCount, SpeakerEncoder, diarize};
use nexus_models::vad::{SileroVad, speech_regions};
use serde_json::Value;

fn testdata() -> PathBuf {
    std::env::var_os("NEXUS_TESTDATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/testdata"))
}

fn store() -> nexus_weights::Store {
    nexus_weights::Store::new(nexus_weights::Store::default_root())
}

fn encoder() -> SpeakerEncoder {
    SpeakerEncoder::load(&store().model_dir("ge2e"), &Device::Cpu)
        .unwrap_or_else(|e| panic!("{e}: run `nexus models pull ge2e` first"))
}

fn load16k(rel: &str) -> Vec<f32> {
    let path = testdata().join(rel);
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/fetch-testdata.sh", path.display()));
    let ext = path.extension().and_then(|e| e.to_str());
    nexus_audio::decode_to_model_rate(
        bytes,
        ext,
        &nexus_audio::AudioLimits::default(),
        nexus_audio::Layout::Mono,
    )
    .unwrap()
    .remove(0)
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
#[ignore = "needs the ge2e weights and the test data"]
fn matches_the_reference_encoder_on_real_speech() {
    let golden: Value = serde_json::from_slice(
        &std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/speaker/golden.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let enc = encoder();
    let mut ours = Vec::new();
    for clip in golden["clips"].as_array().unwrap() {
        let mut wav = load16k(clip["path"].as_str().unwrap());
        normalize_volume(&mut wav);
        // Mel frames: relative error per frame's sum, and the first frames bin by bin.
        let mel = enc.mel().compute(&wav).unwrap();
        assert_eq!(
            mel.len() / N_MELS,
            clip["mel_frames"].as_u64().unwrap() as usize
        );
        for (t, want) in floats(&clip["mel_frame_sums"]).iter().enumerate() {
            let got: f32 = mel[t * N_MELS..(t + 1) * N_MELS].iter().sum();
            assert!(
                (got - want).abs() <= 1e-3 * want.abs() + 1e-6,
                "{}: frame {t} sums to {got}, reference {want}",
                clip["path"]
            );
        }
        for (t, row) in clip["mel_head"].as_array().unwrap().iter().enumerate() {
            for (m, want) in floats(row).iter().enumerate() {
                let got = mel[t * N_MELS + m];
                assert!(
                    (got - want).abs() <= 1e-3 * want.abs() + 1e-7,
                    "mel[{t}][{m}] {got} vs {want}"
                );
            }
        }
        let u = enc.embed_utterance(&wav).unwrap();
        let starts: Vec<usize> = clip["partial_starts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_u64().unwrap() as usize)
            .collect();
        let ours_starts: Vec<usize> = u
            .partial_starts
            .iter()
            .map(|s| s * nexus_models::speaker::mel::HOP)
            .collect();
        assert_eq!(ours_starts, starts, "wav offsets of the partials");
        let mut worst = 0f32;
        for (p, want) in u.partials.iter().zip(clip["partials"].as_array().unwrap()) {
            for (a, b) in p.iter().zip(floats(want)) {
                worst = worst.max((a - b).abs());
            }
        }
        let cos: f32 = u
            .embed
            .iter()
            .zip(floats(&clip["embed"]))
            .map(|(a, b)| a * b)
            .sum();
        eprintln!(
            "{}: {} partials, max |diff| {worst:.2e}, cosine to the reference {cos:.6}",
            clip["path"],
            starts.len()
        );
        assert!(worst < 1e-4, "partial embeddings differ by {worst}");
        assert!(cos > 0.99999, "utterance embedding cosine {cos}");
        ours.push(u.embed);
    }
    // Same order as the reference's similarity matrix.
    for (i, row) in golden["cosine"].as_array().unwrap().iter().enumerate() {
        for (j, want) in floats(row).iter().enumerate() {
            let got: f32 = ours[i].iter().zip(&ours[j]).map(|(a, b)| a * b).sum();
            assert!(
                (got - want).abs() < 1e-4,
                "cosine[{i}][{j}] {got} vs {want}"
            );
        }
    }
}

fn run(
    enc: &SpeakerEncoder,
    vad: &SileroVad,
    samples: &[f32],
    opts: &DiarizeOptions,
) -> Vec<Segment> {
    let regions = speech_regions(&vad.probabilities(samples).unwrap(), samples.len());
    diarize(enc, samples, &regions, opts).unwrap().segments()
}

fn vad() -> SileroVad {
    SileroVad::load(
        &store().source_dir("silero-vad").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap_or_else(|e| panic!("{e}: run `nexus models pull silero-vad` first"))
}

#[test]
#[ignore = "needs the ge2e and silero-vad weights and the test data"]
fn diarizes_the_meeting_set() {
    let (enc, vad) = (encoder(), vad());
    let mut worst = 0f64;
    for m in MEETINGS {
        let built = meetings::build(m, |c| Ok::<_, ()>(load16k(c.path))).unwrap();
        let hyp = run(&enc, &vad, &built.samples, &DiarizeOptions::default());
        let (d, _) = der(&built.reference, &hyp, 0.25);
        let mut found: Vec<&str> = hyp.iter().map(|s| s.speaker.as_str()).collect();
        found.sort_unstable();
        found.dedup();
        eprintln!(
            "{:<16} speakers {} found {}  DER {:5.1} % (missed {:.2} s, false alarm {:.2} s, confusion {:.2} s of {:.1} s)",
            m.name,
            m.speakers(),
            found.len(),
            100.0 * d.rate(),
            d.missed,
            d.false_alarm,
            d.confusion,
            d.total
        );
        if m.speakers() == 1 {
            assert_eq!(found.len(), 1, "{}: a spurious speaker", m.name);
        }
        worst = worst.max(d.rate());
    }
    assert!(worst <= 0.15, "worst DER {worst}");
}

#[test]
#[ignore = "needs the ge2e and silero-vad weights and the test data"]
fn counts_given_are_held_and_silence_has_no_speakers() {
    let (enc, vad) = (encoder(), vad());
    let two = MEETINGS.iter().find(|m| m.name == "two-readers").unwrap();
    let built = meetings::build(two, |c| Ok::<_, ()>(load16k(c.path))).unwrap();
    let count = |min, max| {
        let opts = DiarizeOptions {
            count: SpeakerCount { min, max },
            ..DiarizeOptions::default()
        };
        let mut s: Vec<String> = run(&enc, &vad, &built.samples, &opts)
            .into_iter()
            .map(|s| s.speaker)
            .collect();
        s.sort();
        s.dedup();
        s.len()
    };
    assert_eq!(count(1, 1), 1);
    assert_eq!(count(2, 2), 2);
    assert_eq!(count(3, 3), 3);
    // Silence and faint noise: no speech regions, no turns.
    let mut s = 0x1234_5678_u32;
    let quiet: Vec<f32> = (0..160_000)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 1e-3
        })
        .collect();
    assert!(run(&enc, &vad, &quiet, &DiarizeOptions::default()).is_empty());
    assert!(run(&enc, &vad, &vec![0.0; 160_000], &DiarizeOptions::default()).is_empty());
}
