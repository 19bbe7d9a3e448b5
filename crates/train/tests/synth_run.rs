//! `nexus data synth`'s pipeline end to end on tiny data, with the real
//! voices (Piper and espeak-ng) and Whisper tiny.en as the recogniser:
//! deterministic, resumable to the same bytes, filters that bite.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use candle_core::Device;
use nexus_models::tts::PiperVoice;
use nexus_models::whisper::WhisperEngine;
use nexus_train::synth::{
    Filters, Manifest, SampleTask, Synth, SynthConfig, TextFormat, TextSource, Voices,
    WhisperListener, read_shard, voices::espeak_voices,
};

fn model_dir(name: &str) -> PathBuf {
    nexus_weights::Store::new(nexus_weights::Store::default_root()).model_dir(name)
}

const TEXT: &str = "The birch canoe slid on the smooth planks.
Glue the sheet to the dark blue background.
It is easy to tell the depth of a well.
These days a chicken leg is a rare dish.
Rice is often served in round bowls.
The juice of lemons makes fine punch.
The box was thrown beside the parked truck.
The hogs were fed chopped corn and garbage.
";

fn text(dir: &Path) -> TextSource {
    let p = dir.join("sentences.txt");
    std::fs::write(&p, TEXT).unwrap();
    TextSource::read(&p, TextFormat::Lines, 3, 20).unwrap()
}

fn voices() -> Voices {
    let piper = PiperVoice::load(&model_dir("piper-en-us-joe-medium"), &Device::Cpu)
        .expect("nexus models pull piper-en-us-joe-medium");
    Voices::new(Some(("en_US-joe-medium".into(), piper)), espeak_voices()).unwrap()
}

fn listener() -> WhisperListener {
    WhisperListener::new(
        WhisperEngine::load(&model_dir("whisper-tiny.en"), &Device::Cpu)
            .expect("nexus models pull tiny.en"),
    )
}

fn config() -> SynthConfig {
    SynthConfig {
        seed: 11,
        samples: 6,
        shard_size: 2,
        question_share: 0.5,
        piper_share: 0.5,
        // tiny.en is a weaker ear than the production run's base.
        filters: Filters {
            max_wer: 0.4,
            ..Filters::default()
        },
        ..SynthConfig::default()
    }
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
#[ignore = "needs tiny.en and the Piper voice (nexus models pull), and espeak-ng"]
fn synthesis_is_deterministic_resumable_and_filtered() {
    let tmp = tempfile::tempdir().unwrap();
    let text = text(tmp.path());
    let voices = voices();
    let mut ears = listener();
    let whole = tmp.path().join("whole");
    let parts = tmp.path().join("parts");
    let mut lines = 0;
    let m = Synth {
        config: config(),
        text: &text,
        voices: &voices,
        listener: (&mut ears, "whisper-tiny.en".into()),
    }
    .run(&whole, None, &mut |_| lines += 1)
    .unwrap();
    assert_eq!(lines, 6);
    assert!(m.complete());
    assert_eq!(m.shards.len(), 3);

    // Everything kept reads back; each record says how it was made.
    let mut kept = 0;
    let mut used = std::collections::BTreeSet::new();
    let mut tasks = std::collections::BTreeSet::new();
    for s in &m.shards {
        let samples = read_shard(&whole, s.index).unwrap();
        assert_eq!(samples.len(), s.kept);
        let dropped: usize = s.rejected.values().sum();
        assert_eq!(s.kept + dropped, s.candidates);
        for (r, audio) in samples {
            kept += 1;
            assert_eq!(audio.len() as u64, r.samples.unwrap());
            assert!(r.wer.unwrap() <= 0.4, "{r:?}");
            assert!(r.heard.as_ref().is_some_and(|h| !h.is_empty()));
            used.insert(r.rendition.voice.split(':').next().unwrap().to_string());
            tasks.insert(format!("{:?}", r.task));
            if r.task == SampleTask::Answer {
                assert!(r.answer.is_some() && r.text.ends_with('?'), "{r:?}");
            }
        }
    }
    let records: String = (0..3)
        .map(|i| std::fs::read_to_string(nexus_train::synth::shard_records(&whole, i)).unwrap())
        .collect();
    assert!(
        kept >= 3,
        "the filters kept {kept} of 6 candidates:\n{records}"
    );
    assert_eq!(used.len(), 2, "both Piper and espeak-ng speak: {used:?}");
    assert!(tasks.len() == 2, "{tasks:?}");

    // The recogniser's encoder frames of each kept sample are kept for
    // training, and training takes them as its own pass would make them.
    let engine = WhisperEngine::load(&model_dir("whisper-tiny.en"), &Device::Cpu).unwrap();
    let cache = tmp.path().join("frames-cache");
    let from_synth = nexus_train::adapter::features::load_examples(
        &whole,
        &cache.join("a"),
        ("whisper-tiny.en", "whisper-tiny.en"),
        &engine,
        5,
        &mut |_, _| {},
    )
    .unwrap();
    let computed = nexus_train::adapter::features::load_examples(
        &whole,
        &cache.join("b"),
        ("tiny.en", "whisper-tiny.en"),
        &engine,
        5,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(from_synth.len(), kept);
    for (a, b) in from_synth.iter().zip(&computed) {
        assert_eq!(a.frames.dims(), b.frames.dims());
        let d: f32 = (&a.frames - &b.frames)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        // The same pass; the kept audio is stored as 16-bit samples.
        assert!(d < 0.05, "sample {}: frames differ by {d}", a.id);
    }
    assert!(
        !cache.join("a").read_dir().unwrap().any(|_| true),
        "nothing recomputed"
    );

    // Interrupted after one shard, then resumed: the same bytes.
    let mut again = listener();
    let mut synth = Synth {
        config: config(),
        text: &text,
        voices: &voices,
        listener: (&mut again, "whisper-tiny.en".into()),
    };
    let first = synth.run(&parts, Some(1), &mut |_| {}).unwrap();
    assert_eq!(first.shards.len(), 1);
    assert!(!first.complete());
    let mut resumed = 0;
    synth.run(&parts, None, &mut |_| resumed += 1).unwrap();
    assert_eq!(resumed, 4, "only the two missing shards are made");
    assert_eq!(files(&whole), files(&parts));

    // A shard cut short is made again.
    let pcm = nexus_train::synth::shard_pcm(&parts, 1);
    let len = std::fs::metadata(&pcm).unwrap().len();
    if len > 0 {
        std::fs::write(&pcm, vec![0u8; len as usize / 2]).unwrap();
        let mut remade = 0;
        synth.run(&parts, None, &mut |_| remade += 1).unwrap();
        assert_eq!(remade, 2);
        assert_eq!(files(&whole), files(&parts));
    }

    // Other settings are refused in the same folder.
    let err = Synth {
        config: SynthConfig {
            seed: 12,
            ..config()
        },
        text: &text,
        voices: &voices,
        listener: (&mut ears, "whisper-tiny.en".into()),
    }
    .run(&whole, None, &mut |_| {})
    .unwrap_err();
    assert!(err.to_string().contains("other settings"), "{err}");
    assert_eq!(Manifest::read(&whole).unwrap(), m);
}

#[test]
#[ignore = "needs tiny.en and espeak-ng"]
fn the_round_trip_drops_speech_drowned_in_noise() {
    let tmp = tempfile::tempdir().unwrap();
    let text = text(tmp.path());
    let voices = Voices::new(None, vec!["en-us".into(), "en-gb+f3".into()]).unwrap();
    let mut ears = listener();
    let cfg = SynthConfig {
        samples: 4,
        shard_size: 4,
        question_share: 0.0,
        noise_share: 1.0,
        snr_db: (-10.0, -8.0),
        ..config()
    };
    let m = Synth {
        config: cfg,
        text: &text,
        voices: &voices,
        listener: (&mut ears, "whisper-tiny.en".into()),
    }
    .run(tmp.path().join("out").as_path(), None, &mut |_| {})
    .unwrap();
    let s = &m.shards[0];
    assert!(
        s.rejected.get("round_trip").copied().unwrap_or(0) >= 2,
        "{s:?}"
    );
    let records = std::fs::read_to_string(nexus_train::synth::shard_records(
        &tmp.path().join("out"),
        0,
    ))
    .unwrap();
    assert!(records.contains("\"rejected\":\"round_trip\""), "{records}");
}

#[test]
fn settings_out_of_bounds_name_their_field() {
    for (cfg, field) in [
        (
            SynthConfig {
                samples: 0,
                ..SynthConfig::default()
            },
            "samples",
        ),
        (
            SynthConfig {
                shard_size: 1_000_000,
                ..SynthConfig::default()
            },
            "shard_size",
        ),
        (
            SynthConfig {
                speed: (0.1, 1.0),
                ..SynthConfig::default()
            },
            "speed",
        ),
        (
            SynthConfig {
                snr_db: (30.0, 10.0),
                ..SynthConfig::default()
            },
            "snr_db",
        ),
        (
            SynthConfig {
                max_words: 2,
                min_words: 4,
                ..SynthConfig::default()
            },
            "max_words",
        ),
        (
            SynthConfig {
                question_share: f32::NAN,
                ..SynthConfig::default()
            },
            "question_share",
        ),
    ] {
        let err = cfg.check().unwrap_err().to_string();
        assert!(err.starts_with(field), "{field}: {err}");
    }
    assert!(SynthConfig::default().check().is_ok());
}
