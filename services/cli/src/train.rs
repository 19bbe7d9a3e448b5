//! `nexus train adapter`: the NEXUS-O paper's first stage on this machine
//! (`nexus_train::adapter`): Whisper's encoder and Qwen2.5 frozen, the
//! adapter trained on `nexus data synth` output, with checkpoints, resume,
//! and validation WER on held-out synthesised speech and on real recordings.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use nexus_models::Precision;
use nexus_models::nexus::config::{AdapterConfig, EncoderConfig};
use nexus_models::whisper::WhisperEngine;
use nexus_train::adapter::{
    AdapterTrainer, Example, Frozen, Objective, Schedule, TrainConfig, checkpoint_dir, features,
    latest_checkpoint,
};
use nexus_train::synth::SampleTask;
use nexus_weights::resolve::{resolve_gguf, resolve_model};

use crate::status_line::{StatusLine, clock};

/// Training.
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(subcommand)]
    command: TrainCommand,
}

#[derive(Debug, Subcommand)]
enum TrainCommand {
    /// Align an adapter between a frozen Whisper encoder and a frozen Qwen2.5.
    Adapter(Box<AdapterArgs>),
    /// Write a training run's adapter as a servable NEXUS-O checkpoint folder.
    Export(ExportArgs),
    /// Measure a NEXUS-O checkpoint: WER beside Whisper, translation against
    /// the cascade, spoken questions.
    Eval(Box<crate::train_eval::EvalArgs>),
}

/// `nexus train export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The run's output folder (`nexus train adapter --out`).
    #[arg(long)]
    run: PathBuf,
    /// Its checkpoint to export; the newest when absent.
    #[arg(long)]
    step: Option<u64>,
    /// The checkpoint folder to write (serve it with `--model DIR`).
    #[arg(long, short)]
    out: PathBuf,
    /// Write only the adapter (in f16) and the NEXUS-O configuration, as
    /// `crates/train/nexus-mini/` holds them for `nexus models pull nexus-mini`.
    #[arg(long)]
    adapter_only: bool,
}

fn export(a: ExportArgs) -> anyhow::Result<()> {
    let (step, dir) = match a.step {
        Some(s) => (s, checkpoint_dir(&a.run, s)),
        None => latest_checkpoint(&a.run)
            .with_context(|| format!("{}: no checkpoint yet", a.run.display()))?,
    };
    anyhow::ensure!(
        dir.join("adapter.safetensors").exists(),
        "{}: no such checkpoint",
        dir.display()
    );
    if a.adapter_only {
        let w = candle_core::safetensors::load(
            dir.join("adapter.safetensors"),
            &candle_core::Device::Cpu,
        )?;
        let w = w
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(candle_core::DType::F16)?)))
            .collect::<anyhow::Result<std::collections::HashMap<_, _>>>()?;
        std::fs::create_dir_all(&a.out)?;
        candle_core::safetensors::save(&w, a.out.join("adapter.safetensors"))?;
        std::fs::copy(
            a.run.join("nexus-config.json"),
            a.out.join("nexus-config.json"),
        )?;
        println!(
            "{}: the adapter of step {step} of {} (f16)",
            a.out.display(),
            a.run.display()
        );
        return Ok(());
    }
    let sources = nexus_train::adapter::export::RunSources::read(&a.run)?;
    let cfg: nexus_models::nexus::NexusConfig =
        serde_json::from_slice(&std::fs::read(a.run.join("nexus-config.json"))?)?;
    nexus_train::adapter::export::export(&sources, &cfg, &dir, &a.out)?;
    let summary = nexus_weights::nexus::check_folder(&a.out)?;
    println!(
        "{}: step {step} of {}; {}",
        a.out.display(),
        a.run.display(),
        summary.description
    );
    Ok(())
}

/// `nexus train adapter`.
#[derive(Debug, Args)]
pub struct AdapterArgs {
    /// Folders made by `nexus data synth` (comma-separated).
    #[arg(long, required = true, value_delimiter = ',')]
    data: Vec<PathBuf>,
    /// Output folder: checkpoints, log.jsonl, the encoder-frame cache. A run there resumes.
    #[arg(long, short)]
    out: PathBuf,
    /// The frozen encoder (a Whisper registry name or folder).
    #[arg(long, default_value = "base")]
    encoder: String,
    /// The frozen language model (a registry name or a `.gguf` file).
    #[arg(long, default_value = "qwen2.5-0.5b-instruct")]
    lm: String,
    /// Encoder frames concatenated per LM position.
    #[arg(long, default_value_t = 5)]
    stack: usize,
    /// Width between the adapter's two linear layers.
    #[arg(long, default_value_t = 1024)]
    adapter_hidden: usize,
    /// What the adapter learns from: `reply` (the paper's: the reply's
    /// cross-entropy through the frozen LM) or `ctc` (CTC against the LM's
    /// token embeddings: a cheap alignment stage to start from, see `--init`).
    #[arg(long, default_value = "reply", value_parser = ["reply", "ctc"])]
    objective: String,
    /// The CTC classifier's temperature τ (`log p(v|a) ∝ −‖a − E_v‖²/τ`).
    /// Qwen2.5-0.5B's embeddings lie about 0.15 (squared) from their
    /// nearest neighbour and 0.43 from a typical other token: at 0.02 a
    /// position at a token's embedding already has most of the probability.
    #[arg(long, default_value_t = 0.02)]
    ctc_temperature: f64,
    /// Start a new run from the adapter of a checkpoint (`OUT/step-N` of
    /// another run), with a fresh optimiser.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Optimiser steps.
    #[arg(long, default_value_t = 2000)]
    steps: u64,
    /// Examples per step (gradients averaged).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Examples per forward pass, padded together (on two cores one at a
    /// time is faster: padding costs more than the larger products gain);
    /// gradients accumulate over the batch.
    #[arg(long, default_value_t = 1)]
    micro_batch: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Final learning rate.
    #[arg(long, default_value_t = 1e-5)]
    min_lr: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 100)]
    warmup: u64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Largest gradient norm.
    #[arg(long, default_value_t = 1.0)]
    clip_norm: f64,
    /// Seed of the initial weights and the data order.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Checkpoint every this many steps.
    #[arg(long, default_value_t = 100)]
    checkpoint_every: u64,
    /// Validate every this many steps.
    #[arg(long, default_value_t = 100)]
    validate_every: u64,
    /// Held-out synthesised examples decoded per validation.
    #[arg(long, default_value_t = 20)]
    validation_samples: usize,
    /// Hold out every example whose id is a multiple of this (never trained on).
    #[arg(long, default_value_t = 20)]
    holdout_every: u64,
    /// Real recordings for validation: a folder of `NAME.wav` + `NAME.txt`.
    #[arg(long)]
    test_audio: Option<PathBuf>,
    /// Most reply tokens trained per example.
    #[arg(long, default_value_t = 96)]
    max_reply_tokens: usize,
    /// Stop after this many steps in this call (resume later).
    #[arg(long)]
    max_steps_now: Option<u64>,
    /// Where weights are kept.
    #[arg(long, env = "NEXUS_HOME")]
    home: Option<PathBuf>,
}

/// Runs `nexus train`.
pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    match args.command {
        TrainCommand::Adapter(a) => adapter(*a),
        TrainCommand::Export(a) => export(a),
        TrainCommand::Eval(a) => crate::train_eval::run(*a),
    }
}

/// Real recordings and their references (`NAME.wav` + `NAME.txt`), sorted by name.
pub fn recordings(dir: &Path) -> anyhow::Result<Vec<(String, Vec<f32>, String)>> {
    let mut out = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| dir.display().to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "wav") && p.with_extension("txt").exists())
        .collect();
    names.sort();
    for wav in names {
        let bytes = std::fs::read(&wav).with_context(|| wav.display().to_string())?;
        let audio = nexus_audio::decode_to_model_rate(
            bytes,
            Some("wav"),
            &nexus_audio::AudioLimits::default(),
            nexus_audio::Layout::Mono,
        )?
        .remove(0);
        let text = std::fs::read_to_string(wav.with_extension("txt"))?
            .trim()
            .to_string();
        let name = wav
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.push((name, audio, text));
    }
    anyhow::ensure!(
        !out.is_empty(),
        "{}: no NAME.wav with NAME.txt",
        dir.display()
    );
    Ok(out)
}

fn adapter(a: AdapterArgs) -> anyhow::Result<()> {
    let config = TrainConfig {
        objective: match a.objective.as_str() {
            "ctc" => Objective::Ctc {
                temperature: a.ctc_temperature,
            },
            _ => Objective::Reply,
        },
        seed: a.seed,
        batch: a.batch,
        micro_batch: a.micro_batch,
        schedule: Schedule {
            lr: a.lr,
            min_lr: a.min_lr,
            warmup: a.warmup,
            steps: a.steps,
            weight_decay: a.weight_decay,
            ..TrainConfig::default().schedule
        },
        clip_norm: a.clip_norm,
        checkpoint_every: a.checkpoint_every,
        validate_every: a.validate_every,
        validation_samples: a.validation_samples,
        max_reply_tokens: a.max_reply_tokens,
    };
    config.check()?;
    anyhow::ensure!(
        (1..=64).contains(&a.stack),
        "stack: {} is outside 1..=64",
        a.stack
    );
    anyhow::ensure!(
        (1..=16384).contains(&a.adapter_hidden),
        "adapter_hidden: {} is outside 1..=16384",
        a.adapter_hidden
    );
    anyhow::ensure!(
        a.holdout_every >= 2,
        "holdout_every: {} must be at least 2",
        a.holdout_every
    );
    std::fs::create_dir_all(&a.out)?;
    let device = candle_core::Device::Cpu;

    // The frozen encoder, in f32 as a NEXUS-O checkpoint serves it.
    let enc_dir = resolve_model(&a.encoder, a.home.clone())?;
    let engine = WhisperEngine::load_with(&enc_dir, &device, Precision::F32)
        .with_context(|| format!("the encoder {}", enc_dir.display()))?;
    let wc = &engine.model.config;
    let encoder = EncoderConfig::from(wc);
    let enc_name = enc_dir
        .file_name()
        .map_or_else(|| "encoder".into(), |n| n.to_string_lossy().into_owned());

    // Encoder frames of every kept sample, computed once.
    let mut all: Vec<Example> = Vec::new();
    for (k, data) in a.data.iter().enumerate() {
        let cache = a.out.join("frames").join(format!("data{k}"));
        let t0 = Instant::now();
        let status = StatusLine::new();
        let mut ex = features::load_examples(
            data,
            &cache,
            (&a.encoder, &enc_name),
            &engine,
            a.stack,
            &mut |d, n| {
                status.show(&format!(
                    "encoder frames of {}: shard {d}/{n} ({:.0} s)",
                    data.display(),
                    t0.elapsed().as_secs_f32()
                ));
            },
        )?;
        status.end();
        // Ids are unique within a folder; keep them apart across folders.
        for e in &mut ex {
            e.id += (k as u64) << 40;
        }
        all.extend(ex);
    }
    let (held, train): (Vec<Example>, Vec<Example>) = all
        .into_iter()
        .partition(|e| (e.id & ((1 << 40) - 1)) % a.holdout_every == 0);
    let held: Vec<Example> = held
        .into_iter()
        .filter(|e| e.task == SampleTask::Transcribe)
        .take(a.validation_samples)
        .collect();
    anyhow::ensure!(!train.is_empty(), "no training examples in {:?}", a.data);
    let hours: f64 = train.iter().map(|e| f64::from(e.seconds)).sum::<f64>() / 3600.0;
    eprintln!(
        "{} training examples ({hours:.2} h), {} validation examples",
        train.len(),
        held.len()
    );
    let test: Vec<Example> = match &a.test_audio {
        Some(dir) => recordings(dir)?
            .into_iter()
            .enumerate()
            .map(|(i, (_, audio, text))| -> anyhow::Result<_> {
                Ok(Example {
                    id: i as u64,
                    task: SampleTask::Transcribe,
                    seconds: audio.len() as f32 / 16_000.0,
                    frames: features::encoder_frames(&engine, &audio, a.stack)?,
                    text,
                    answer: None,
                })
            })
            .collect::<anyhow::Result<_>>()?,
        None => Vec::new(),
    };
    drop(engine);

    // The frozen language model, dequantised to f32.
    let gguf = resolve_gguf(&a.lm, a.home.clone())?;
    let t0 = Instant::now();
    let lm = nexus_models::nexus::from_gguf::qwen2_lm(&gguf, &device)?;
    let frozen = Frozen::new(
        lm.config,
        lm.tensors,
        lm.tokenizer,
        encoder,
        AdapterConfig {
            stack: a.stack,
            hidden_size: a.adapter_hidden,
            activation: "gelu".into(),
        },
    )?;
    eprintln!(
        "{} loaded in {:.1} s",
        gguf.display(),
        t0.elapsed().as_secs_f32()
    );
    std::fs::write(
        a.out.join("nexus-config.json"),
        serde_json::to_string_pretty(&frozen.config)?,
    )?;
    nexus_train::adapter::export::RunSources {
        encoder_dir: std::path::absolute(&enc_dir)?,
        lm_gguf: std::path::absolute(&gguf)?,
    }
    .write(&a.out)?;

    let mut trainer = match latest_checkpoint(&a.out) {
        Some((step, dir)) => {
            eprintln!("resuming at step {step} from {}", dir.display());
            AdapterTrainer::load(&frozen, config.clone(), &dir)?
        }
        None => match &a.init {
            Some(dir) => {
                let file = dir.join("adapter.safetensors");
                let w = candle_core::safetensors::load(&file, &device)
                    .with_context(|| format!("--init {}", file.display()))?;
                let w: std::collections::HashMap<&str, candle_core::Tensor> =
                    w.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                eprintln!("starting from the adapter of {}", dir.display());
                AdapterTrainer::from_weights(&frozen, config.clone(), &w)?
            }
            None => AdapterTrainer::new(&frozen, config.clone())?,
        },
    };
    // The log holds one line per step and per validation up to the checkpoint.
    let log_path = a.out.join("log.jsonl");
    let kept: Vec<String> = std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= trainer.step_count())
        })
        .map(str::to_string)
        .collect();
    let mut log = std::fs::File::create(&log_path)?;
    for l in kept {
        writeln!(log, "{l}")?;
    }
    let validate = |t: &AdapterTrainer, log: &mut std::fs::File| -> anyhow::Result<()> {
        let v0 = Instant::now();
        let (wer, hyps) = t.validate(&frozen, &held)?;
        let mut line = serde_json::json!({
            "step": t.step_count(),
            "validation_wer": wer,
            "validation_examples": held.len(),
            "example": held.first().map(|e| (&e.text, hyps.first())),
        });
        if !test.is_empty() {
            let (twer, thyps) = t.validate(&frozen, &test)?;
            line["test_wer"] = serde_json::json!(twer);
            line["test_hypotheses"] = serde_json::json!(thyps);
        }
        if let Some((cwer, _)) = t.validate_ctc(&frozen, &held)? {
            line["ctc_validation_wer"] = serde_json::json!(cwer);
            if let Some((ctwer, cthyps)) =
                t.validate_ctc(&frozen, &test)?.filter(|_| !test.is_empty())
            {
                line["ctc_test_wer"] = serde_json::json!(ctwer);
                line["ctc_test_hypotheses"] = serde_json::json!(cthyps);
            }
            eprintln!(
                "\nstep {}: CTC best-path WER {:.1} % (held out), {:.1} % (real speech)",
                t.step_count(),
                cwer * 100.0,
                line["ctc_test_wer"].as_f64().unwrap_or(f64::NAN) * 100.0
            );
        }
        eprintln!(
            "\nstep {}: validation WER {:.1} %{} ({:.0} s)",
            t.step_count(),
            wer * 100.0,
            line.get("test_wer")
                .and_then(|w| w.as_f64())
                .map_or(String::new(), |w| format!(
                    ", real speech WER {:.1} %",
                    w * 100.0
                )),
            v0.elapsed().as_secs_f32()
        );
        writeln!(log, "{line}")?;
        Ok(())
    };
    if trainer.step_count() == 0 {
        validate(&trainer, &mut log)?;
    }
    let status = StatusLine::new();
    let t0 = Instant::now();
    let start = trainer.step_count();
    let stop = a.max_steps_now.map_or(config.schedule.steps, |n| {
        (start + n).min(config.schedule.steps)
    });
    while trainer.step_count() < stop {
        let r = trainer.step(&frozen, &train)?;
        writeln!(log, "{}", serde_json::to_string(&r)?)?;
        let done = (r.step - start) as f64;
        let eta = t0.elapsed().as_secs_f64() / done * (stop - r.step) as f64;
        let line = format!(
            "step {}/{}  loss {:.3}  lr {:.2e}  |g| {:.2}  {:.2} h seen  {:.1} s/step  eta {}",
            r.step,
            config.schedule.steps,
            r.loss,
            r.lr,
            r.grad_norm,
            r.hours,
            t0.elapsed().as_secs_f64() / done,
            clock(eta)
        );
        status.show(&line);
        let last = r.step == config.schedule.steps || r.step == stop;
        if r.step % config.validate_every == 0 || last {
            validate(&trainer, &mut log)?;
        }
        if r.step % config.checkpoint_every == 0 || last {
            trainer.save(&checkpoint_dir(&a.out, r.step))?;
        }
    }
    status.end();
    println!(
        "{}: step {} of {}; checkpoints and log.jsonl there",
        a.out.display(),
        trainer.step_count(),
        config.schedule.steps
    );
    Ok(())
}
