//! `nexus data synth`: speech synthesised from text by every voice at hand,
//! augmented and filtered (the NEXUS-O paper's data pipeline, in
//! `nexus_train::synth`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use nexus_models::tts::PiperVoice;
use nexus_models::whisper::WhisperEngine;
use nexus_train::synth::{
    Filters, Progress, Synth, SynthConfig, TextFormat, TextSource, Voices, WhisperListener,
    voices::espeak_voices,
};
use nexus_weights::resolve::resolve_model;

use crate::status_line::{StatusLine, clock};

/// Training data.
#[derive(Debug, Args)]
pub struct DataArgs {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(Debug, Subcommand)]
enum DataCommand {
    /// Speak text with every voice here, augment it, keep what Whisper reads back.
    Synth(Box<SynthArgs>),
}

fn pair(s: &str) -> Result<(f32, f32), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("{s:?}: expected LOW,HIGH"))?;
    let num = |x: &str| x.trim().parse::<f32>().map_err(|e| format!("{x:?}: {e}"));
    Ok((num(a)?, num(b)?))
}

/// `nexus data synth`.
#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Text to speak (`scripts/fetch-text.sh` writes the King James Version).
    #[arg(long)]
    text: PathBuf,
    /// How the text is laid out: `bible` (the `bible` program's listing) or `lines`.
    #[arg(long, default_value = "bible")]
    text_format: TextFormat,
    /// Output folder: shards and manifest.json. An unfinished run there resumes.
    #[arg(long, short)]
    out: PathBuf,
    /// Candidate utterances in all (kept or dropped).
    #[arg(long, default_value_t = 1000)]
    samples: usize,
    /// Candidates per shard.
    #[arg(long, default_value_t = 100)]
    shard_size: usize,
    /// Seed of every draw: the same seed, text and voices give the same shards.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Fewest words of an utterance.
    #[arg(long, default_value_t = 4)]
    min_words: usize,
    /// Most words of an utterance.
    #[arg(long, default_value_t = 20)]
    max_words: usize,
    /// Share of candidates the Piper voice speaks (the rest: espeak-ng's voices).
    #[arg(long, default_value_t = 0.4)]
    piper_share: f32,
    /// Leave the Piper voice out.
    #[arg(long)]
    no_piper: bool,
    /// espeak-ng voices (comma-separated, `en-gb+f3` style); all 91 English ones when absent.
    #[arg(long, value_delimiter = ',')]
    espeak: Vec<String>,
    /// Speed range, relative.
    #[arg(long, default_value = "0.85,1.2", value_parser = pair)]
    speed: (f32, f32),
    /// Pitch range, relative.
    #[arg(long, default_value = "0.85,1.2", value_parser = pair)]
    pitch: (f32, f32),
    /// Speech level range, RMS dBFS.
    #[arg(long, default_value = "-32,-16", value_parser = pair, allow_hyphen_values = true)]
    level_dbfs: (f32, f32),
    /// Share of candidates put in a reverberant room.
    #[arg(long, default_value_t = 0.3)]
    reverb_share: f32,
    /// Room reverberation time range, seconds.
    #[arg(long, default_value = "0.15,0.7", value_parser = pair)]
    rt60: (f32, f32),
    /// Share of candidates with background noise.
    #[arg(long, default_value_t = 0.5)]
    noise_share: f32,
    /// Speech-to-noise ratio range, dB.
    #[arg(long, default_value = "10,35", value_parser = pair, allow_hyphen_values = true)]
    snr_db: (f32, f32),
    /// Share of candidates that are spoken questions with checked answers.
    #[arg(long, default_value_t = 0.05)]
    question_share: f32,
    /// Drop samples the recogniser reads back with a higher word error rate.
    #[arg(long, default_value_t = 0.2)]
    max_wer: f64,
    /// Shortest kept utterance, seconds.
    #[arg(long, default_value_t = 0.8)]
    min_seconds: f32,
    /// Longest kept utterance, seconds.
    #[arg(long, default_value_t = 20.0)]
    max_seconds: f32,
    /// The round trip's recogniser (a Whisper registry name or folder).
    #[arg(long, default_value = "base")]
    asr_model: String,
    /// Make at most this many shards in this call (the rest on the next).
    #[arg(long)]
    max_shards: Option<usize>,
    /// Where weights are kept.
    #[arg(long, env = "NEXUS_HOME")]
    home: Option<PathBuf>,
}

/// Runs `nexus data`.
pub fn run(args: DataArgs) -> anyhow::Result<()> {
    match args.command {
        DataCommand::Synth(a) => synth(*a),
    }
}

fn synth(a: SynthArgs) -> anyhow::Result<()> {
    let config = SynthConfig {
        seed: a.seed,
        samples: a.samples,
        shard_size: a.shard_size,
        min_words: a.min_words,
        max_words: a.max_words,
        piper_share: if a.no_piper { 0.0 } else { a.piper_share },
        speed: a.speed,
        pitch: a.pitch,
        level_dbfs: a.level_dbfs,
        reverb_share: a.reverb_share,
        rt60: a.rt60,
        noise_share: a.noise_share,
        snr_db: a.snr_db,
        question_share: a.question_share,
        filters: Filters {
            min_seconds: a.min_seconds,
            max_seconds: a.max_seconds,
            max_wer: a.max_wer,
            ..Filters::default()
        },
    };
    config.check()?;
    if a.max_shards == Some(0) {
        anyhow::bail!("max_shards: 0 makes nothing; leave it out for all shards");
    }
    let text = TextSource::read(&a.text, a.text_format, a.min_words, a.max_words)?;
    let device = candle_core::Device::Cpu;
    let piper = if a.no_piper || a.piper_share == 0.0 {
        None
    } else {
        let dir = resolve_model("piper-en-us-joe-medium", a.home.clone())?;
        Some((
            "en_US-joe-medium".to_string(),
            PiperVoice::load(&dir, &device).context("the Piper voice")?,
        ))
    };
    let espeak = if a.espeak.is_empty() {
        espeak_voices()
    } else {
        a.espeak.clone()
    };
    let voices = Voices::new(piper, espeak)?;
    let asr_dir = resolve_model(&a.asr_model, a.home.clone())?;
    let engine = WhisperEngine::load(&asr_dir, &device)
        .with_context(|| format!("the recogniser {}", asr_dir.display()))?;
    let mut listener = WhisperListener::new(engine);
    eprintln!(
        "{} utterances from {} ({}), {} voices, {} candidates in {} shards -> {}",
        text.utterances.len(),
        text.name,
        &text.sha256[..12],
        voices.len(),
        config.samples,
        config.shards(),
        a.out.display()
    );
    let status = StatusLine::new();
    let mut last = std::time::Instant::now();
    let mut show = |p: &Progress| {
        let now = std::time::Instant::now();
        if now.duration_since(last).as_secs_f32() < 2.0 && p.left > 0 {
            return;
        }
        last = now;
        let eta = p.elapsed / p.tried.max(1) as f64 * p.left as f64;
        let line = format!(
            "shards {}/{}  kept {} ({:.1} min of audio)  {:.2} s/candidate  eta {}",
            p.shards_done,
            p.shards,
            p.kept,
            p.seconds / 60.0,
            p.elapsed / p.tried.max(1) as f64,
            clock(eta)
        );
        status.show(&line);
    };
    let manifest = Synth {
        config,
        text: &text,
        voices: &voices,
        listener: (&mut listener, a.asr_model.clone()),
    }
    .run(&a.out, a.max_shards, &mut show)?;
    status.end();
    let (kept, seconds) = manifest.kept();
    let tried: usize = manifest.shards.iter().map(|s| s.candidates).sum();
    let mut rejected = std::collections::BTreeMap::<String, usize>::new();
    for s in &manifest.shards {
        for (k, v) in &s.rejected {
            *rejected.entry(k.clone()).or_default() += v;
        }
    }
    println!(
        "{}: {} of {} shards; kept {kept} of {tried} candidates, {:.2} h of audio; dropped {rejected:?}{}",
        a.out.display(),
        manifest.shards.len(),
        manifest.config.shards(),
        seconds / 3600.0,
        if manifest.complete() {
            ""
        } else {
            " (run again to continue)"
        }
    );
    Ok(())
}
