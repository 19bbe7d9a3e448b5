//! A training run's adapter exported as a NEXUS-O checkpoint serves what
//! the trainer computes: the same adapted audio and the same greedy text as
//! the training-time model, through `NexusModel` (the fleet's loader).
#![allow(clippy::unwrap_used)]

// The max-difference helper of the model tests.
#[path = "../../models/tests/common/mod.rs"]
mod common;

use std::path::PathBuf;

use candle_core::Device;
use nexus_models::Precision;
use nexus_models::nexus::config::{AdapterConfig, EncoderConfig};
use nexus_models::nexus::{NexusModel, NexusTask};
use nexus_models::whisper::WhisperEngine;
use nexus_train::adapter::export::{RunSources, export};
use nexus_train::adapter::{AdapterTrainer, Frozen, TrainConfig, checkpoint_dir, features};

fn clip() -> Vec<f32> {
    let dir = std::env::var_os("NEXUS_TESTDATA").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/testdata"),
        PathBuf::from,
    );
    let wav = dir.join("librivox/sense_and_sensibility_01_austen_64kb-0870.wav");
    let bytes = std::fs::read(&wav).expect("bash scripts/fetch-testdata.sh");
    nexus_audio::decode_to_model_rate(
        bytes,
        Some("wav"),
        &nexus_audio::AudioLimits::default(),
        nexus_audio::Layout::Mono,
    )
    .unwrap()
    .remove(0)
}

#[test]
#[ignore = "needs tiny.en and the Qwen2.5 GGUF (nexus models pull) and the LibriVox test speech"]
fn an_exported_checkpoint_serves_what_the_trainer_computes() {
    let store = nexus_weights::Store::new(nexus_weights::Store::default_root());
    let enc_dir = store.model_dir("whisper-tiny.en");
    let gguf = nexus_weights::resolve::resolve_gguf("qwen2.5-0.5b-instruct", None).unwrap();
    let engine = WhisperEngine::load_with(&enc_dir, &Device::Cpu, Precision::F32).unwrap();
    let wc = &engine.model.config;
    let encoder = EncoderConfig::from(wc);
    let lm = nexus_models::nexus::from_gguf::qwen2_lm(&gguf, &Device::Cpu).unwrap();
    let adapter = AdapterConfig {
        stack: 5,
        hidden_size: 64,
        activation: "gelu".into(),
    };
    let frozen = Frozen::new(lm.config, lm.tensors, lm.tokenizer, encoder, adapter).unwrap();
    let config = TrainConfig {
        seed: 7,
        batch: 1,
        ..TrainConfig::default()
    };
    let trainer = AdapterTrainer::new(&frozen, config).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let step = checkpoint_dir(tmp.path(), 0);
    trainer.save(&step).unwrap();
    let out = tmp.path().join("checkpoint");
    export(
        &RunSources {
            encoder_dir: enc_dir,
            lm_gguf: gguf,
        },
        &frozen.config,
        &step,
        &out,
    )
    .unwrap();
    let summary = nexus_weights::nexus::check_folder(&out).unwrap();
    assert!(
        summary.description.contains("no audio decoder"),
        "{}",
        summary.description
    );

    let samples = &clip()[..16_000 * 4];
    let frames = features::encoder_frames(&engine, samples, 5).unwrap();
    drop(engine);
    let task = NexusTask::Transcribe { language: None };
    let want = trainer.transcribe(&frozen, &frames, &task, 12).unwrap();
    let trained_audio = trainer
        .adapter()
        .forward(&frames.unsqueeze(0).unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap();
    drop(frozen);

    let model = NexusModel::load(&out, &Device::Cpu).unwrap();
    let audio = model.encode_audio(samples).unwrap();
    let d = common::max_abs_diff(&audio, &trained_audio);
    assert!(d < 1e-4, "adapted audio differs by {d}");
    let got = model.generate(&task, &audio, 12).unwrap().text;
    assert_eq!(got, want);
}
