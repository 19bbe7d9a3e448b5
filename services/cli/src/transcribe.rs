//! `nexus transcribe`: a recording to text or subtitles, on this machine.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};
use nexus_audio::{AudioLimits, PcmSpec, SampleFormat};
use nexus_models::whisper::{Task, TranscribeOptions, WhisperEngine};
use nexus_transcript::{Format, Segment, Transcript, Word};

/// Transcribe (or translate into English) an audio file.
#[derive(Debug, Args)]
pub struct TranscribeArgs {
    /// Audio file: WAV, FLAC, MP3, Ogg Vorbis, M4A/AAC, AIFF, CAF, MKV; or raw PCM with `--raw-rate`.
    file: PathBuf,
    /// Registry name (`base`, `tiny.en`, …) or a model folder.
    #[arg(long, default_value = "base")]
    model: String,
    /// `transcribe` keeps the spoken language; `translate` produces English.
    #[arg(long, value_enum, default_value = "transcribe")]
    task: TaskArg,
    /// Spoken language (ISO 639-1); detected when absent.
    #[arg(long)]
    language: Option<String>,
    /// Translate into this language (ISO 639-1). English uses Whisper's own
    /// translation; other targets go through the text translation model.
    #[arg(long)]
    to: Option<String>,
    /// Text translation model for `--to` (registry name or `.gguf` path).
    #[arg(long, default_value = "qwen2.5-0.5b-instruct")]
    translation_model: String,
    /// Output format.
    #[arg(long, default_value = "text", value_parser = parse_format)]
    format: Format,
    /// Time every word (verbose_json, and finer subtitle cues).
    #[arg(long)]
    word_timestamps: bool,
    /// Say who spoke when: segments split at speaker changes and labelled
    /// `Speaker 1`, `Speaker 2`, ... (needs `nexus models pull ge2e silero-vad`).
    #[arg(long)]
    diarize: bool,
    /// At least this many speakers (implies `--diarize`).
    #[arg(long)]
    min_speakers: Option<usize>,
    /// At most this many speakers (implies `--diarize`).
    #[arg(long)]
    max_speakers: Option<usize>,
    /// Beam width (1 = greedy).
    #[arg(long, default_value_t = 5)]
    beam_size: usize,
    /// Text that precedes the audio: names, spellings, style.
    #[arg(long)]
    prompt: Option<String>,
    /// Comma-separated terms to favour.
    #[arg(long, value_delimiter = ',')]
    hotwords: Vec<String>,
    /// Treat the file as raw PCM at this rate (with `--raw-format` and `--raw-channels`).
    #[arg(long)]
    raw_rate: Option<u32>,
    /// Raw PCM sample format.
    #[arg(long, value_enum, default_value = "s16le")]
    raw_format: RawFormat,
    /// Raw PCM channels.
    #[arg(long, default_value_t = 1)]
    raw_channels: u32,
    /// Write here instead of standard output.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Where weights are kept.
    #[arg(long, env = "NEXUS_HOME")]
    home: Option<PathBuf>,
    /// How Whisper's linear layers hold their weights: f32, or int8 (Q8_0
    /// blocks for token steps, a scale per output for the encoder's frames).
    #[arg(long, env = "NEXUS_PRECISION", default_value_t = nexus_models::Precision::Int8)]
    precision: nexus_models::Precision,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TaskArg {
    Transcribe,
    Translate,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RawFormat {
    S16le,
    F32le,
}

fn parse_format(s: &str) -> Result<Format, String> {
    s.parse()
        .map_err(|e: nexus_transcript::UnknownFormat| e.to_string())
}

pub use nexus_weights::resolve::resolve_model;

/// 16 kHz mono samples of a file.
pub fn load_audio(file: &Path, raw: Option<(u32, SampleFormat, u32)>) -> anyhow::Result<Vec<f32>> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let limits = AudioLimits::default();
    match raw {
        Some((rate, format, channels)) => {
            let spec = PcmSpec {
                format,
                sample_rate: rate,
                channels,
            };
            let channels = nexus_audio::pcm::decode_all(&bytes, spec, &limits)?;
            Ok(nexus_audio::to_model_rate(&channels, rate)?)
        }
        None => {
            let ext = file.extension().and_then(|e| e.to_str());
            let mut mono =
                nexus_audio::decode_to_model_rate(bytes, ext, &limits, nexus_audio::Layout::Mono)
                    .with_context(|| format!("decoding {}", file.display()))?;
            Ok(mono.pop().unwrap_or_default())
        }
    }
}

fn progress_bar(enabled: bool) -> impl FnMut(f32) {
    let mut last = -1i32;
    move |f: f32| {
        let pct = (f * 100.0) as i32;
        if enabled && pct != last {
            last = pct;
            let filled = (f * 30.0) as usize;
            eprint!(
                "\r[{}{}] {pct:3}%",
                "#".repeat(filled),
                ".".repeat(30 - filled)
            );
            if pct >= 100 {
                eprintln!();
            }
            let _ = std::io::stderr().flush();
        }
    }
}

/// Converts the engine's transcript into the file-format one.
pub fn to_transcript(t: &nexus_models::whisper::Transcript, task: Task) -> Transcript {
    Transcript {
        task: match task {
            Task::Transcribe => "transcribe",
            Task::Translate => "translate",
        }
        .into(),
        language: if task == Task::Translate {
            "en".into()
        } else {
            t.language.clone()
        },
        duration: f64::from(t.duration),
        target_language: None,
        segments: t
            .segments
            .iter()
            .map(|s| Segment {
                id: s.id,
                start: f64::from(s.start),
                end: f64::from(s.end),
                text: s.text.clone(),
                decoding: Some(nexus_transcript::Decoding {
                    tokens: s.tokens.clone(),
                    temperature: f64::from(s.temperature),
                    avg_logprob: f64::from(s.avg_logprob),
                    compression_ratio: f64::from(s.compression_ratio),
                }),
                no_speech_prob: Some(f64::from(s.no_speech_prob)),
                words: s
                    .words
                    .iter()
                    .map(|w| Word {
                        word: w.word.clone(),
                        start: f64::from(w.start),
                        end: f64::from(w.end),
                        probability: f64::from(w.probability),
                        speaker: None,
                    })
                    .collect(),
                translation: None,
                translation_failure: None,
                speaker: None,
            })
            .collect(),
    }
}

/// Runs `nexus transcribe`.
pub fn run(args: TranscribeArgs) -> anyhow::Result<()> {
    let dir = resolve_model(&args.model, args.home.clone())?;
    // English targets use Whisper's translate task; others need the text model, found before any work.
    let text_target = args.to.clone().filter(|t| t != "en");
    let translator_file = match &text_target {
        Some(t) => {
            crate::translate::check_target(t)?;
            Some(crate::translate::resolve_gguf(
                &args.translation_model,
                args.home.clone(),
            )?)
        }
        None => None,
    };
    let raw = args.raw_rate.map(|r| {
        let f = match args.raw_format {
            RawFormat::S16le => SampleFormat::S16Le,
            RawFormat::F32le => SampleFormat::F32Le,
        };
        (r, f, args.raw_channels)
    });
    let diarize = args.diarize || args.min_speakers.is_some() || args.max_speakers.is_some();
    let diarizer = if diarize {
        let count = nexus_models::speaker::speaker_count(args.min_speakers, args.max_speakers)
            .map_err(anyhow::Error::msg)?;
        let store = nexus_weights::Store::new(
            args.home
                .clone()
                .unwrap_or_else(nexus_weights::Store::default_root),
        );
        let d = nexus_models::speaker::Diarizer::load(
            &store.model_dir("ge2e"),
            &store.source_dir("silero-vad").join("model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .context("--diarize needs `nexus models pull ge2e silero-vad`")?;
        Some((d, count))
    } else {
        None
    };
    let samples = load_audio(&args.file, raw)?;
    let t0 = Instant::now();
    let engine = WhisperEngine::load_with(&dir, &candle_core::Device::Cpu, args.precision)?;
    tracing::info!(model = %dir.display(), load_ms = t0.elapsed().as_millis() as u64, "model loaded");
    let task = match (args.task, args.to.as_deref()) {
        (_, Some("en")) | (TaskArg::Translate, None) => Task::Translate,
        _ => Task::Transcribe,
    };
    let opts = TranscribeOptions {
        task,
        language: args.language.clone(),
        beam_size: args.beam_size.max(1),
        initial_prompt: args.prompt.clone(),
        hotwords: args.hotwords.clone(),
        // Speaker changes are placed at word boundaries.
        word_timestamps: args.word_timestamps || diarize,
        ..TranscribeOptions::default()
    };
    let t1 = Instant::now();
    let mut bar = progress_bar(std::io::stderr().is_terminal() && samples.len() > 16_000 * 60);
    let result = engine.transcribe(&samples, &opts, &mut bar)?;
    let secs = t1.elapsed().as_secs_f64();
    tracing::info!(
        audio_s = f64::from(result.duration),
        took_s = secs,
        rtf = secs / f64::from(result.duration).max(1e-9),
        "transcribed"
    );
    let mut transcript = to_transcript(&result, task);
    if let Some((d, count)) = &diarizer {
        let t2 = Instant::now();
        let who = d.run(
            &samples,
            &nexus_models::speaker::DiarizeOptions {
                count: *count,
                ..Default::default()
            },
        )?;
        tracing::info!(
            speakers = who.speakers,
            turns = who.turns.len(),
            took_s = t2.elapsed().as_secs_f64(),
            "diarized"
        );
        transcript.apply_speakers(|s, e| who.speaker_at(s, e));
    }
    if let (Some(target), Some(file)) = (text_target, translator_file) {
        let mut translator =
            nexus_models::qwen::Translator::load(&file, &candle_core::Device::Cpu)?;
        let source = transcript.language.clone();
        // Each segment is translated with the ones before it as context, and
        // the hotwords as its glossary.
        let mut context: Vec<String> = Vec::new();
        for seg in &mut transcript.segments {
            let text = seg.text.trim().to_owned();
            let t = translator.translate(&nexus_models::qwen::prompt::Spec {
                text: &text,
                source: Some(&source),
                target: &target,
                context: &context,
                glossary: &args.hotwords,
            })?;
            seg.translation = Some(t.text);
            seg.translation_failure = t.failure.map(str::to_owned);
            context.push(text);
            if context.len() > nexus_models::qwen::prompt::MAX_CONTEXT {
                context.remove(0);
            }
        }
        transcript.target_language = Some(target);
    }
    let rendered = transcript.render(args.format);
    match args.output {
        Some(path) => std::fs::write(&path, rendered)
            .with_context(|| format!("writing {}", path.display()))?,
        None => print!("{rendered}"),
    }
    Ok(())
}
