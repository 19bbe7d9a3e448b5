//! `nexus bench diarize`: who-spoke-when on the meeting set
//! (`nexus_eval::meetings`, real readers with exact reference turns).
//!
//! Per recording: the diarization error rate (NIST's definition, 250 ms
//! collar) of the offline path (every window of the recording clustered
//! together) and of the live path (each final, as the endpointer cuts them,
//! labelled on arrival by the online clusterer), the speakers found, the
//! word-level speaker attribution error (Whisper's words labelled by the
//! offline turns, against the reader of the reference turn each word falls
//! in), and the time taken; beside them the anchor: Resemblyzer's own
//! PyTorch encoder with SciPy's average-linkage clustering on the same
//! audio and speech regions.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use nexus_audio::endpoint::{EndpointConfig, EndpointEvent, Endpointer};
use nexus_eval::der::{Der, Segment, der};
use nexus_eval::meetings::{self, MEETINGS};
use nexus_models::speaker::diarize::DEFAULT_THRESHOLD;
use nexus_models::speaker::{DiarizeOptions, Diarizer, OnlineDiarizer, SpeakerCount, diarize};
use nexus_models::vad::speech_regions;
use nexus_models::whisper::{TranscribeOptions, WhisperEngine};
use serde_json::{Value, json};

const ANCHOR: &str = include_str!("../../../scripts/bench/resemblyzer_anchor.py");
const COLLAR: f64 = 0.25;

/// Options of `nexus bench diarize`.
#[derive(Debug, Args)]
pub struct DiarizeBenchArgs {
    /// Test data folder (`scripts/fetch-testdata.sh`).
    #[arg(long, env = "NEXUS_TESTDATA", default_value = ".cache/testdata")]
    data: PathBuf,
    /// Whisper model whose words are labelled.
    #[arg(long, default_value = "base")]
    model: String,
    /// Clustering threshold (cosine similarity), ours and the anchor's.
    #[arg(long, default_value_t = DEFAULT_THRESHOLD)]
    threshold: f32,
    /// Python with torch, librosa and scipy for the anchor; `none` skips it.
    #[arg(long, default_value = "python3")]
    anchor_python: String,
    /// Add white noise this many dB under the speech's loudness to every
    /// recording (one noise bed over all voices hides some of what tells
    /// the recordings apart); none when absent.
    #[arg(long)]
    snr_db: Option<f32>,
    /// First diarize a recording this many minutes long (the meeting set
    /// repeated) and print its time and the process's peak memory.
    #[arg(long, default_value_t = 0)]
    long_minutes: u32,
    /// Also write each recording (`NAME.wav`) and its reference (`NAME.rttm`) here.
    #[arg(long)]
    write: Option<PathBuf>,
    /// Where weights are kept.
    #[arg(long, env = "NEXUS_HOME")]
    home: Option<PathBuf>,
}

fn rttm(name: &str, segs: &[Segment]) -> String {
    segs.iter()
        .map(|s| {
            format!(
                "SPEAKER {name} 1 {:.3} {:.3} <NA> <NA> {} <NA> <NA>\n",
                s.start,
                s.end - s.start,
                s.speaker
            )
        })
        .collect()
}

fn speakers(segs: &[Segment]) -> usize {
    let mut v: Vec<&str> = segs.iter().map(|s| s.speaker.as_str()).collect();
    v.sort_unstable();
    v.dedup();
    v.len()
}

struct Row {
    name: &'static str,
    truth: usize,
    audio_s: f64,
    offline: Der,
    found: usize,
    offline_s: f64,
    words: (usize, usize),
    live: Der,
    live_found: usize,
    per_final_ms: Vec<f64>,
    anchor: Option<(Der, usize, f64)>,
}

/// Runs `nexus bench diarize`.
pub fn run(args: DiarizeBenchArgs) -> anyhow::Result<()> {
    let store = nexus_weights::Store::new(
        args.home
            .clone()
            .unwrap_or_else(nexus_weights::Store::default_root),
    );
    let cpu = candle_core::Device::Cpu;
    let d = Diarizer::load(
        &store.model_dir("ge2e"),
        &store.source_dir("silero-vad").join("model.safetensors"),
        &cpu,
    )
    .context("needs `nexus models pull ge2e silero-vad`")?;
    let opts = DiarizeOptions {
        threshold: args.threshold,
        ..DiarizeOptions::default()
    };
    if args.long_minutes > 0 {
        long_recording(&args, &d, &opts)?;
    }
    let whisper_dir = crate::transcribe::resolve_model(&args.model, args.home.clone())?;
    let whisper = WhisperEngine::load(&whisper_dir, &cpu)?;
    let out_dir = args.write.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("nexus-diarize-{}", std::process::id()))
    });
    std::fs::create_dir_all(&out_dir)?;
    let mut rows = Vec::new();
    let mut anchor_items = Vec::new();
    for m in MEETINGS {
        let mut built = meetings::build(m, |c| load(&args, c))?;
        if let Some(snr) = args.snr_db {
            add_noise(&mut built.samples, &built.reference, snr);
        }
        let samples = &built.samples;
        let wav = out_dir.join(format!("{}.wav", m.name));
        std::fs::write(
            &wav,
            nexus_audio::wav::encode_pcm16(std::slice::from_ref(samples), 16_000),
        )?;
        std::fs::write(
            out_dir.join(format!("{}.rttm", m.name)),
            rttm(m.name, &built.reference),
        )?;

        // Offline: VAD regions, windows, clustering.
        let t0 = Instant::now();
        let probs = d.vad.probabilities(samples)?;
        let regions = speech_regions(&probs, samples.len());
        let who = diarize(&d.encoder, samples, &regions, &opts)?;
        let offline_s = t0.elapsed().as_secs_f64();
        let hyp = who.segments();
        let (offline, map) = der(&built.reference, &hyp, COLLAR);

        // Words: Whisper's, labelled by the offline turns.
        let t = whisper.transcribe(
            samples,
            &TranscribeOptions {
                word_timestamps: true,
                beam_size: 1,
                ..TranscribeOptions::default()
            },
            &mut |_| {},
        )?;
        let mut words = (0usize, 0usize);
        for w in t.segments.iter().flat_map(|s| &s.words) {
            let mid = f64::from(w.start + w.end) / 2.0;
            let Some(truth) = built
                .reference
                .iter()
                .find(|r| r.start <= mid && mid < r.end)
            else {
                continue;
            };
            words.1 += 1;
            let said = who
                .speaker_at(f64::from(w.start), f64::from(w.end))
                .and_then(|s| map.get(&s.to_string()));
            if said != Some(&truth.speaker) {
                words.0 += 1;
            }
        }

        // Live: finals as the endpointer cuts them, labelled on arrival.
        let mut ep = Endpointer::new(EndpointConfig::default(), 16_000);
        let mut finals = Vec::new();
        for p in &probs {
            if let Some(EndpointEvent::Ended { start, end, .. }) = ep.push(*p) {
                finals.push(start as usize..end as usize);
            }
        }
        if let Some(EndpointEvent::Ended { start, end, .. }) = ep.finish() {
            finals.push(start as usize..end as usize);
        }
        let mut online = OnlineDiarizer::new(args.threshold, SpeakerCount::default().max);
        let mut live_hyp = Vec::new();
        let mut per_final_ms = Vec::new();
        for f in &finals {
            let t1 = Instant::now();
            // The stream so far: a final sees no later audio.
            let turns = online.label(&d.encoder, &samples[..f.end], f.clone(), 0)?;
            per_final_ms.push(t1.elapsed().as_secs_f64() * 1e3);
            // Scored over the speech (VAD regions) inside each turn.
            for t in &turns {
                let (ts, te) = ((t.start * 16_000.0) as usize, (t.end * 16_000.0) as usize);
                for r in regions.iter().filter(|r| r.start < te && r.end > ts) {
                    live_hyp.push(Segment {
                        start: r.start.max(ts) as f64 / 16_000.0,
                        end: r.end.min(te) as f64 / 16_000.0,
                        speaker: t.speaker.to_string(),
                    });
                }
            }
        }
        let (live, _) = der(&built.reference, &live_hyp, COLLAR);
        anchor_items.push(json!({
            "wav": wav,
            "regions": regions.iter().map(|r| [r.start as f64 / 16_000.0, r.end as f64 / 16_000.0]).collect::<Vec<_>>(),
            "min": 1, "max": SpeakerCount::default().max,
        }));
        rows.push(Row {
            name: m.name,
            truth: m.speakers(),
            audio_s: samples.len() as f64 / 16_000.0,
            offline,
            found: who.speakers,
            offline_s,
            words,
            live,
            live_found: speakers(&live_hyp),
            per_final_ms,
            anchor: None,
        });
    }
    if args.anchor_python != "none" {
        match run_anchor(&args, &store, &anchor_items) {
            Ok(items) => {
                for ((row, item), m) in rows.iter_mut().zip(items).zip(MEETINGS) {
                    let built_ref =
                        std::fs::read_to_string(out_dir.join(format!("{}.rttm", m.name)))?;
                    let reference = parse_rttm(&built_ref);
                    let hyp: Vec<Segment> = item["turns"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|t| Segment {
                                    start: t[0].as_f64().unwrap_or(0.0),
                                    end: t[1].as_f64().unwrap_or(0.0),
                                    speaker: t[2].to_string(),
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    let (d, _) = der(&reference, &hyp, COLLAR);
                    row.anchor = Some((d, speakers(&hyp), item["seconds"].as_f64().unwrap_or(0.0)));
                }
            }
            Err(e) => eprintln!("anchor skipped: {e:#}"),
        }
    }
    if let Some(snr) = args.snr_db {
        println!("(white noise {snr} dB under the speech over every recording)");
    }
    print(&rows, args.threshold);
    if args.write.is_none() {
        let _ = std::fs::remove_dir_all(&out_dir);
    }
    Ok(())
}

/// A clip of the set, 16 kHz mono, read as `nexus transcribe` reads files.
fn load(args: &DiarizeBenchArgs, c: &meetings::Clip) -> anyhow::Result<Vec<f32>> {
    crate::transcribe::load_audio(&args.data.join(c.path), None)
        .context("the meeting set's clips: run scripts/fetch-testdata.sh")
}

/// The meeting set repeated to `--long-minutes`, diarized offline.
fn long_recording(
    args: &DiarizeBenchArgs,
    d: &Diarizer,
    opts: &DiarizeOptions,
) -> anyhow::Result<()> {
    let mut one = Vec::new();
    for m in MEETINGS {
        one.extend(meetings::build(m, |c| load(args, c))?.samples);
    }
    let want = args.long_minutes as usize * 60 * 16_000;
    let mut samples = Vec::with_capacity(want);
    while samples.len() < want {
        let take = (want - samples.len()).min(one.len());
        samples.extend_from_slice(&one[..take]);
    }
    drop(one);
    let before = crate::bench::peak_rss_mb();
    let t0 = Instant::now();
    let probs = d.vad.probabilities(&samples)?;
    let vad_s = t0.elapsed().as_secs_f64();
    let regions = speech_regions(&probs, samples.len());
    let who = diarize(&d.encoder, &samples, &regions, opts)?;
    let total = t0.elapsed().as_secs_f64();
    println!(
        "long recording: {} min, {} speech regions, {} speakers found (the set has 9 readers), VAD {vad_s:.1} s + diarization {:.1} s = RTF {:.4}; peak RSS {:.0} MB ({:.0} MB before, the audio itself {:.0} MB)",
        args.long_minutes,
        regions.len(),
        who.speakers,
        total - vad_s,
        total / (samples.len() as f64 / 16_000.0),
        crate::bench::peak_rss_mb(),
        before,
        samples.len() as f64 * 4.0 / 1e6
    );
    Ok(())
}

/// White noise (a fixed LCG, so runs repeat) `snr_db` under the RMS of the
/// reference speech, over the whole recording.
fn add_noise(samples: &mut [f32], speech: &[Segment], snr_db: f32) {
    let (mut sum, mut n) = (0f64, 0usize);
    for s in speech {
        let (a, b) = ((s.start * 16_000.0) as usize, (s.end * 16_000.0) as usize);
        for x in &samples[a.min(samples.len())..b.min(samples.len())] {
            sum += f64::from(*x).powi(2);
            n += 1;
        }
    }
    let rms = (sum / n.max(1) as f64).sqrt() as f32;
    let level = rms * 10f32.powf(-snr_db / 20.0) * 3f32.sqrt();
    let mut state = 0x2545_f491_u32;
    for x in samples.iter_mut() {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        *x += ((state >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * level;
    }
}

fn parse_rttm(text: &str) -> Vec<Segment> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let start: f64 = f.get(3)?.parse().ok()?;
            let dur: f64 = f.get(4)?.parse().ok()?;
            Some(Segment {
                start,
                end: start + dur,
                speaker: (*f.get(7)?).to_owned(),
            })
        })
        .collect()
}

fn run_anchor(
    args: &DiarizeBenchArgs,
    store: &nexus_weights::Store,
    items: &[Value],
) -> anyhow::Result<Vec<Value>> {
    let script = std::env::temp_dir().join(format!("nexus-rz-anchor-{}.py", std::process::id()));
    std::fs::write(&script, ANCHOR)?;
    let job = json!({
        "wheel": store.packages_dir().join("Resemblyzer-0.1.4-py3-none-any.whl"),
        "weights": store.source_dir("ge2e").join("pretrained.pt"),
        "threshold": args.threshold,
        "items": items,
    });
    let mut child = Command::new(&args.anchor_python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", args.anchor_python))?;
    child
        .stdin
        .take()
        .context("anchor stdin")?
        .write_all(job.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let _ = std::fs::remove_file(&script);
    if !out.status.success() {
        bail!(
            "the anchor failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("the anchor printed no JSON")?;
    Ok(v["items"].as_array().cloned().unwrap_or_default())
}

fn print(rows: &[Row], threshold: f32) {
    println!(
        "Diarization on the meeting set (collar {COLLAR} s, threshold {threshold}); DER % = missed + false alarm + confusion"
    );
    println!(
        "{:<16} {:>5} {:>4} | {:>6} {:>5} {:>5} {:>5} {:>5} {:>7} | {:>6} {:>5} {:>9} | {:>6} {:>5} {:>7}",
        "recording",
        "audio",
        "spk",
        "DER",
        "miss",
        "FA",
        "conf",
        "found",
        "time s",
        "live",
        "found",
        "ms/final",
        "anchor",
        "found",
        "time s"
    );
    let (mut off, mut live, mut anc) = (Der::default(), Der::default(), Der::default());
    let (mut werr, mut wall) = (0, 0);
    let mut per_final: Vec<f64> = Vec::new();
    for r in rows {
        off = off + r.offline;
        live = live + r.live;
        werr += r.words.0;
        wall += r.words.1;
        per_final.extend(&r.per_final_ms);
        let pf = r.per_final_ms.iter().sum::<f64>() / r.per_final_ms.len().max(1) as f64;
        let (a, af, at) = match r.anchor {
            Some((d, f, t)) => {
                anc = anc + d;
                (
                    format!("{:.1}", 100.0 * d.rate()),
                    f.to_string(),
                    format!("{t:.2}"),
                )
            }
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<16} {:>5.1} {:>4} | {:>6.1} {:>5.2} {:>5.2} {:>5.2} {:>5} {:>7.2} | {:>6.1} {:>5} {:>9.0} | {:>6} {:>5} {:>7}",
            r.name,
            r.audio_s,
            r.truth,
            100.0 * r.offline.rate(),
            r.offline.missed,
            r.offline.false_alarm,
            r.offline.confusion,
            r.found,
            r.offline_s,
            100.0 * r.live.rate(),
            r.live_found,
            pf,
            a,
            af,
            at
        );
    }
    per_final.sort_by(f64::total_cmp);
    let p = |q: f64| {
        per_final
            .get(((per_final.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    println!(
        "all: offline DER {:.1} %, live DER {:.1} %, anchor DER {}; word speaker attribution error {:.1} % ({werr}/{wall} words); live labelling per final p50 {:.0} ms, p95 {:.0} ms ({} finals)",
        100.0 * off.rate(),
        100.0 * live.rate(),
        if rows.iter().any(|r| r.anchor.is_some()) {
            format!("{:.1} %", 100.0 * anc.rate())
        } else {
            "-".into()
        },
        100.0 * werr as f64 / wall.max(1) as f64,
        p(0.5),
        p(0.95),
        per_final.len()
    );
}
