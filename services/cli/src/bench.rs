//! `nexus bench`: measured figures with the named anchors run side by side.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use nexus_models::whisper::{TranscribeOptions, WhisperEngine};
use serde_json::{Value, json};

use crate::transcribe::{load_audio, resolve_model};

const ANCHOR: &str = include_str!("../../../scripts/bench/faster_whisper_anchor.py");

/// Benchmarks.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Speech recognition: real-time factor, peak memory and WER of our engine
    /// and of faster-whisper (int8 and float32) on the same files, weights,
    /// thread count and beam.
    Asr(AsrArgs),
    /// Audio in: decode, downmix + resample to 16 kHz, and Silero VAD throughput on
    /// a 10-minute 44.1 kHz stereo recording (real speech, looped), one thread.
    Audio(AudioArgs),
    /// Stage-to-stage transport: append, group read and ack per hop, in memory
    /// and on Redis, with audio-window and encoder-feature payloads.
    #[cfg(feature = "fleet")]
    Bus(crate::bench_bus::BusArgs),
    /// Speaker diarization: DER (offline and live), word speaker attribution
    /// error and time on the meeting set, beside Resemblyzer's own encoder.
    Diarize(crate::bench_diarize::DiarizeBenchArgs),
    /// Text translation: seconds per sentence and tokens per second of the
    /// Qwen GGUF as the fleet loads it, beside the same file as stored.
    Translate(crate::bench_translate::TranslateBenchArgs),
    /// Speech synthesis: the Piper voice's real-time factor beside ONNX Runtime
    /// on the same phoneme ids, and whisper base reading it back (WER).
    #[cfg(feature = "fleet")]
    Tts(crate::bench_tts::TtsArgs),
    /// The Whisper network's own costs per precision: encoder per window
    /// length, a decoder sequence's start, one batched step per batch size.
    Whisper(crate::bench_whisper::WhisperBenchArgs),
    /// One system on one model, in this process (used by `asr`; prints JSON).
    #[command(hide = true)]
    AsrRun {
        #[arg(long)]
        model: String,
        #[arg(long)]
        beam: usize,
        #[arg(long)]
        precision: nexus_models::Precision,
        files: Vec<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct AudioArgs {
    /// A 16 kHz speech WAV to loop (default: a LibriVox clip from `scripts/fetch-testdata.sh`).
    #[arg(
        long,
        default_value = ".cache/testdata/librivox/sense_and_sensibility_01_austen_64kb-0870.wav"
    )]
    speech: PathBuf,
    /// Minutes of audio.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Where weights are kept.
    #[arg(long, env = "NEXUS_HOME")]
    home: Option<PathBuf>,
}

fn audio(args: AudioArgs) -> anyhow::Result<()> {
    use nexus_audio::AudioLimits;
    let speech = load_audio(&args.speech, None).with_context(|| "run scripts/fetch-testdata.sh")?;
    let up = nexus_audio::resample(&[speech], 16_000, 44_100)?.remove(0);
    let total = (args.minutes * 60.0 * 44_100.0) as usize;
    let left: Vec<f32> = up.iter().copied().cycle().take(total).collect();
    let right: Vec<f32> = left.iter().map(|v| v * 0.8).collect();
    let audio_s = total as f64 / 44_100.0;
    let mut files = vec![(
        "wav 44.1k stereo",
        "wav",
        nexus_audio::wav::encode_pcm16(&[left, right], 44_100),
    )];
    let tmp = std::env::temp_dir().join(format!("nexus-bench-audio-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let wav_path = tmp.join("in.wav");
    std::fs::write(&wav_path, &files[0].2)?;
    for (label, ext, tool, a) in [
        (
            "flac 44.1k stereo",
            "flac",
            "flac",
            vec!["--silent", "-f", "-o", "OUT", "IN"],
        ),
        (
            "mp3 128k stereo",
            "mp3",
            "lame",
            vec!["--quiet", "-b", "128", "IN", "OUT"],
        ),
        (
            "ogg vorbis q4 stereo",
            "ogg",
            "oggenc",
            vec!["--quiet", "-q", "4", "-o", "OUT", "IN"],
        ),
    ] {
        let out = tmp.join(format!("out.{ext}"));
        let mut cmd = Command::new(tool);
        for x in &a {
            match *x {
                "IN" => cmd.arg(&wav_path),
                "OUT" => cmd.arg(&out),
                x => cmd.arg(x),
            };
        }
        match cmd.status() {
            Ok(s) if s.success() => files.push((label, ext, std::fs::read(&out)?)),
            _ => eprintln!("{tool} not available; {label} skipped (scripts/setup.sh installs it)"),
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let store =
        nexus_weights::Store::new(args.home.unwrap_or_else(nexus_weights::Store::default_root));
    let vad_path = store.source_dir("silero-vad").join("model.safetensors");
    let vad = nexus_models::vad::SileroVad::load(&vad_path, &candle_core::Device::Cpu)
        .with_context(|| "run `nexus models pull silero-vad`")?;
    println!(
        "Audio in, {:.0} min of speech, one thread (x real time = audio seconds per processing second)",
        audio_s / 60.0
    );
    println!(
        "{:<22} {:>12} {:>14} {:>12} {:>12}",
        "input", "decode", "to 16k mono", "VAD", "all three"
    );
    let mut vad_rate = None;
    for (label, ext, bytes) in files {
        let t0 = Instant::now();
        let a = nexus_audio::decode_bytes(bytes, Some(ext), &AudioLimits::default())?;
        let t_dec = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mono = nexus_audio::to_model_rate(&a.channels, a.sample_rate)?;
        let t_res = t1.elapsed().as_secs_f64();
        let t_vad = match vad_rate {
            Some(t) => t,
            None => {
                let t2 = Instant::now();
                let probs = vad.probabilities(&mono)?;
                let t = t2.elapsed().as_secs_f64();
                let voiced =
                    probs.iter().filter(|p| **p > 0.5).count() as f64 / probs.len().max(1) as f64;
                eprintln!("VAD: {} steps, {:.0} % voiced", probs.len(), voiced * 100.0);
                vad_rate = Some(t);
                t
            }
        };
        println!(
            "{label:<22} {:>11.0}x {:>13.0}x {:>11.0}x {:>11.0}x",
            audio_s / t_dec,
            audio_s / t_res,
            audio_s / t_vad,
            audio_s / (t_dec + t_res + t_vad)
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
struct AsrArgs {
    /// Models to measure.
    #[arg(long, value_delimiter = ',', default_value = "tiny.en,base")]
    models: Vec<String>,
    /// Folder of 16 kHz WAV files, each with a `.txt` reference beside it
    /// (`scripts/fetch-testdata.sh` fetches the LibriVox clips).
    #[arg(long, default_value = ".cache/testdata/librivox")]
    data: PathBuf,
    /// CPU threads for every system.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Beam width for every system.
    #[arg(long, default_value_t = 5)]
    beam: usize,
    /// Our precisions, one row each.
    #[arg(long, value_delimiter = ',', default_value = "f32,int8")]
    precision: Vec<nexus_models::Precision>,
    /// Python with faster-whisper installed; `none` skips the anchor.
    #[arg(long, default_value = "python3")]
    anchor_python: String,
    /// Where weights are kept.
    #[arg(long, env = "NEXUS_HOME")]
    home: Option<PathBuf>,
}

/// The process's peak resident memory (VmHWM), MB.
pub(crate) fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn run_ours(
    model: &str,
    beam: usize,
    precision: nexus_models::Precision,
    files: &[PathBuf],
) -> anyhow::Result<()> {
    let dir = resolve_model(model, None)?;
    let engine = WhisperEngine::load_with(&dir, &candle_core::Device::Cpu, precision)?;
    let opts = TranscribeOptions {
        beam_size: beam,
        ..TranscribeOptions::default()
    };
    let mut texts = BTreeMap::new();
    let (mut audio_s, mut wall_s) = (0.0, 0.0);
    for f in files {
        let samples = load_audio(f, None)?;
        let t0 = Instant::now();
        let t = engine.transcribe(&samples, &opts, &mut |_| {})?;
        wall_s += t0.elapsed().as_secs_f64();
        audio_s += samples.len() as f64 / 16_000.0;
        texts.insert(f.display().to_string(), t.text());
    }
    println!(
        "{}",
        json!({"files": texts, "audio_s": audio_s, "wall_s": wall_s, "peak_rss_mb": peak_rss_mb()})
    );
    Ok(())
}

fn child_json(mut cmd: Command, what: &str) -> anyhow::Result<Value> {
    let out = cmd.output().with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("{what} printed no JSON: {line}"))
}

struct Row {
    model: String,
    system: String,
    rtf: f64,
    rss: f64,
    wer: f64,
}

fn score(v: &Value, refs: &BTreeMap<String, String>) -> f64 {
    let counts: nexus_eval::ErrorCounts = refs
        .iter()
        .map(|(f, r)| nexus_eval::wer(r, v["files"][f].as_str().unwrap_or("")))
        .sum();
    counts.rate() * 100.0
}

fn asr(args: AsrArgs) -> anyhow::Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(&args.data)
        .with_context(|| format!("{} (run scripts/fetch-testdata.sh)", args.data.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "wav") && p.with_extension("txt").is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "no .wav files with .txt references in {}",
            args.data.display()
        );
    }
    let refs: BTreeMap<String, String> = files
        .iter()
        .map(|f| {
            Ok((
                f.display().to_string(),
                std::fs::read_to_string(f.with_extension("txt"))?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let exe = std::env::current_exe()?;
    let anchor_path =
        std::env::temp_dir().join(format!("nexus-fw-anchor-{}.py", std::process::id()));
    std::fs::write(&anchor_path, ANCHOR)?;
    let mut rows = Vec::new();
    for model in &args.models {
        let dir = resolve_model(model, args.home.clone())?;
        for p in &args.precision {
            let mut cmd = Command::new(&exe);
            cmd.args(["bench", "asr-run", "--model"])
                .arg(&dir)
                .args(["--beam", &args.beam.to_string()])
                .args(["--precision", p.as_str()])
                .args(&files)
                .env("RAYON_NUM_THREADS", args.threads.to_string())
                .env("NEXUS_LOG", "warn");
            let v = child_json(cmd, "nexus")?;
            rows.push(Row {
                model: model.clone(),
                system: format!("nexus (candle {p})"),
                rtf: v["wall_s"].as_f64().unwrap_or(0.0) / v["audio_s"].as_f64().unwrap_or(1.0),
                rss: v["peak_rss_mb"].as_f64().unwrap_or(0.0),
                wer: score(&v, &refs),
            });
        }
        if args.anchor_python == "none" {
            continue;
        }
        for ct in ["int8", "float32"] {
            let mut cmd = Command::new(&args.anchor_python);
            cmd.arg(&anchor_path)
                .arg(dir.join("source"))
                .args([ct, &args.threads.to_string(), &args.beam.to_string()])
                .args(&files);
            match child_json(cmd, "faster-whisper") {
                Ok(v) => rows.push(Row {
                    model: model.clone(),
                    system: format!("faster-whisper {ct}"),
                    rtf: v["wall_s"].as_f64().unwrap_or(0.0) / v["audio_s"].as_f64().unwrap_or(1.0),
                    rss: v["peak_rss_mb"].as_f64().unwrap_or(0.0),
                    wer: score(&v, &refs),
                }),
                Err(e) => eprintln!("anchor faster-whisper {ct} skipped: {e}"),
            }
        }
    }
    let _ = std::fs::remove_file(&anchor_path);
    let audio: f64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| (m.len().saturating_sub(44)) as f64 / 32_000.0)
        .sum();
    println!(
        "ASR on {} files ({audio:.1} s of speech), {} threads, beam {}",
        files.len(),
        args.threads,
        args.beam
    );
    println!(
        "{:<9} {:<22} {:>7} {:>10} {:>7} {:>18}",
        "model", "system", "RTF", "peak MB", "WER %", "RTF vs nexus"
    );
    for r in &rows {
        // Against our first precision's row.
        let ours = rows
            .iter()
            .find(|o| o.model == r.model && o.system.starts_with("nexus"))
            .map_or(r.rtf, |o| o.rtf);
        println!(
            "{:<9} {:<22} {:>7.3} {:>10.0} {:>7.2} {:>17.2}x",
            r.model,
            r.system,
            r.rtf,
            r.rss,
            r.wer,
            ours / r.rtf.max(1e-9)
        );
    }
    println!(
        "(RTF = processing seconds per audio second, model load excluded; 'RTF vs nexus' > 1 means the row is faster than nexus)"
    );
    Ok(())
}

/// Runs `nexus bench …`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Asr(a) => asr(a),
        BenchCommand::Audio(a) => audio(a),
        #[cfg(feature = "fleet")]
        BenchCommand::Bus(a) => crate::bench_bus::run(a),
        BenchCommand::Diarize(a) => crate::bench_diarize::run(a),
        BenchCommand::Translate(a) => crate::bench_translate::run(a),
        #[cfg(feature = "fleet")]
        BenchCommand::Tts(a) => crate::bench_tts::run(a),
        BenchCommand::Whisper(a) => crate::bench_whisper::run(a),
        BenchCommand::AsrRun {
            model,
            beam,
            precision,
            files,
        } => run_ours(&model, beam, precision, &files),
    }
}
