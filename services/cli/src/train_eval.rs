//! `nexus train eval`: a NEXUS-O checkpoint (NEXUS-mini) measured the way
//! the issue asks, each figure beside its anchor in one run: WER on real
//! recordings next to Whisper; speech translation by prompt (English →
//! Chinese, German) scored by chrF against the cascade (Whisper's text →
//! the Qwen translator), with both costs per utterance; spoken questions
//! answered and checked by rule.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use nexus_models::nexus::{NexusModel, NexusTask};
use nexus_models::qwen::Translator;
use nexus_models::tts::PiperVoice;
use nexus_models::whisper::{TranscribeOptions, WhisperEngine};
use nexus_train::rng::Rng;
use nexus_train::synth::{self, Manifest, Rendition, SampleTask, Voices, qa};
use nexus_weights::resolve::{resolve_gguf, resolve_model};

/// `nexus train eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The NEXUS-O checkpoint folder (`nexus train export --out`).
    #[arg(long)]
    model: PathBuf,
    /// The Whisper anchor and the cascade's recogniser.
    #[arg(long, default_value = "base")]
    whisper: String,
    /// The cascade's text translator.
    #[arg(long, default_value = "qwen2.5-0.5b-instruct")]
    translator: String,
    /// Real recordings: a folder of `NAME.wav` + `NAME.txt` (never trained on).
    #[arg(long)]
    test_audio: PathBuf,
    /// `nexus data synth` folders (comma-separated): their held-out
    /// utterances are translated.
    #[arg(long, value_delimiter = ',')]
    synth: Vec<PathBuf>,
    /// Which of its samples were held out: ids that are multiples of this.
    #[arg(long, default_value_t = 20)]
    holdout_every: u64,
    /// Held-out utterances to translate.
    #[arg(long, default_value_t = 50)]
    utterances: usize,
    /// Translation targets (ISO 639-1).
    #[arg(long, value_delimiter = ',', default_value = "zh,de")]
    targets: Vec<String>,
    /// Spoken questions to ask.
    #[arg(long, default_value_t = 20)]
    questions: usize,
    /// Seed of the questions.
    #[arg(long, default_value_t = 2026)]
    seed: u64,
    /// Most tokens of each reply.
    #[arg(long, default_value_t = 160)]
    max_tokens: usize,
    /// Where weights are kept.
    #[arg(long, env = "NEXUS_HOME")]
    home: Option<PathBuf>,
}

/// Audio, the cascade recogniser's text of it, and the seconds that took.
type Heard = (Vec<f32>, String, f64);

struct Timed<T> {
    value: T,
    seconds: f64,
}

fn timed<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<Timed<T>> {
    let t0 = Instant::now();
    let value = f()?;
    Ok(Timed {
        value,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Runs `nexus train eval`.
pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=1000).contains(&a.utterances),
        "utterances: {} is outside 1..=1000",
        a.utterances
    );
    anyhow::ensure!(
        a.questions <= 1000,
        "questions: {} is more than 1000",
        a.questions
    );
    anyhow::ensure!(
        (1..=1024).contains(&a.max_tokens),
        "max_tokens: {} is outside 1..=1024",
        a.max_tokens
    );
    anyhow::ensure!(
        a.holdout_every >= 2,
        "holdout_every: {} must be at least 2",
        a.holdout_every
    );
    let device = candle_core::Device::Cpu;
    let model =
        NexusModel::load(&a.model, &device).with_context(|| a.model.display().to_string())?;
    let whisper = WhisperEngine::load(&resolve_model(&a.whisper, a.home.clone())?, &device)?;
    let mut translator = Translator::load(&resolve_gguf(&a.translator, a.home.clone())?, &device)?;
    let wopts = TranscribeOptions {
        language: Some("en".into()),
        ..TranscribeOptions::default()
    };
    let nexus = |samples: &[f32], task: &NexusTask| -> anyhow::Result<String> {
        let audio = model.encode_audio(samples)?;
        Ok(model
            .generate(task, &audio, a.max_tokens)?
            .text
            .trim()
            .to_string())
    };
    let transcribe = NexusTask::Transcribe { language: None };

    // 1. WER on real recordings, beside Whisper.
    let clips = crate::train::recordings(&a.test_audio)?;
    println!(
        "## WER on {} ({} clips, never trained on)\n",
        a.test_audio.display(),
        clips.len()
    );
    println!(
        "| clip | reference words | NEXUS-mini WER | {} WER | NEXUS-mini text |",
        a.whisper
    );
    println!("|---|---|---|---|---|");
    let (mut ne, mut we, mut words) = (0usize, 0usize, 0usize);
    let (mut ns, mut ws) = (0f64, 0f64);
    let mut cascade_text = Vec::new();
    for (name, audio, text) in &clips {
        let n = timed(|| nexus(audio, &transcribe))?;
        let w = timed(|| Ok(whisper.transcribe(audio, &wopts, &mut |_| {})?.text()))?;
        let (cn, cw) = (
            nexus_eval::wer(text, &n.value),
            nexus_eval::wer(text, &w.value),
        );
        ne += cn.errors;
        we += cw.errors;
        words += cn.reference_len;
        ns += n.seconds;
        ws += w.seconds;
        println!(
            "| {name} | {} | {:.1} % | {:.1} % | {} |",
            cn.reference_len,
            cn.rate() * 100.0,
            cw.rate() * 100.0,
            n.value.replace('|', "/")
        );
        cascade_text.push((audio.clone(), w.value, w.seconds));
    }
    println!(
        "| **all** | {words} | **{:.1} %** | **{:.1} %** | {:.2} s vs {:.2} s per clip |\n",
        ne as f64 / words.max(1) as f64 * 100.0,
        we as f64 / words.max(1) as f64 * 100.0,
        ns / clips.len() as f64,
        ws / clips.len() as f64
    );

    // 2. Speech translation by prompt against the cascade's references.
    let mut sets: Vec<(String, Vec<Heard>)> = Vec::new();
    if !a.synth.is_empty() {
        let mut held = Vec::new();
        'folders: for dir in &a.synth {
            let m = Manifest::read(dir)?;
            for s in &m.shards {
                for (r, audio) in synth::read_shard(dir, s.index)? {
                    if r.id % a.holdout_every == 0 && r.task == SampleTask::Transcribe {
                        let w =
                            timed(|| Ok(whisper.transcribe(&audio, &wopts, &mut |_| {})?.text()))?;
                        held.push((audio, w.value, w.seconds));
                        if held.len() == a.utterances {
                            break 'folders;
                        }
                    }
                }
            }
        }
        sets.push((
            format!("{} held-out synthesised utterances", held.len()),
            held,
        ));
    }
    sets.push((format!("{} real recordings", clips.len()), cascade_text));
    println!(
        "## Speech translation by prompt, chrF against the cascade ({} → {})\n",
        a.whisper, a.translator
    );
    println!("| set | target | chrF | NEXUS-mini s/utterance | cascade s/utterance |");
    println!("|---|---|---|---|---|");
    for (label, set) in &sets {
        for target in &a.targets {
            let (mut hyps, mut refs) = (Vec::new(), Vec::new());
            let (mut ns, mut cs) = (0f64, 0f64);
            for (audio, heard, whisper_s) in set {
                let t = timed(|| Ok(translator.translate_text(heard, Some("en"), target)?.text))?;
                let n = timed(|| {
                    nexus(
                        audio,
                        &NexusTask::Translate {
                            target: target.clone(),
                        },
                    )
                })?;
                refs.push(t.value);
                hyps.push(n.value);
                ns += n.seconds;
                cs += whisper_s + t.seconds;
            }
            let k = set.len().max(1) as f64;
            println!(
                "| {label} | {target} | {:.1} | {:.2} | {:.2} |",
                nexus_eval::mt::chrf(&hyps, &refs),
                ns / k,
                cs / k
            );
            if let (Some(h), Some(r)) = (hyps.first(), refs.first()) {
                eprintln!("  {target} e.g. NEXUS-mini {h:?}; cascade {r:?}");
            }
        }
    }
    println!();

    // 3. Spoken questions, answers checked by rule.
    if a.questions > 0 {
        let piper = PiperVoice::load(
            &resolve_model("piper-en-us-joe-medium", a.home.clone())?,
            &device,
        )?;
        let voices = Voices::new(Some(("en_US-joe-medium".into(), piper)), Vec::new())?;
        let mut rng = Rng::new(a.seed);
        let mut right = 0;
        println!(
            "## Spoken questions ({}, Piper's voice; seed {})\n",
            a.questions, a.seed
        );
        println!("| question | expected | NEXUS-mini's answer | right |");
        println!("|---|---|---|---|");
        for i in 0..a.questions {
            let q = qa::question(&mut rng);
            let r = Rendition {
                voice: "piper:en_US-joe-medium".into(),
                speed: 1.0,
                pitch: 1.0,
            };
            let audio = voices.render(&q.question, &r, i as u64)?;
            let reply = nexus(&audio, &NexusTask::Chat)?;
            let ok = q.accepts(&reply);
            right += usize::from(ok);
            println!(
                "| {} | {} | {} | {} |",
                q.question,
                q.answer,
                reply.replace('|', "/"),
                if ok { "yes" } else { "no" }
            );
        }
        println!(
            "\naccuracy: {right} of {} ({:.0} %)",
            a.questions,
            right as f64 / a.questions as f64 * 100.0
        );
    }
    Ok(())
}
