//! `nexus-loadtest`: replays speech as N concurrent live StreamingRecognize
//! sessions at real-time pace, level after level (the scenario's `streams`),
//! with starts spread over a ramp-up, and reports per level: final-caption
//! latency after the endpoint and interim latency (p50/p95/p99), WER against
//! the clips' references, errors by gRPC code, and the model time per second
//! of audio (real-time factor) read from the services' `/metrics`. A
//! scenario with `translate_to` has every final translated (its latency then
//! includes the translation) and counts finals that came untranslated. The
//! largest level that keeps the scenario's budgets (final p95, and where set
//! interim p95 and WER against the same sessions run alone) without errors is the
//! sustainable concurrency; the first one that does not is the break.
//!
//! ```sh
//! nexus-loadtest loadtest/scenarios/live-tiny.toml --spawn serve
//! nexus-loadtest loadtest/scenarios/live-base.toml --spawn fleet --redis redis://127.0.0.1:6379
//! nexus-loadtest loadtest/scenarios/live-tiny.toml --target 10.0.0.5:50051
//! ```

mod session;
mod target;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::session::{Clip, Program};

/// A load scenario, from a TOML file.
#[derive(Debug, Clone, Deserialize, Serialize)]
struct Scenario {
    /// What the run is called in the report.
    name: String,
    /// Model the sessions ask for.
    model: String,
    /// Spoken language.
    #[serde(default = "english")]
    language: String,
    /// Folder of 16 kHz WAV clips with a `.txt` reference beside each,
    /// relative to the test-data folder (or absolute).
    speech: PathBuf,
    /// Concurrent sessions of each level, in order.
    streams: Vec<usize>,
    /// Session starts are spread over this many seconds.
    ramp_up_s: f64,
    /// Audio each session sends, seconds (whole clips, at least this long).
    duration_s: f64,
    /// Interim results every this many ms; 0 asks for finals only.
    #[serde(default)]
    interim_ms: u32,
    /// Final-caption p95 after the endpoint a level must keep, ms.
    final_budget_ms: f64,
    /// Interim p95 a level must keep, ms (when interims are asked for).
    #[serde(default)]
    interim_budget_ms: Option<f64>,
    /// WER points a level may lose against the same sessions run alone
    /// (each clip order once, by itself, before the first level that needs it).
    #[serde(default)]
    wer_margin_points: Option<f64>,
    /// Also run each level with every final translated into this language
    /// (ISO 639-1), right after the same level untranslated: final
    /// latencies then include the translation, as a translated caption
    /// reaches its viewer.
    #[serde(default)]
    translate_to: Option<String>,
    /// What a translated level's finals may take beyond `final_budget_ms`
    /// (the translation's share, ms); a translated level also misses when
    /// any final comes back untranslated. Unset, translated finals are held
    /// to the caption budget alone.
    #[serde(default)]
    translation_budget_ms: Option<f64>,
    /// Also run each level with every final diarized (its words labelled
    /// with their speaker, gRPC only), right after the same level without:
    /// what live diarization adds to a final's latency and to the load.
    #[serde(default)]
    diarize: bool,
    /// The text translation model started with `--spawn` when translating.
    #[serde(default = "default_translation_model")]
    translation_model: String,
    /// Beam width the sessions ask for (gRPC only; the Realtime protocol
    /// has no such field); unset, the fleet's default (greedy).
    #[serde(default)]
    beam_size: Option<u32>,
    /// Also run each level beside a batch transcription on the same fleet:
    /// one client sending a long recording to Recognize, file after file,
    /// for as long as the level's live sessions run. What a recorded
    /// meeting's job costs the live captions beside it.
    #[serde(default)]
    beside_batch: Option<BatchLoad>,
}

/// The batch transcription a level can run beside.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct BatchLoad {
    /// Seconds of audio per file (whole clips, at least this long).
    audio_s: f64,
    /// Beam width it asks for.
    #[serde(default = "beam_five")]
    beam_size: u32,
    /// Whether it asks for word times.
    #[serde(default = "yes")]
    word_timestamps: bool,
}

fn beam_five() -> u32 {
    5
}

fn yes() -> bool {
    true
}

fn default_translation_model() -> String {
    "qwen2.5-0.5b-instruct".into()
}

impl Scenario {
    /// The interim p95 budget, where interims are asked for.
    fn interim_budget(&self) -> Option<f64> {
        self.interim_budget_ms.filter(|_| self.interim_ms > 0)
    }

    /// What `l`'s finals may take beyond the caption budget: the
    /// translation's share where the level translated.
    fn final_allowance(&self, l: &Level) -> f64 {
        match l.translate_to {
            Some(_) => self.translation_budget_ms.unwrap_or(0.0),
            None => 0.0,
        }
    }

    /// What each session asks for, translating into `translate_to`.
    fn ask(&self, translate_to: Option<&str>, diarize: bool) -> session::Ask {
        session::Ask {
            model: self.model.clone(),
            language: self.language.clone(),
            interim_ms: self.interim_ms,
            translate_to: translate_to.map(str::to_owned),
            diarize,
            beam_size: self.beam_size,
        }
    }

    /// The runs of each level: plain, then diarized when asked.
    fn diarizations(&self) -> Vec<bool> {
        if self.diarize {
            vec![false, true]
        } else {
            vec![false]
        }
    }

    /// The runs of each level: alone, then beside the batch load when asked.
    fn batches(&self) -> Vec<bool> {
        if self.beside_batch.is_some() {
            vec![false, true]
        } else {
            vec![false]
        }
    }

    /// The runs of each level: untranslated, then translated when asked.
    fn translations(&self) -> Vec<Option<&str>> {
        let mut v = vec![None];
        v.extend(self.translate_to.as_deref().map(Some));
        v
    }

    /// The translation model to start with the target, when translating.
    fn spawned_translation(&self) -> Option<&str> {
        self.translate_to
            .as_ref()
            .map(|_| self.translation_model.as_str())
    }
}

fn grpc() -> Protocol {
    Protocol::Grpc
}

fn english() -> String {
    "en".into()
}

/// Runs a load scenario and reports what the system sustained.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The scenario file.
    scenario: PathBuf,
    /// Start what to load: `serve` (every stage in one process) or `fleet`
    /// (the three stage binaries on Redis).
    #[arg(long, conflicts_with = "target")]
    spawn: Option<String>,
    /// Or load a running ingest at this address.
    #[arg(long)]
    target: Option<SocketAddr>,
    /// The HTTP API of a `--target` (for `--protocol websocket`).
    #[arg(long)]
    http: Option<SocketAddr>,
    /// How sessions reach the fleet: `grpc` (StreamingRecognize),
    /// `websocket` (the Realtime transcription protocol), or several
    /// (`grpc,websocket`: each level runs once per protocol, one after the
    /// other, against the same processes). `whisperlive` sends the same
    /// sessions to the live anchor, a WhisperLive server (`--anchor-python`
    /// starts one; `--whisperlive` names a running one).
    #[arg(long, value_delimiter = ',', default_value = "grpc")]
    protocol: Vec<Protocol>,
    /// A Python with `whisper-live` installed, to start the WhisperLive
    /// anchor (loadtest/anchors/whisperlive.py says how to install it).
    #[arg(long, conflicts_with = "whisperlive")]
    anchor_python: Option<PathBuf>,
    /// The CTranslate2 weights the anchor serves; by default those of the
    /// scenario's model as `nexus models pull` fetched them (the files the
    /// fleet's own weights were converted from).
    #[arg(long)]
    anchor_model: Option<PathBuf>,
    /// Or a running WhisperLive server's WebSocket address.
    #[arg(long)]
    whisperlive: Option<SocketAddr>,
    /// Admin ports of a `--target` (for the real-time factor).
    #[arg(long = "admin", value_delimiter = ',')]
    admin: Vec<SocketAddr>,
    /// Redis for `--spawn fleet`.
    #[arg(long, env = "NEXUS_REDIS", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Where the speech folders are.
    #[arg(long, env = "NEXUS_TESTDATA", default_value = ".cache/testdata")]
    testdata: PathBuf,
    /// Also write the report as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Keep going after the first level that breaks the budget.
    #[arg(long)]
    all_levels: bool,
    /// Run these levels (concurrent sessions, in order) instead of the
    /// scenario's `streams`.
    #[arg(long, value_delimiter = ',')]
    streams: Vec<usize>,
}

/// Most concurrent sessions one level may open.
const MAX_STREAMS: usize = 1024;
/// Most levels one run may have.
const MAX_LEVELS: usize = 64;

/// The levels to run: `given` (from `--streams`) or else the scenario's,
/// each 1..=[`MAX_STREAMS`], at most [`MAX_LEVELS`] of them.
fn levels_of(scenario: &[usize], given: &[usize]) -> anyhow::Result<Vec<usize>> {
    let (levels, field) = if given.is_empty() {
        (scenario, "the scenario's streams")
    } else {
        (given, "--streams")
    };
    anyhow::ensure!(!levels.is_empty(), "{field} lists no stream counts");
    anyhow::ensure!(
        levels.len() <= MAX_LEVELS,
        "{field} lists {} levels; the limit is {MAX_LEVELS}",
        levels.len()
    );
    if let Some(n) = levels.iter().find(|&&n| n == 0 || n > MAX_STREAMS) {
        anyhow::bail!("{field} asks for {n} streams in a level; a level takes 1 to {MAX_STREAMS}");
    }
    Ok(levels.to_vec())
}

/// A client protocol the load is sent over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Protocol {
    Grpc,
    Websocket,
    /// The live anchor: WhisperLive over its own WebSocket protocol.
    Whisperlive,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::Websocket => "websocket",
            Protocol::Whisperlive => "whisperlive",
        }
    }
}

/// The fleet's default endpointer silence (`endpointing.stop_history_ms`):
/// how long after speech ends a session's final can start. WhisperLive has
/// no endpoint event; its finals are timed from the end of the audio, so
/// its final budget is the scenario's plus this wait, the same allowance
/// the fleet's finals get before their clock starts.
const ENDPOINT_SILENCE_MS: f64 = 800.0;

/// Percentiles of a latency sample, ms.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Latency {
    n: usize,
    p50: f64,
    p95: f64,
    p99: f64,
}

impl Latency {
    fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
        Self {
            n: v.len(),
            p50: at(0.5),
            p95: at(0.95),
            p99: at(0.99),
        }
    }
}

/// One level of the report.
#[derive(Debug, Serialize, Deserialize)]
struct Level {
    /// The protocol the sessions spoke.
    #[serde(default = "grpc")]
    protocol: Protocol,
    /// The language finals were translated into, when they were.
    #[serde(default)]
    translate_to: Option<String>,
    /// Whether finals were diarized.
    #[serde(default)]
    diarized: bool,
    /// What the batch transcription beside the level did, when one ran.
    #[serde(default)]
    batch: Option<session::BatchOutcome>,
    streams: usize,
    final_after_endpoint_ms: Latency,
    /// From the capture of the utterance's last sample to its final: the
    /// same clock on every protocol.
    #[serde(default)]
    final_after_audio_ms: Latency,
    interim_ms: Latency,
    /// Interims received per second of audio sent, over every stream: 1 at
    /// an interim interval of 1 s when none is skipped; less when the fleet
    /// sheds interims under load.
    #[serde(default)]
    interims_per_s: f64,
    wer: f64,
    /// The WER of the same sessions (the same clips in the same order)
    /// each run alone: what the level's WER is held to.
    #[serde(default)]
    alone_wer: Option<f64>,
    /// Finals that asked for a translation and came without one (marked
    /// untranslated, or none at all).
    #[serde(default)]
    untranslated: usize,
    audio_s: f64,
    /// Encoder and decoder model seconds per second of audio (when readable).
    rtf_encoder: Option<f64>,
    rtf_decoder: Option<f64>,
    errors: std::collections::BTreeMap<String, usize>,
    within_budget: bool,
    /// Why the level is not within budget (errors, then each budget missed).
    #[serde(default)]
    missed: Vec<String>,
    /// Each session's finals beside what it played, for reading where the
    /// WER goes.
    #[serde(default)]
    sessions: Vec<SessionText>,
}

/// What one session played and the finals it got back.
#[derive(Debug, Serialize, Deserialize)]
struct SessionText {
    /// The session's place in the level (it starts at clip `index`).
    index: usize,
    reference: String,
    hypothesis: String,
    /// Word errors of the hypothesis against the reference.
    errors: usize,
    /// Each final's time from the capture of its utterance's last sample,
    /// ms, in the order the finals came: where in a session the slow ones sit.
    #[serde(default)]
    final_after_audio_ms: Vec<f64>,
}

/// The whole report.
#[derive(Debug, Serialize, Deserialize)]
struct Report {
    scenario: String,
    model: String,
    target: String,
    final_budget_ms: f64,
    interim_budget_ms: Option<f64>,
    wer_margin_points: Option<f64>,
    levels: Vec<Level>,
    /// Most concurrent streams that kept the budget without errors (over
    /// the first protocol asked for).
    sustainable_streams: usize,
    /// The first level that did not, and why.
    breaks_at: Option<String>,
    /// The same, per protocol.
    #[serde(default)]
    by_protocol: Vec<Capacity>,
}

/// What one protocol sustained (translating, or not).
#[derive(Debug, Serialize, Deserialize)]
struct Capacity {
    protocol: Protocol,
    #[serde(default)]
    translate_to: Option<String>,
    #[serde(default)]
    diarized: bool,
    #[serde(default)]
    beside_batch: bool,
    sustainable_streams: usize,
    breaks_at: Option<String>,
}

fn load_clips(dir: &std::path::Path) -> anyhow::Result<Vec<Clip>> {
    let mut wavs: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "wav"))
        .collect();
    wavs.sort();
    let mut clips = Vec::new();
    for w in wavs {
        let txt = w.with_extension("txt");
        let Ok(text) = std::fs::read_to_string(&txt) else {
            continue;
        };
        let audio = nexus_audio::decode_bytes(std::fs::read(&w)?, Some("wav"), &Default::default())
            .with_context(|| format!("decoding {}", w.display()))?;
        let samples = nexus_audio::to_model_rate(&audio.channels, audio.sample_rate)
            .with_context(|| format!("resampling {}", w.display()))?;
        clips.push(Clip {
            samples,
            text: text.trim().to_owned(),
        });
    }
    anyhow::ensure!(
        !clips.is_empty(),
        "no WAV clip with a .txt reference in {}",
        dir.display()
    );
    Ok(clips)
}

/// Starts `n` sessions asking `ask`, session `i` from clip `i` on for
/// `seconds` of audio (one clip at least), their starts spread over the
/// scenario's ramp-up; each task yields its index and outcome.
fn start_sessions(
    to: session::Endpoint,
    s: &Scenario,
    clips: &[Clip],
    n: usize,
    seconds: f64,
    ask: session::Ask,
) -> tokio::task::JoinSet<(usize, session::Outcome)> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let program = Program::new(clips, i, seconds);
        let lead = Duration::from_secs_f64(s.ramp_up_s * i as f64 / n as f64);
        let ask = ask.clone();
        tasks.spawn(async move { (i, session::run(to, ask, program, lead).await) });
    }
    tasks
}

/// Waits until the target transcribes a short clip, then runs `streams`
/// sessions of one clip each at once, as the scenario asks them (interims
/// included), and drops what they measure: the first level then meets a
/// target that has already served that many sessions together (its
/// batches, buffers and threads grown), as every later level does.
async fn warm_up(
    to: session::Endpoint,
    s: &Scenario,
    clips: &[Clip],
    streams: usize,
) -> anyhow::Result<()> {
    ready(to, s, &clips[0]).await?;
    let mut tasks = start_sessions(to, s, clips, streams, 0.0, s.ask(None, false));
    let mut failed = 0;
    while let Some(r) = tasks.join_next().await {
        if !r.is_ok_and(|(_, o)| o.error.is_none()) {
            failed += 1;
        }
    }
    println!("# warm-up: {streams} sessions of one clip at once, {failed} failed (not measured)");
    Ok(())
}

/// Waits until the target transcribes a short clip.
async fn ready(to: session::Endpoint, s: &Scenario, clip: &Clip) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let short = Clip {
        samples: clip.samples[..clip.samples.len().min(4 * 16_000)].to_vec(),
        text: String::new(),
    };
    loop {
        let p = Program::new(std::slice::from_ref(&short), 0, 0.0);
        let ask = session::Ask {
            interim_ms: 0,
            ..s.ask(None, false)
        };
        let o = session::run(to, ask, p, Duration::ZERO).await;
        if o.error.is_none() && !o.final_ms.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the target did not come up: {}",
            o.error
                .unwrap_or_else(|| "it answered but gave no final caption".into())
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One run of a level: how its sessions reach the fleet and what they ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Variant<'a> {
    protocol: Protocol,
    translate_to: Option<&'a str>,
    diarize: bool,
    /// Beside the scenario's batch transcription.
    batch: bool,
}

impl Variant<'_> {
    /// What a session of this variant asks, whatever runs beside it: the
    /// key of its sessions' runs alone.
    fn asks(&self) -> Asks {
        (
            self.protocol,
            self.translate_to.map(str::to_owned),
            self.diarize,
        )
    }

    /// Whether `l` is a level of this variant.
    fn made(&self, l: &Level) -> bool {
        l.protocol == self.protocol
            && l.translate_to.as_deref() == self.translate_to
            && l.diarized == self.diarize
            && l.batch.is_some() == self.batch
    }
}

/// What a session asks: protocol, translation target, diarization.
type Asks = (Protocol, Option<String>, bool);

/// Word errors of sessions run alone, by what they ask and the clip they
/// start at (session `i` of a level starts at clip `i`): the baseline of
/// the WER rule. A level of n streams plays n clip orders, and the words a
/// session gets wrong depend on its order (what precedes each clip), so
/// comparing it with the first level's single session would charge load
/// for what the order did.
#[derive(Debug, Default)]
struct Alone(Vec<(Asks, usize, nexus_eval::ErrorCounts)>);

impl Alone {
    fn get(&self, asks: &Asks, start: usize) -> Option<nexus_eval::ErrorCounts> {
        self.0
            .iter()
            .find(|(a, s, _)| a == asks && *s == start)
            .map(|(_, _, c)| *c)
    }

    fn insert(&mut self, asks: Asks, start: usize, counts: nexus_eval::ErrorCounts) {
        if self.get(&asks, start).is_none() {
            self.0.push((asks, start, counts));
        }
    }

    /// The WER of a level's `n` sessions each run alone; None while one of
    /// their clip orders has not been run alone.
    fn wer(&self, asks: &Asks, n: usize, clips: usize) -> Option<f64> {
        let mut total = nexus_eval::ErrorCounts::default();
        for i in 0..n {
            total = total + self.get(asks, i % clips.max(1))?;
        }
        Some(total.rate())
    }
}

#[allow(clippy::too_many_arguments)]
async fn level(
    to: session::Endpoint,
    grpc_addr: SocketAddr,
    v: Variant<'_>,
    admin: &[SocketAddr],
    s: &Scenario,
    clips: &[Clip],
    n: usize,
    alone_wer: Option<f64>,
) -> Level {
    let Variant {
        protocol,
        translate_to,
        diarize,
        batch,
    } = v;
    let before = target::model_seconds(admin).await;
    // The batch client starts first and runs until every session is done.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let batch = match (&s.beside_batch, batch) {
        (Some(load), true) => {
            let program = Program::new(clips, 0, load.audio_s);
            let job = session::BatchJob {
                model: s.model.clone(),
                language: s.language.clone(),
                beam_size: load.beam_size,
                word_timestamps: load.word_timestamps,
            };
            Some(tokio::spawn(session::batch(
                grpc_addr, job, program, stopped,
            )))
        }
        _ => None,
    };
    let mut tasks = start_sessions(to, s, clips, n, s.duration_s, s.ask(translate_to, diarize));
    let (mut finals, mut interims, mut errors) =
        (Vec::new(), Vec::new(), std::collections::BTreeMap::new());
    let mut wer = nexus_eval::ErrorCounts::default();
    let mut audio_s = 0.0;
    let mut untranslated = 0;
    let mut after_audio = Vec::new();
    let mut sessions = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (index, o) = match r {
            Ok(o) => o,
            Err(e) => {
                *errors.entry(format!("task: {e}")).or_insert(0) += 1;
                continue;
            }
        };
        audio_s += o.audio_s;
        if let Some(code) = o.error {
            *errors.entry(code).or_insert(0) += 1;
            continue;
        }
        untranslated += o.untranslated;
        finals.extend(o.final_ms);
        after_audio.extend(o.final_after_audio_ms.iter().copied());
        interims.extend(o.interim_ms);
        let counts = nexus_eval::wer(&o.reference, &o.hypothesis);
        wer = wer + counts;
        sessions.push(SessionText {
            index,
            errors: counts.errors,
            reference: o.reference,
            hypothesis: o.hypothesis,
            final_after_audio_ms: o.final_after_audio_ms,
        });
    }
    sessions.sort_by_key(|t| t.index);
    let _ = stop.send(true);
    let batch = match batch {
        Some(t) => match t.await {
            Ok(b) => Some(b),
            Err(e) => {
                *errors.entry(format!("batch task: {e}")).or_insert(0) += 1;
                None
            }
        },
        None => None,
    };
    if let Some(b) = &batch {
        for (code, k) in &b.errors {
            *errors.entry(format!("batch {code}")).or_insert(0) += k;
        }
    }
    let after = target::model_seconds(admin).await;
    let rate = |a: f64, b: f64| (!admin.is_empty() && audio_s > 0.0).then(|| (b - a) / audio_s);
    let interims_per_s = if audio_s > 0.0 {
        interims.len() as f64 / audio_s
    } else {
        0.0
    };
    let final_lat = Latency::of(finals);
    let mut l = Level {
        protocol,
        translate_to: translate_to.map(str::to_owned),
        diarized: diarize,
        batch,
        streams: n,
        final_after_endpoint_ms: final_lat,
        final_after_audio_ms: Latency::of(after_audio),
        interim_ms: Latency::of(interims),
        interims_per_s,
        wer: wer.rate(),
        alone_wer,
        untranslated,
        audio_s,
        rtf_encoder: rate(before.0, after.0),
        rtf_decoder: rate(before.1, after.1),
        errors,
        within_budget: false,
        missed: Vec::new(),
        sessions,
    };
    l.missed = missed(&l, s, alone_wer.unwrap_or(l.wer));
    l.within_budget = l.missed.is_empty();
    l
}

/// What `l` missed of the scenario's budgets; WER against `alone_wer`, the
/// same sessions' WER when each ran alone (its own for a single stream).
/// Empty when the level is sustainable.
fn missed(l: &Level, s: &Scenario, alone_wer: f64) -> Vec<String> {
    let mut out = Vec::new();
    if !l.errors.is_empty() {
        out.push(format!("errors {:?}", l.errors));
    }
    let (f, budget) = match l.protocol {
        Protocol::Whisperlive => (
            &l.final_after_audio_ms,
            s.final_budget_ms + ENDPOINT_SILENCE_MS,
        ),
        Protocol::Grpc | Protocol::Websocket => (&l.final_after_endpoint_ms, s.final_budget_ms),
    };
    let budget = budget + s.final_allowance(l);
    if l.translate_to.is_some() && s.translation_budget_ms.is_some() && l.untranslated > 0 {
        out.push(format!("{} finals untranslated", l.untranslated));
    }
    if f.n == 0 {
        out.push("no final caption".to_owned());
    } else if f.p95 > budget {
        out.push(format!("final p95 {:.0} ms > {budget:.0} ms", f.p95));
    }
    if let Some(budget) = s.interim_budget() {
        let i = &l.interim_ms;
        if i.n == 0 {
            out.push("no interim result".to_owned());
        } else if i.p95 > budget {
            out.push(format!("interim p95 {:.0} ms > {budget:.0} ms", i.p95));
        }
    }
    if let Some(margin) = s.wer_margin_points
        && l.wer * 100.0 > alone_wer * 100.0 + margin + 1e-9
    {
        out.push(format!(
            "WER {:.1} % > {:.1} % alone + {margin} points",
            l.wer * 100.0,
            alone_wer * 100.0
        ));
    }
    out
}

/// Each level's runs: once per protocol, per translation, per diarization
/// and alone or beside the batch load, one after the other (the Realtime
/// protocol takes no diarization; the WhisperLive anchor runs plain
/// captions only).
fn variants<'a>(protocols: &[Protocol], s: &'a Scenario) -> Vec<Variant<'a>> {
    let mut out = Vec::new();
    for &protocol in protocols {
        for translate_to in s.translations() {
            // The anchor runs the plain caption load only.
            if translate_to.is_some() && protocol == Protocol::Whisperlive {
                continue;
            }
            for diarize in s.diarizations() {
                if diarize && protocol != Protocol::Grpc {
                    continue;
                }
                for batch in s.batches() {
                    if batch && protocol == Protocol::Whisperlive {
                        continue;
                    }
                    out.push(Variant {
                        protocol,
                        translate_to,
                        diarize,
                        batch,
                    });
                }
            }
        }
    }
    out
}

fn print_level(l: &Level) {
    let f = &l.final_after_endpoint_ms;
    let i = &l.interim_ms;
    let rtf = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.3}"));
    println!(
        "{:>7} | {:>12} | {:>6.0} {:>6.0} {:>6.0} | {:>6.0} {:>6.0} {:>6.0} | {:>5.2} | {:>5.1}% | {:>6} | {:>5} | {:>6} {:>6} | {:>5} | {}",
        l.streams,
        format!(
            "{}{}{}{}",
            l.protocol.name(),
            l.translate_to
                .as_deref()
                .map(|t| format!("+{t}"))
                .unwrap_or_default(),
            if l.diarized { "+spk" } else { "" },
            if l.batch.is_some() { "+batch" } else { "" },
        ),
        f.p50,
        f.p95,
        f.p99,
        i.p50,
        i.p95,
        i.p99,
        l.interims_per_s,
        l.wer * 100.0,
        l.alone_wer
            .map_or("-".to_owned(), |w| format!("{:.1}%", w * 100.0)),
        l.untranslated,
        rtf(l.rtf_encoder),
        rtf(l.rtf_decoder),
        if l.within_budget { "yes" } else { "NO" },
        if l.errors.is_empty() {
            "-".to_owned()
        } else {
            format!("{:?}", l.errors)
        }
    );
    if let Some(b) = &l.batch {
        println!(
            "{:>7} | {:>12} | {} files of {:.0} s done beside it, {:.3} s per audio s (p50 of files)",
            "", "batch", b.files, b.file_audio_s, b.seconds_per_audio_s
        );
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let text = std::fs::read_to_string(&cli.scenario)
        .with_context(|| format!("reading {}", cli.scenario.display()))?;
    let mut s: Scenario =
        toml::from_str(&text).with_context(|| format!("scenario {}", cli.scenario.display()))?;
    s.streams = levels_of(&s.streams, &cli.streams)?;
    let dir = if s.speech.is_absolute() {
        s.speech.clone()
    } else {
        cli.testdata.join(&s.speech)
    };
    let clips = load_clips(&dir)?;
    let (target, label) = match (&cli.spawn, cli.target) {
        (Some(kind), None) if kind == "serve" => (
            target::embedded(&s.model, s.spawned_translation())?,
            "nexus serve (embedded)".to_owned(),
        ),
        (Some(kind), None) if kind == "fleet" => (
            target::fleet(&s.model, s.spawned_translation(), &cli.redis)?,
            "three processes on Redis".to_owned(),
        ),
        (Some(kind), _) => anyhow::bail!("--spawn {kind:?}: use serve or fleet"),
        (None, Some(addr)) => (
            target::external(addr, cli.http, cli.admin.clone()),
            addr.to_string(),
        ),
        (None, None) => anyhow::bail!("give --spawn serve|fleet or --target ADDR"),
    };
    let mut protocols = cli.protocol.clone();
    protocols.dedup();
    let anchor = match (&cli.anchor_python, cli.whisperlive) {
        _ if !protocols.contains(&Protocol::Whisperlive) => None,
        (Some(python), None) => {
            let model = match cli.anchor_model.clone() {
                Some(m) => m,
                // The pulled model's source folder: the CTranslate2 files.
                None => nexus_weights::resolve::resolve_model(&s.model, None)
                    .with_context(|| format!("the anchor's weights for {}", s.model))?
                    .join("source"),
            };
            Some(target::whisperlive(python, &model, &s.streams)?)
        }
        (None, Some(addr)) => Some(target::external(addr, None, Vec::new())),
        _ => anyhow::bail!(
            "--protocol whisperlive needs --anchor-python PY (to start WhisperLive) or --whisperlive ADDR"
        ),
    };
    let endpoint = |p: Protocol| -> anyhow::Result<session::Endpoint> {
        Ok(match p {
            Protocol::Grpc => session::Endpoint::Grpc(target.addr),
            Protocol::Websocket => session::Endpoint::WebSocket(
                target
                    .http
                    .context("--protocol websocket needs the HTTP API: give --http ADDR")?,
            ),
            Protocol::Whisperlive => session::Endpoint::WhisperLive(
                anchor
                    .as_ref()
                    .context("--protocol whisperlive needs the anchor")?
                    .addr,
            ),
        })
    };
    for &p in &protocols {
        warm_up(endpoint(p)?, &s, &clips, s.streams[0].min(64)).await?;
    }
    let mut budgets = format!("final p95 {} ms", s.final_budget_ms);
    if let Some(b) = s.interim_budget() {
        budgets += &format!(", interim p95 {b} ms");
    }
    if let Some(m) = s.wer_margin_points {
        budgets += &format!(", WER within {m} points of the same sessions run alone");
    }
    if let (Some(to), Some(t)) = (&s.translate_to, s.translation_budget_ms) {
        budgets += &format!(
            ", translated into {to}: final p95 {} ms and every final translated",
            s.final_budget_ms + t
        );
    }
    let translating = s
        .translate_to
        .as_ref()
        .map(|t| format!(", finals translated into {t} by {}", s.translation_model))
        .unwrap_or_default();
    println!(
        "# {} — model {}{translating}, {label}, {} s per session, ramp-up {} s, budget: {budgets}",
        s.name, s.model, s.duration_s, s.ramp_up_s
    );
    println!(
        "{:>7} | {:>12} | {:>20} | {:>20} | {:>5} | {:>6} | {:>6} | {:>5} | {:>13} | {:>5} | errors",
        "streams",
        "protocol",
        "final p50/p95/p99 ms",
        "interim p50/p95/p99",
        "int/s",
        "WER",
        "alone",
        "untr.",
        "RTF enc/dec",
        "ok"
    );
    let variants = variants(&protocols, &s);
    let mut levels: Vec<Level> = Vec::new();
    let mut broken: Vec<Option<String>> = vec![None; variants.len()];
    let mut alone = Alone::default();
    'levels: for &n in &s.streams {
        for (k, v) in variants.iter().enumerate() {
            // The clip orders of this level not yet heard alone, each now
            // in a session of its own (a single-stream level is its own).
            let orders = n.min(clips.len());
            if s.wer_margin_points.is_some() && n > 1 {
                let missing: Vec<usize> = (0..orders)
                    .filter(|&i| alone.get(&v.asks(), i).is_none())
                    .collect();
                for start in missing {
                    let o = session::run(
                        endpoint(v.protocol)?,
                        s.ask(v.translate_to, v.diarize),
                        Program::new(&clips, start, s.duration_s),
                        Duration::ZERO,
                    )
                    .await;
                    match o.error {
                        None => {
                            let c = nexus_eval::wer(&o.reference, &o.hypothesis);
                            println!(
                                "{:>7} | {:>12} | alone, from clip {start}: WER {:.1}%",
                                1,
                                v.protocol.name(),
                                c.rate() * 100.0
                            );
                            alone.insert(v.asks(), start, c);
                        }
                        Some(e) => println!(
                            "{:>7} | {:>12} | alone, from clip {start}: failed ({e}); the WER rule falls back to the first level's",
                            1,
                            v.protocol.name()
                        ),
                    }
                }
            }
            let alone_wer = alone
                .wer(&v.asks(), n, clips.len())
                .or_else(|| levels.iter().find(|l| v.made(l)).map(|f| f.wer));
            // The fleet's model time says nothing of the anchor's load.
            let admin: &[SocketAddr] = if v.protocol == Protocol::Whisperlive {
                &[]
            } else {
                &target.admin
            };
            let l = level(
                endpoint(v.protocol)?,
                target.addr,
                *v,
                admin,
                &s,
                &clips,
                n,
                alone_wer,
            )
            .await;
            // A single stream is its own run alone, unless a batch ran beside it.
            if n == 1
                && !v.batch
                && l.errors.is_empty()
                && let Some(t) = l.sessions.first()
            {
                alone.insert(v.asks(), 0, nexus_eval::wer(&t.reference, &t.hypothesis));
            }
            print_level(&l);
            let ok = l.within_budget;
            if !ok && broken[k].is_none() {
                broken[k] = Some(format!("{n} streams: {}", l.missed.join("; ")));
            }
            levels.push(l);
            if !ok && !cli.all_levels {
                break 'levels;
            }
        }
    }
    let by_protocol: Vec<Capacity> = variants
        .iter()
        .zip(&broken)
        .map(|(v, breaks_at)| Capacity {
            protocol: v.protocol,
            translate_to: v.translate_to.map(str::to_owned),
            diarized: v.diarize,
            beside_batch: v.batch,
            sustainable_streams: levels
                .iter()
                .filter(|l| v.made(l))
                .take_while(|l| l.within_budget)
                .map(|l| l.streams)
                .last()
                .unwrap_or(0),
            breaks_at: breaks_at.clone(),
        })
        .collect();
    for c in &by_protocol {
        let translated = c
            .translate_to
            .as_ref()
            .map(|t| format!(", translated into {t}"))
            .unwrap_or_default()
            + if c.diarized { ", diarized" } else { "" }
            + if c.beside_batch {
                ", beside the batch transcription"
            } else {
                ""
            };
        println!(
            "sustainable: {} concurrent streams over {}{translated}; breaks at: {}",
            c.sustainable_streams,
            c.protocol.name(),
            c.breaks_at.as_deref().unwrap_or("not reached")
        );
    }
    let sustainable = by_protocol.first().map_or(0, |c| c.sustainable_streams);
    let breaks_at = by_protocol.first().and_then(|c| c.breaks_at.clone());
    let report = Report {
        scenario: s.name.clone(),
        model: s.model.clone(),
        target: label,
        final_budget_ms: s.final_budget_ms,
        interim_budget_ms: s.interim_budget_ms,
        wer_margin_points: s.wer_margin_points,
        levels,
        sustainable_streams: sustainable,
        breaks_at,
        by_protocol,
    };
    if let Some(path) = &cli.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    drop(anchor);
    drop(target);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(final_p95: f64, interim_p95: f64, wer: f64) -> Level {
        serde_json::from_value(serde_json::json!({
            "streams": 4,
            "final_after_endpoint_ms": {"n": 10, "p50": 100.0, "p95": final_p95, "p99": final_p95},
            "interim_ms": {"n": 20, "p50": 100.0, "p95": interim_p95, "p99": interim_p95},
            "wer": wer,
            "audio_s": 120.0,
            "rtf_encoder": null,
            "rtf_decoder": null,
            "errors": {},
            "within_budget": false,
        }))
        .unwrap()
    }

    #[test]
    fn a_level_misses_each_budget_by_name() {
        let s: Scenario = toml::from_str(
            r#"
            name = "t"
            model = "tiny.en"
            speech = "librivox"
            streams = [1, 4]
            ramp_up_s = 1.0
            duration_s = 10.0
            interim_ms = 1000
            final_budget_ms = 1000.0
            interim_budget_ms = 800.0
            wer_margin_points = 1.0
            "#,
        )
        .unwrap();
        assert!(missed(&level(900.0, 700.0, 0.060), &s, 0.055).is_empty());
        let m = missed(&level(1100.0, 900.0, 0.070), &s, 0.055);
        assert_eq!(m.len(), 3, "{m:?}");
        assert!(m[0].starts_with("final p95 1100 ms"), "{m:?}");
        assert!(m[1].starts_with("interim p95 900 ms"), "{m:?}");
        assert!(m[2].starts_with("WER 7.0 % > 5.5 %"), "{m:?}");
        // Without the optional budgets only the final latency counts.
        let plain = Scenario {
            interim_budget_ms: None,
            wer_margin_points: None,
            ..s
        };
        assert_eq!(
            missed(&level(900.0, 5000.0, 0.5), &plain, 0.055),
            Vec::<String>::new()
        );
    }

    #[test]
    fn levels_come_from_the_command_line_or_the_scenario_within_bounds() {
        assert_eq!(levels_of(&[1, 2, 4], &[]).unwrap(), [1, 2, 4]);
        assert_eq!(levels_of(&[1, 2, 4], &[16, 20]).unwrap(), [16, 20]);
        let e = levels_of(&[], &[]).unwrap_err().to_string();
        assert!(e.contains("the scenario's streams lists no"), "{e}");
        let e = levels_of(&[1], &[4, 0]).unwrap_err().to_string();
        assert!(e.contains("--streams asks for 0 streams"), "{e}");
        let e = levels_of(&[1_000_000], &[]).unwrap_err().to_string();
        assert!(e.contains("1000000 streams") && e.contains("1024"), "{e}");
        let e = levels_of(&[1], &[1; 65]).unwrap_err().to_string();
        assert!(e.contains("65 levels; the limit is 64"), "{e}");
    }

    #[test]
    fn a_level_is_held_to_its_own_sessions_run_alone() {
        let asks: Asks = (Protocol::Grpc, None, false);
        let counts = |errors, reference_len| nexus_eval::ErrorCounts {
            errors,
            reference_len,
        };
        let mut alone = Alone::default();
        alone.insert(asks.clone(), 0, counts(1, 70));
        alone.insert(asks.clone(), 1, counts(3, 70));
        // The first count of an order stands.
        alone.insert(asks.clone(), 1, counts(9, 70));
        assert_eq!(alone.wer(&asks, 1, 5), Some(1.0 / 70.0));
        assert_eq!(alone.wer(&asks, 2, 5), Some(4.0 / 140.0));
        // Three sessions over two clips: orders 0, 1, 0.
        assert_eq!(alone.wer(&asks, 3, 2), Some(5.0 / 210.0));
        // An order not yet heard alone, or other asks: no baseline.
        assert_eq!(alone.wer(&asks, 3, 5), None);
        assert_eq!(alone.wer(&(Protocol::Websocket, None, false), 1, 5), None);
    }

    /// A one-level scenario of tiny.en with a 1 s final budget, plus `extra`
    /// TOML lines.
    fn scenario(extra: &str) -> Result<Scenario, toml::de::Error> {
        toml::from_str(&format!(
            "name = \"t\"\nmodel = \"tiny.en\"\nspeech = \"librivox\"\nstreams = [1]\n\
             ramp_up_s = 1.0\nduration_s = 10.0\nfinal_budget_ms = 1000.0\n{extra}"
        ))
    }

    /// WhisperLive has no endpoint: its finals are held to the budget from
    /// the end of the audio, plus the endpointer's silence the fleet's
    /// finals get before their clock starts.
    #[test]
    fn the_anchor_is_held_to_the_budget_from_the_end_of_its_audio() {
        let s = scenario("").unwrap();
        let anchor = |after_audio: f64| {
            let mut l = level(5000.0, 0.0, 0.05);
            l.protocol = Protocol::Whisperlive;
            l.final_after_audio_ms = Latency {
                n: 10,
                p50: 100.0,
                p95: after_audio,
                p99: after_audio,
            };
            l
        };
        assert!(missed(&anchor(1_700.0), &s, 0.05).is_empty());
        let m = missed(&anchor(1_900.0), &s, 0.05);
        assert_eq!(m, ["final p95 1900 ms > 1800 ms"]);
        // The fleet's own protocols keep the budget after the endpoint.
        assert!(!missed(&level(1_100.0, 0.0, 0.05), &s, 0.05).is_empty());
    }

    /// A translated level keeps the caption budget plus the translation's
    /// allowance, and misses when any final came back untranslated; the
    /// untranslated level of the same scenario keeps the caption budget.
    #[test]
    fn a_translated_level_has_the_translations_allowance_and_no_untranslated_final() {
        let s = scenario("translate_to = \"de\"\ntranslation_budget_ms = 1500.0").unwrap();
        let translated = |p95: f64, untranslated: usize| {
            let mut l = level(p95, 0.0, 0.05);
            l.translate_to = Some("de".into());
            l.untranslated = untranslated;
            l
        };
        assert!(missed(&translated(2_400.0, 0), &s, 0.05).is_empty());
        assert_eq!(
            missed(&translated(2_600.0, 0), &s, 0.05),
            ["final p95 2600 ms > 2500 ms"]
        );
        assert_eq!(
            missed(&translated(2_400.0, 3), &s, 0.05),
            ["3 finals untranslated"]
        );
        assert_eq!(
            missed(&level(1_100.0, 0.0, 0.05), &s, 0.05),
            ["final p95 1100 ms > 1000 ms"]
        );
        // Without the allowance, translated finals keep the caption budget.
        let plain = scenario("translate_to = \"de\"").unwrap();
        assert_eq!(
            missed(&translated(1_100.0, 3), &plain, 0.05),
            ["final p95 1100 ms > 1000 ms"]
        );
    }

    #[test]
    fn diarized_runs_follow_each_grpc_run() {
        let s = scenario("translate_to = \"de\"\ndiarize = true").unwrap();
        let v: Vec<_> = variants(&[Protocol::Grpc, Protocol::Websocket], &s)
            .into_iter()
            .map(|v| (v.protocol, v.translate_to, v.diarize, v.batch))
            .collect();
        assert_eq!(
            v,
            vec![
                (Protocol::Grpc, None, false, false),
                (Protocol::Grpc, None, true, false),
                (Protocol::Grpc, Some("de"), false, false),
                (Protocol::Grpc, Some("de"), true, false),
                (Protocol::Websocket, None, false, false),
                (Protocol::Websocket, Some("de"), false, false),
            ]
        );
        let plain = Scenario {
            diarize: false,
            ..s
        };
        assert_eq!(variants(&[Protocol::Grpc], &plain).len(), 2);
    }

    #[test]
    fn each_level_runs_alone_then_beside_the_batch() {
        let s = scenario("beside_batch = { audio_s = 120.0 }").unwrap();
        let b = s.beside_batch.as_ref().unwrap();
        assert_eq!((b.beam_size, b.word_timestamps), (5, true));
        let v: Vec<bool> = variants(&[Protocol::Grpc], &s)
            .iter()
            .map(|v| v.batch)
            .collect();
        assert_eq!(v, [false, true]);
        // A misspelt field of the batch load is refused, not ignored.
        let bad = scenario("beside_batch = { audio_s = 120.0, beam = 5 }");
        assert!(bad.is_err());
    }
}
