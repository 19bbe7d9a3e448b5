//! `nexus gpu-check`: proves a CUDA build against the CPU and measures it.
//!
//! `prepare` runs here, on the CPU: it packs a Whisper checkpoint and a clip
//! into a bundle small enough to carry to a lent GPU machine (the linear
//! layers and embeddings as Q8_0 blocks, the rest in f32) and writes what
//! the CPU computes from exactly those weights (dequantised to f32): the
//! encoder's features of the clip's first window, the decoder's logits over
//! the clip's own transcript, the greedy transcript, and the texts of a
//! batch of sessions (windows at different offsets) decoded together the
//! way the decoder pool does, one forward pass per step.
//!
//! `run` loads the same dequantised weights in f32 on `--device`, computes
//! the same things and compares (features and logits within `--tolerance`,
//! texts equal), then measures encoder windows per second and decoder
//! tokens per second over batch sizes, in each precision asked for. It
//! exits non-zero if any comparison fails.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, IndexOp, Tensor};
use nexus_models::Precision;
use nexus_models::whisper::{
    DecodeOptions, GreedySequence, Task, TranscribeOptions, WhisperEngine, step_batch,
};
use serde::{Deserialize, Serialize};

use crate::transcribe::{load_audio, resolve_model};

/// Samples per second of the model's audio.
const RATE: usize = 16_000;
/// The most audio a bundle keeps: one window.
const MAX_CLIP_S: usize = 30;
/// Transcript tokens the logits check teaches the decoder.
const TAUGHT_TOKENS: usize = 16;
/// Tokens a batched session decodes at most.
const SESSION_TOKENS: usize = 48;

/// `nexus gpu-check`.
#[derive(Debug, clap::Args)]
pub struct GpuCheckArgs {
    #[command(subcommand)]
    command: GpuCheckCommand,
}

#[derive(Debug, clap::Subcommand)]
enum GpuCheckCommand {
    /// Packs a model and a clip with the CPU's results into a bundle.
    Prepare(PrepareArgs),
    /// Compares a device with a bundle's CPU results and measures its speed.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct PrepareArgs {
    /// Whisper model (registry name or folder).
    #[arg(long, default_value = "tiny.en")]
    model: String,
    /// Where weights are kept.
    #[arg(long, env = "NEXUS_HOME")]
    home: Option<PathBuf>,
    /// Speech to check with (its first 30 s are kept).
    #[arg(long)]
    audio: PathBuf,
    /// Sessions in the batch decoded together (1-64).
    #[arg(long, default_value_t = 8)]
    sessions: usize,
    /// The bundle's folder (created).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// A folder `prepare` wrote.
    #[arg(long)]
    bundle: PathBuf,
    /// Device to check: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Largest difference allowed between the device's f32 features or
    /// logits and the CPU's.
    #[arg(long, default_value_t = 1e-3)]
    tolerance: f32,
    /// Precisions to measure speed in (f32, f16 on GPUs, int8 on CPUs);
    /// default: the device's served precision, then f32.
    #[arg(long, value_delimiter = ',')]
    precisions: Vec<Precision>,
    /// Decoder batch sizes to measure (1-256).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
    batches: Vec<usize>,
    /// Encoder batch sizes (windows per forward pass) to measure (1-64).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    encoder_batches: Vec<usize>,
    /// Decoding steps timed per decoder batch size (1-400).
    #[arg(long, default_value_t = 64)]
    steps: usize,
    /// Forward passes timed per encoder batch size (1-1000).
    #[arg(long, default_value_t = 8)]
    encoder_passes: usize,
    /// Writes the results here as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
}

/// What the CPU computed, beside the tensors in `reference.safetensors`.
#[derive(Debug, Serialize, Deserialize)]
struct Reference {
    model: String,
    /// The greedy transcript of the clip.
    transcript: String,
    /// The tokens the logits check feeds after the start-of-transcript sequence.
    taught: Vec<u32>,
    /// Each batched session's start (seconds into the clip) and text.
    sessions: Vec<(f32, String)>,
}

/// The run's findings.
#[derive(Debug, Serialize)]
struct Report {
    device: String,
    model: String,
    checks: Vec<Check>,
    encoder: Vec<Speed>,
    decoder: Vec<Speed>,
    passed: bool,
}

#[derive(Debug, Serialize)]
struct Check {
    name: &'static str,
    /// Largest absolute difference, for tensors.
    max_abs_diff: Option<f32>,
    passed: bool,
    detail: String,
}

#[derive(Debug, Serialize)]
struct Speed {
    precision: String,
    batch: usize,
    /// Windows (encoder) or tokens (decoder) per second.
    per_second: f64,
    /// Milliseconds per forward pass or step.
    ms_per_pass: f64,
}

impl Speed {
    /// `passes` passes of `batch` items each in `took`.
    fn timed(precision: Precision, batch: usize, passes: usize, took: std::time::Duration) -> Self {
        let secs = took.as_secs_f64().max(1e-9);
        Self {
            precision: precision.to_string(),
            batch,
            per_second: (batch * passes) as f64 / secs,
            ms_per_pass: secs * 1e3 / passes as f64,
        }
    }

    /// One line of the table: `stage` per second in `unit`s, ms per `pass`.
    fn print(&self, stage: &str, unit: &str, pass: &str) {
        println!(
            "  {stage} {:<4} batch {:>3}: {:>9.1} {unit}/s ({:.2} ms per {pass})",
            self.precision, self.batch, self.per_second, self.ms_per_pass
        );
    }
}

pub fn run(args: GpuCheckArgs) -> anyhow::Result<()> {
    match args.command {
        GpuCheckCommand::Prepare(a) => prepare(a),
        GpuCheckCommand::Run(a) => check(a),
    }
}

fn bounded(name: &str, v: usize, lo: usize, hi: usize) -> anyhow::Result<usize> {
    anyhow::ensure!(
        (lo..=hi).contains(&v),
        "{name} is {v}; it must be {lo}-{hi}"
    );
    Ok(v)
}

fn prepare(a: PrepareArgs) -> anyhow::Result<()> {
    let sessions = bounded("--sessions", a.sessions, 1, 64)?;
    let dir = resolve_model(&a.model, a.home.clone())?;
    let mut samples = load_audio(&a.audio, None)?;
    samples.truncate(MAX_CLIP_S * RATE);
    anyhow::ensure!(
        samples.len() >= RATE,
        "{}: under a second of audio",
        a.audio.display()
    );
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(dir.join(f), a.out.join(f))
            .with_context(|| format!("copying {}", dir.join(f).display()))?;
    }
    let source = dir.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&source, &Device::Cpu)
        .with_context(|| format!("reading {}", source.display()))?;
    write_bundle_weights(&tensors, &a.out.join("weights.gguf"))?;

    // The reference is what the CPU computes from the bundle's own weights.
    let weights = bundle_weights(&a.out)?;
    let engine = bundle_engine(&a.out, &weights, &Device::Cpu, Precision::F32)?;
    let transcript = engine.transcribe(&samples, &greedy_transcription(), &mut |_| {})?;
    let taught: Vec<u32> = transcript
        .segments
        .iter()
        .flat_map(|s| s.tokens.iter().copied())
        .filter(|t| *t < engine.tokenizer.specials.eot)
        .take(TAUGHT_TOKENS)
        .collect();
    let features = encode(&engine, &samples)?;
    let logits = taught_logits(&engine, &features, &taught)?;
    let offsets = session_offsets(samples.len(), sessions);
    let texts = decode_sessions(&engine, &samples, &offsets)?;
    let audio = Tensor::new(samples.as_slice(), &Device::Cpu)?;
    candle_core::safetensors::save(
        &HashMap::from([
            ("audio".to_string(), audio),
            ("features".to_string(), features.to_dtype(DType::F32)?),
            ("logits".to_string(), logits),
        ]),
        a.out.join("reference.safetensors"),
    )?;
    let reference = Reference {
        model: a.model.clone(),
        transcript: transcript.text(),
        taught,
        sessions: offsets.iter().copied().zip(texts).collect(),
    };
    std::fs::write(
        a.out.join("reference.json"),
        serde_json::to_vec_pretty(&reference)?,
    )?;
    let size: u64 = std::fs::read_dir(&a.out)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!(
        "bundle {}: {} ({:.1} MB), {:.1} s of audio, transcript {:?}, {} sessions",
        a.out.display(),
        a.model,
        size as f64 / 1e6,
        samples.len() as f64 / RATE as f64,
        reference.transcript,
        reference.sessions.len()
    );
    Ok(())
}

/// Matrices (two dimensions, rows a multiple of Q8_0's block) as Q8_0, the
/// rest in f32, in one GGUF file.
fn write_bundle_weights(tensors: &HashMap<String, Tensor>, path: &Path) -> anyhow::Result<()> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut packed = Vec::with_capacity(names.len());
    for name in &names {
        let t = &tensors[*name];
        let q8 = t.rank() == 2 && t.dim(1)? % GgmlDType::Q8_0.block_size() == 0;
        let dtype = if q8 { GgmlDType::Q8_0 } else { GgmlDType::F32 };
        packed.push(QTensor::quantize(&t.to_dtype(DType::F32)?, dtype)?);
    }
    let refs: Vec<(&str, &QTensor)> = names
        .iter()
        .map(|n| n.as_str())
        .zip(packed.iter())
        .collect();
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    gguf_file::write(&mut file, &[], &refs)?;
    Ok(())
}

/// The bundle's weights, dequantised to f32 on the CPU: read once, then
/// made into a model per precision with [`bundle_engine`].
fn bundle_weights(dir: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    let path = dir.join("weights.gguf");
    let mut file =
        std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let content = gguf_file::Content::read(&mut file)
        .with_context(|| format!("{}: not a GGUF file", path.display()))?;
    let mut tensors = HashMap::new();
    for name in content.tensor_infos.keys() {
        let q = content.tensor(&mut file, name, &Device::Cpu)?;
        tensors.insert(name.clone(), q.dequantize(&Device::Cpu)?);
    }
    Ok(tensors)
}

/// The bundle's model on `device`, from its `weights`, held in `precision`.
fn bundle_engine(
    dir: &Path,
    weights: &HashMap<String, Tensor>,
    device: &Device,
    precision: Precision,
) -> anyhow::Result<WhisperEngine> {
    Ok(WhisperEngine::from_tensors(
        WhisperEngine::read_config(dir)?,
        weights.clone(),
        &dir.join("tokenizer.json"),
        device,
        precision,
    )?)
}

fn greedy_transcription() -> TranscribeOptions {
    TranscribeOptions {
        language: Some("en".into()),
        beam_size: 1,
        best_of: 1,
        temperatures: vec![0.0],
        ..TranscribeOptions::default()
    }
}

fn greedy_session() -> DecodeOptions {
    DecodeOptions {
        task: Task::Transcribe,
        language: Some("en".into()),
        temperature: 0.0,
        beam_size: 1,
        without_timestamps: true,
        sample_len: SESSION_TOKENS,
        ..DecodeOptions::default()
    }
}

/// Encoder features (1, frames, width) of the first window of `samples`.
fn encode(engine: &WhisperEngine, samples: &[f32]) -> anyhow::Result<Tensor> {
    Ok(engine.encode_window(&padded_mel(engine, samples)?, 0)?)
}

/// The log-mel of `samples` with a window of padding, on the engine's device.
fn padded_mel(engine: &WhisperEngine, samples: &[f32]) -> anyhow::Result<Tensor> {
    Ok(engine
        .mel
        .compute(samples, nexus_models::mel::CHUNK_SAMPLES)?
        .to_tensor(&engine.device)?)
}

/// English transcription without timestamps: the prompt every check decodes after.
fn transcribe_prompt(engine: &WhisperEngine) -> anyhow::Result<Vec<u32>> {
    let mut tokens = engine.sot_sequence(Task::Transcribe, "en")?;
    tokens.push(engine.tokenizer.specials.no_timestamps);
    Ok(tokens)
}

/// Logits (positions, vocab) in f32 at every position of the
/// start-of-transcript sequence followed by `taught`.
fn taught_logits(
    engine: &WhisperEngine,
    features: &Tensor,
    taught: &[u32],
) -> anyhow::Result<Tensor> {
    let mut tokens = transcribe_prompt(engine)?;
    tokens.extend_from_slice(taught);
    let mut state = engine.model.decoder.start(features)?;
    let out = engine.model.decoder.forward(
        &Tensor::new(tokens.as_slice(), &engine.device)?.unsqueeze(0)?,
        &mut state,
        false,
    )?;
    Ok(out
        .logits
        .i(0)?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?)
}

/// Where each batched session's audio starts (seconds), spread over the clip.
fn session_offsets(samples: usize, sessions: usize) -> Vec<f32> {
    let span = (samples.saturating_sub(RATE)) as f32 / RATE as f32;
    (0..sessions)
        .map(|i| (span * i as f32 / sessions as f32 * 10.0).round() / 10.0)
        .collect()
}

/// Greedy texts of sessions starting at `offsets`, decoded together: one
/// forward pass per step for every session still going, as the pool does.
fn decode_sessions(
    engine: &WhisperEngine,
    samples: &[f32],
    offsets: &[f32],
) -> anyhow::Result<Vec<String>> {
    let mut seqs = Vec::with_capacity(offsets.len());
    for o in offsets {
        let start = (*o * RATE as f32) as usize;
        let audio = encode(engine, &samples[start.min(samples.len())..])?;
        seqs.push(GreedySequence::start(
            &engine.model,
            &engine.tokenizer,
            &audio,
            &greedy_session(),
        )?);
    }
    let mut next: Vec<Option<u32>> = seqs.iter_mut().map(|s| s.advance()).collect();
    loop {
        let (mut live, mut tokens) = (Vec::new(), Vec::new());
        for (s, t) in seqs.iter_mut().zip(&next) {
            if let Some(t) = t {
                live.push(s);
                tokens.push(*t);
            }
        }
        if live.is_empty() {
            break;
        }
        step_batch(&engine.model, &mut live, &tokens)?;
        for (s, t) in seqs.iter_mut().zip(next.iter_mut()) {
            if t.is_some() {
                *t = s.advance();
            }
        }
    }
    seqs.into_iter()
        .map(|s| Ok(s.finish(&engine.tokenizer)?.text.trim().to_string()))
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    anyhow::ensure!(
        a.dims() == b.dims(),
        "shapes differ: {:?} against {:?}",
        a.dims(),
        b.dims()
    );
    let a = a.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let b = b.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn check(a: RunArgs) -> anyhow::Result<()> {
    let batches = a
        .batches
        .iter()
        .map(|b| bounded("--batches", *b, 1, 256))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let encoder_batches = a
        .encoder_batches
        .iter()
        .map(|b| bounded("--encoder-batches", *b, 1, 64))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let steps = bounded("--steps", a.steps, 1, 400)?;
    let passes = bounded("--encoder-passes", a.encoder_passes, 1, 1000)?;
    anyhow::ensure!(
        a.tolerance.is_finite() && a.tolerance >= 0.0,
        "--tolerance must be a finite number ≥ 0"
    );
    let device = nexus_models::parse_device(&a.device)?;
    // The checks compare f32 with f32: no TF32 shortcuts in cuBLAS.
    candle_core::cuda::set_gemm_reduced_precision_f32(false);
    let reference: Reference = serde_json::from_slice(
        &std::fs::read(a.bundle.join("reference.json"))
            .with_context(|| format!("reading {}", a.bundle.join("reference.json").display()))?,
    )
    .context("reference.json")?;
    let tensors =
        candle_core::safetensors::load(a.bundle.join("reference.safetensors"), &Device::Cpu)
            .context("reading reference.safetensors")?;
    let get = |n: &str| {
        tensors
            .get(n)
            .cloned()
            .with_context(|| format!("reference.safetensors has no {n}"))
    };
    let samples: Vec<f32> = get("audio")?.to_vec1()?;

    let t0 = Instant::now();
    let weights = bundle_weights(&a.bundle)?;
    let engine = bundle_engine(&a.bundle, &weights, &device, Precision::F32)?;
    println!(
        "gpu-check: {} on {} (loaded in {:.1} s)",
        reference.model,
        a.device,
        t0.elapsed().as_secs_f64()
    );
    let mut checks = Vec::new();
    let mut tensor_check = |name: &'static str, got: anyhow::Result<Tensor>, want: Tensor| {
        let check = match got.and_then(|g| max_abs_diff(&g, &want)) {
            Ok(d) => Check {
                name,
                max_abs_diff: Some(d),
                passed: d <= a.tolerance,
                detail: format!("max |Δ| {d:.2e} (tolerance {:.0e})", a.tolerance),
            },
            Err(e) => Check {
                name,
                max_abs_diff: None,
                passed: false,
                detail: format!("{e:#}"),
            },
        };
        checks.push(check);
    };
    let features = encode(&engine, &samples);
    tensor_check(
        "encoder features",
        features
            .as_ref()
            .map(Tensor::clone)
            .map_err(|e| anyhow::anyhow!("{e:#}")),
        get("features")?,
    );
    let logits = features
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .and_then(|f| taught_logits(&engine, f, &reference.taught));
    tensor_check("decoder logits", logits, get("logits")?);
    let text_check = |name: &'static str, got: anyhow::Result<String>, want: &str| match got {
        Ok(g) => Check {
            name,
            max_abs_diff: None,
            passed: g == want,
            detail: if g == want {
                format!("same: {want:?}")
            } else {
                format!("{g:?} where the CPU wrote {want:?}")
            },
        },
        Err(e) => Check {
            name,
            max_abs_diff: None,
            passed: false,
            detail: format!("{e:#}"),
        },
    };
    let transcript = engine
        .transcribe(&samples, &greedy_transcription(), &mut |_| {})
        .map(|t| t.text())
        .map_err(anyhow::Error::from);
    checks.push(text_check("transcript", transcript, &reference.transcript));
    let offsets: Vec<f32> = reference.sessions.iter().map(|(o, _)| *o).collect();
    let want = reference
        .sessions
        .iter()
        .map(|(_, t)| t.as_str())
        .collect::<Vec<_>>()
        .join(" | ");
    let got = decode_sessions(&engine, &samples, &offsets).map(|t| t.join(" | "));
    checks.push(text_check("batched sessions", got, &want));
    for c in &checks {
        println!(
            "  {:<18} {}  {}",
            c.name,
            if c.passed { "pass" } else { "FAIL" },
            c.detail
        );
    }
    drop(engine);

    let precisions = if a.precisions.is_empty() {
        let served = Precision::default_for(&device);
        if served == Precision::F32 {
            vec![served]
        } else {
            vec![served, Precision::F32]
        }
    } else {
        a.precisions.clone()
    };
    let (mut encoder, mut decoder) = (Vec::new(), Vec::new());
    for precision in precisions {
        let engine = bundle_engine(&a.bundle, &weights, &device, precision)?;
        for b in &encoder_batches {
            let s = encoder_speed(&engine, precision, &samples, *b, passes)?;
            s.print("encoder", "windows", "pass");
            encoder.push(s);
        }
        for b in &batches {
            let s = decoder_speed(&engine, precision, &samples, *b, steps)?;
            s.print("decoder", "tokens", "step");
            decoder.push(s);
        }
    }
    let passed = checks.iter().all(|c| c.passed);
    let report = Report {
        device: a.device.clone(),
        model: reference.model.clone(),
        checks,
        encoder,
        decoder,
        passed,
    };
    if let Some(path) = &a.report {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    anyhow::ensure!(
        passed,
        "{} differs from the CPU: {}",
        a.device,
        report
            .checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("gpu-check: every check passed on {}", a.device);
    Ok(())
}

/// Blocks until `device` has finished its queued work.
fn sync(device: &Device) -> anyhow::Result<()> {
    Ok(device.synchronize()?)
}

fn encoder_speed(
    engine: &WhisperEngine,
    precision: Precision,
    samples: &[f32],
    batch: usize,
    passes: usize,
) -> anyhow::Result<Speed> {
    let mel = padded_mel(engine, samples)?
        .i((.., .., ..nexus_models::mel::CHUNK_FRAMES))?
        .to_dtype(engine.dtype)?;
    let mel = Tensor::cat(&vec![&mel; batch], 0)?;
    engine.model.encoder.forward(&mel)?;
    sync(&engine.device)?;
    let t0 = Instant::now();
    for _ in 0..passes {
        engine.model.encoder.forward(&mel)?;
    }
    sync(&engine.device)?;
    Ok(Speed::timed(precision, batch, passes, t0.elapsed()))
}

fn decoder_speed(
    engine: &WhisperEngine,
    precision: Precision,
    samples: &[f32],
    batch: usize,
    steps: usize,
) -> anyhow::Result<Speed> {
    let features = encode(engine, samples)?;
    let prompt = transcribe_prompt(engine)?;
    let room = engine.model.config.max_target_positions - prompt.len() - 1;
    let steps = steps.min(room);
    let decoder = &engine.model.decoder;
    let mut states = Vec::with_capacity(batch);
    for _ in 0..batch {
        let mut s = decoder.start(&features)?;
        decoder.forward(
            &Tensor::new(prompt.as_slice(), &engine.device)?.unsqueeze(0)?,
            &mut s,
            false,
        )?;
        states.push(s);
    }
    // Each step feeds every session its most likely token, as greedy decoding does.
    let mut tokens = vec![engine.tokenizer.specials.eot - 1; batch];
    let step = |states: &mut Vec<_>, tokens: &mut Vec<u32>| -> anyhow::Result<()> {
        let mut refs: Vec<&mut _> = states.iter_mut().collect();
        let logits = decoder.step_batch(tokens, &mut refs)?;
        *tokens = logits.argmax(1)?.to_dtype(DType::U32)?.to_vec1()?;
        Ok(())
    };
    step(&mut states, &mut tokens)?;
    sync(&engine.device)?;
    let t0 = Instant::now();
    for _ in 1..steps {
        step(&mut states, &mut tokens)?;
    }
    sync(&engine.device)?;
    let timed = steps.saturating_sub(1).max(1);
    Ok(Speed::timed(precision, batch, timed, t0.elapsed()))
}
