//! `nexus bench tts`: the Piper voice in candle. Synthesis real-time factor
//! beside ONNX Runtime running the voice's own ONNX export on the same
//! phoneme ids (the anchor), and the Seed-TTS style intelligibility check:
//! whisper base reads the audio back, WER on twenty everyday sentences and on
//! twenty Harvard sentences (phonetically hard on purpose).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use nexus_eval::sentences::{EVERYDAY, HARVARD};
use nexus_models::tts::{PiperVoice, SynthesisOptions, phonemize, sentences};
use nexus_models::whisper::{TranscribeOptions, WhisperEngine};

const ANCHOR: &str = include_str!("../../../scripts/bench/piper_ort_anchor.py");

/// Options of `nexus bench tts`.
#[derive(Debug, Args)]
pub struct TtsArgs {
    /// Voice (registry name or converted folder).
    #[arg(long, default_value = "piper-en-us-joe-medium")]
    voice: String,
    /// Whisper model that reads the audio back.
    #[arg(long, default_value = "base")]
    asr: String,
    /// Python with onnxruntime for the anchor; the anchor is skipped without it.
    #[arg(long)]
    ort_python: Option<PathBuf>,
    /// Threads for both systems.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Where weights are kept.
    #[arg(long, env = "NEXUS_HOME")]
    home: Option<PathBuf>,
}

/// Runs the benchmark.
pub fn run(args: TtsArgs) -> anyhow::Result<()> {
    let dir = nexus_vocoder::resolve_voice(&args.voice, args.home.clone())?;
    let voice = PiperVoice::load(&dir, &candle_core::Device::Cpu)?;
    let asr_dir = crate::transcribe::resolve_model(&args.asr, args.home.clone())?;
    let asr = WhisperEngine::load(&asr_dir, &candle_core::Device::Cpu)?;
    let opts = voice.default_options();
    let rate = voice.sample_rate();
    println!(
        "voice {} ({} Hz), scales noise {} / length {} / noise_w {}, {} threads, read back by whisper {}",
        args.voice, rate, opts.noise_scale, opts.length_scale, opts.noise_w, args.threads, args.asr
    );
    let mut all_ids = Vec::new();
    let (mut ours_s, mut audio_s) = (0.0, 0.0);
    for (name, set) in [("everyday", &EVERYDAY), ("Harvard", &HARVARD)] {
        let (mut errors, mut words) = (0, 0);
        for (i, text) in set.iter().enumerate() {
            let mut samples = Vec::new();
            for s in sentences(text) {
                let ids = voice.phoneme_ids(&phonemize(&s, &voice.config().espeak.voice)?);
                let t0 = Instant::now();
                let out = voice.synthesize_ids(
                    &ids,
                    &SynthesisOptions {
                        seed: i as u64,
                        ..opts
                    },
                )?;
                ours_s += t0.elapsed().as_secs_f64();
                audio_s += out.samples.len() as f64 / f64::from(rate);
                samples.extend(out.samples);
                all_ids.push(ids);
            }
            let pcm = nexus_audio::resample(&[samples], rate, 16_000)?.remove(0);
            let heard = asr
                .transcribe(
                    &pcm,
                    &TranscribeOptions {
                        language: Some("en".into()),
                        ..Default::default()
                    },
                    &mut |_| {},
                )?
                .text();
            let e = nexus_eval::wer(text, &heard);
            errors += e.errors;
            words += e.reference_len;
        }
        println!(
            "{name:<9} WER {:>5.2} % ({errors}/{words} words)",
            100.0 * errors as f64 / words as f64
        );
    }
    println!(
        "candle (ours)      RTF {:.3}  ({audio_s:.1} s of audio in {ours_s:.1} s)",
        ours_s / audio_s
    );
    let Some(py) = args.ort_python else {
        println!("anchor skipped: pass --ort-python with a Python that has onnxruntime");
        return Ok(());
    };
    let tmp = std::env::temp_dir().join(format!("nexus-bench-tts-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let script = tmp.join("anchor.py");
    std::fs::write(&script, ANCHOR)?;
    let job = tmp.join("ids.json");
    std::fs::write(
        &job,
        serde_json::to_vec(&serde_json::json!({
            "scales": [opts.noise_scale, opts.length_scale, opts.noise_w],
            "utterances": all_ids,
        }))?,
    )?;
    let onnx = dir.join("source/model.onnx");
    let out = std::process::Command::new(&py)
        .arg(&script)
        .arg(&onnx)
        .arg(&job)
        .arg(args.threads.to_string())
        .output()
        .with_context(|| format!("running {}", py.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "anchor failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let runs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    let ort_s: f64 = runs.iter().filter_map(|r| r["seconds"].as_f64()).sum();
    let ort_audio: f64 = runs
        .iter()
        .filter_map(|r| r["samples"].as_f64())
        .sum::<f64>()
        / f64::from(rate);
    println!(
        "ONNX Runtime       RTF {:.3}  ({ort_audio:.1} s of audio in {ort_s:.1} s)",
        ort_s / ort_audio
    );
    println!(
        "ours / ONNX Runtime time per audio second: {:.2}",
        (ours_s / audio_s) / (ort_s / ort_audio)
    );
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
