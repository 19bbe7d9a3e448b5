//! The encoder stage.
//!
//! Reads segmented audio from the `audio` stream, drops interim windows that a
//! newer window of the same utterance already supersedes (or that waited too
//! long to still be useful), computes log-mel features and runs the Whisper
//! encoder over the rest in batches (up to a budget of mel frames), and writes
//! the features to the `encoded` stream. An entry is acknowledged only after its
//! features are written, so a crash hands it to another replica.
//!
//! Work is served by what waits on it ([`Work`]): live finals first, all of
//! them; then one turn of interim windows; then one turn of a recording's
//! windows (Recognize, uploads, jobs), before the stream is read again. A
//! live caption so waits behind at most one turn of each, however long the
//! recordings in the queue.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use candle_core::{IndexOp, Tensor};
use nexus_bus::{Bus, BusError, Entry, EntryId, decode, encode};
use nexus_core::grpc::GrpcServer;
use nexus_fleet::stages::Work;
use nexus_fleet::{Fleet, ModelSet, Process, StageReader, now_unix_ms, retry, stages};
use nexus_models::mel::{CHUNK_FRAMES, CHUNK_SAMPLES, HOP_LENGTH, N_FFT, SAMPLE_RATE};
use nexus_proto::pipeline::{AudioSegment, DType, EncodedSegment, Envelope};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Settings of the encoder stage.
#[derive(Debug, Clone, clap::Args)]
pub struct EncoderArgs {
    /// Mel frames one batch may hold (a 30 s window is 3000).
    #[arg(long, env = "NEXUS_ENCODER_FRAME_BUDGET", default_value_t = 12_000)]
    pub frame_budget: usize,
    /// Mel frames of interim windows encoded before the stream is read again
    /// for finals: the most encoding a final can wait behind (one window is
    /// always taken, whatever its length).
    #[arg(
        long,
        env = "NEXUS_ENCODER_INTERIM_FRAME_BUDGET",
        default_value_t = 2_000
    )]
    pub interim_frame_budget: usize,
    /// Mel frames of a recording's windows (Recognize, uploads, jobs: no
    /// one waits on them live) encoded before the stream is read again for
    /// live work: the most encoding a live caption can wait behind a
    /// recording (one window is always taken, whatever its length).
    #[arg(
        long,
        env = "NEXUS_ENCODER_RECORDING_FRAME_BUDGET",
        default_value_t = 3_000
    )]
    pub recording_frame_budget: usize,
    /// Share of the encoder's time interim windows may take (0.05..=1). When
    /// they have used it, interims are skipped until time has accrued again:
    /// under load each stream gets fewer interims, and finals keep the rest.
    #[arg(long, env = "NEXUS_ENCODER_INTERIM_SHARE", default_value_t = 0.5, value_parser = parse_share)]
    pub interim_share: f64,
    /// Encode interim windows over the full 30 s. By default a window is
    /// encoded over its audio plus [`WINDOW_MARGIN_MS`] only (a 5 s utterance
    /// costs a fifth of a full window).
    #[arg(long, env = "NEXUS_ENCODER_INTERIM_FULL_WINDOW")]
    pub interim_full_window: bool,
    /// Encode final windows over the full 30 s, as Whisper was trained, instead
    /// of their audio plus [`WINDOW_MARGIN_MS`] (BENCHMARKS.md has the
    /// accuracy and speed of both).
    #[arg(long, env = "NEXUS_ENCODER_FINAL_FULL_WINDOW")]
    pub final_full_window: bool,
    /// The shortest context a final window is encoded over, in ms: a short
    /// utterance gets silence after it up to this length, as in a longer
    /// window (with too little, Whisper can loop on a short final). Interims
    /// are previews and keep their audio plus the margin.
    #[arg(long, env = "NEXUS_ENCODER_MIN_WINDOW_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(0..=30_000))]
    pub min_window_ms: u64,
}

impl Default for EncoderArgs {
    fn default() -> Self {
        Self {
            frame_budget: 12_000,
            interim_frame_budget: 2_000,
            recording_frame_budget: 3_000,
            interim_share: 0.5,
            interim_full_window: false,
            final_full_window: false,
            min_window_ms: 10_000,
        }
    }
}

fn parse_share(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.05..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is outside 0.05..=1"))
    }
}

/// Encoder time interim windows may still take: `share` of every second
/// accrues, at most one second's worth is kept, each interim batch spends
/// what it took. Finals are never held to it.
#[derive(Debug)]
struct InterimCredit {
    share: f64,
    seconds: f64,
    at: std::time::Instant,
}

impl InterimCredit {
    fn new(share: f64) -> Self {
        Self {
            share,
            seconds: share,
            at: std::time::Instant::now(),
        }
    }

    /// Whether interims may be encoded now.
    fn available(&mut self) -> bool {
        let now = std::time::Instant::now();
        let accrued = now.duration_since(self.at).as_secs_f64() * self.share;
        self.seconds = (self.seconds + accrued).min(self.share);
        self.at = now;
        self.seconds > 0.0
    }

    fn spend(&mut self, took: Duration) {
        self.seconds -= took.as_secs_f64();
    }
}

/// Everything the encoder stage runs with.
#[derive(Debug, Clone)]
struct EncoderConfig {
    /// Shared fleet settings.
    fleet: Fleet,
    /// Stage settings.
    args: EncoderArgs,
}

/// The encoder stage, built: what `nexus-encoder` and `nexus serve` run.
pub struct EncoderStage {
    cfg: EncoderConfig,
    models: ModelSet,
    shutdown: CancellationToken,
}

impl EncoderStage {
    /// The encoder of `process`, with the process's models (loaded here when
    /// no other stage of the process has).
    pub async fn build(process: &Process, args: EncoderArgs) -> anyhow::Result<Self> {
        Ok(Self {
            cfg: EncoderConfig {
                fleet: process.fleet("encoder")?,
                args,
            },
            models: process.models().await?,
            shutdown: process.shutdown.clone(),
        })
    }

    /// Runs until the process shuts down, serving health on `listener` when given.
    pub async fn run<B: Bus>(self, bus: B, listener: Option<TcpListener>) -> anyhow::Result<()> {
        run(self.cfg, bus, self.models, listener, self.shutdown).await
    }
}

async fn run<B: Bus>(
    cfg: EncoderConfig,
    bus: B,
    models: ModelSet,
    listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let server = match listener {
        Some(l) => {
            let grpc = GrpcServer::new(&[], cfg.fleet.drain).await;
            let health = grpc.health_handle();
            let stop = shutdown.clone();
            let task = nexus_core::task::spawn("encoder-health", async move {
                grpc.serve(tonic::service::RoutesBuilder::default(), l, stop)
                    .await
            });
            Some((health, task))
        }
        None => None,
    };
    let keys = &cfg.fleet.keys;
    let metrics = std::sync::Arc::new(nexus_fleet::metrics::StageMetrics::new(
        "encoder",
        cfg.fleet.metrics.clone(),
    ));
    if let Some(admin) = &cfg.fleet.admin {
        let m = metrics.clone();
        admin.add(std::sync::Arc::new(move || m.render()));
        metrics.fleet.sample_streams(
            bus.clone(),
            keys,
            &[stages::AUDIO],
            Duration::from_secs(2),
            shutdown.clone(),
        );
    }
    let mut reader = StageReader::for_stage(
        bus.clone(),
        &cfg.fleet,
        stages::AUDIO,
        stages::ENCODER_GROUP,
        &shutdown,
    )
    .await
    .context("joining the audio stream")?;
    if let Some((health, _)) = &server {
        health.set_serving(true).await;
    }
    tracing::info!(node = %cfg.fleet.node, models = ?models.names(), "encoder ready");
    let out = Output {
        models: models.clone(),
        bus: bus.clone(),
        stream: stages::stream(keys, stages::ENCODED),
        limits: cfg.fleet.limits,
        // In-flight work finishes after shutdown: reading stops, the batch completes.
        work: CancellationToken::new(),
        metrics: metrics.clone(),
        acker: reader.acker(),
        fresh_every: cfg.fleet.claim_idle / 3,
    };
    // A recording's windows are encoded at background priority, one turn at
    // a time beside the loop, which meanwhile keeps serving live windows.
    let background = std::sync::Arc::new(
        nexus_core::priority::background_pool("encoder-bg")
            .context("building the encoder's background thread pool")?,
    );
    let mut recording: Option<tokio::task::JoinHandle<()>> = None;
    // Entries read at once: as many of the shortest windows (a second of
    // speech and the margin) as one batch may hold; `batches` splits them.
    let max_batch = (cfg.args.frame_budget / 300).clamp(1, 64);
    let max_age = cfg.fleet.interim_max_age;
    // Windows read but not yet encoded: after each interim (or recording)
    // turn the stream is read again, so a live final that arrived meanwhile
    // goes next and waits for at most one interim batch
    // (`--interim-frame-budget`).
    let mut waiting: Group = Vec::new();
    // A recording's windows that wait their turn stay claimed by this
    // replica: the ids kept fresh, and the guard doing it.
    let mut waiting_fresh: (Vec<EntryId>, Option<nexus_fleet::reader::KeepFresh>) =
        (Vec::new(), None);
    let mut credit = InterimCredit::new(cfg.args.interim_share);
    loop {
        let turn_busy = recording.as_ref().is_some_and(|t| !t.is_finished());
        let wait = if waiting.is_empty() {
            Duration::from_secs(1)
        } else if turn_busy && waiting.iter().all(|(_, s)| work_of(s) == Work::Recording) {
            // Only recordings wait, behind the turn in flight: look for
            // live work now and then, not in a busy loop.
            Duration::from_millis(25)
        } else {
            Duration::from_millis(1)
        };
        let Some(batch) = reader.next(max_batch, wait, &shutdown).await else {
            break;
        };
        if batch.is_empty() && waiting.is_empty() {
            continue;
        }
        let (jobs, skip) = plan_with(batch, std::mem::take(&mut waiting), max_age);
        metrics.skipped(skip.len());
        reader.ack(&skip).await;
        let mut interim_turns = 0;
        for (model, group) in jobs {
            // Finals went first; interims that aged meanwhile are not worth encoding.
            let (group, stale) = drop_stale(group, max_age);
            metrics.skipped(stale.len());
            reader.ack(&stale).await;
            // NEXUS-O's adapter takes the padded 30 s window.
            let nexus = models.nexus(&model).is_some();
            match group.first().map(|(_, s)| work_of(s)) {
                Some(Work::Interim) => {
                    if !credit.available() {
                        // Out of interim time: these previews are skipped; the
                        // utterance's next window (or its final) supersedes them.
                        metrics.skipped(group.len());
                        let ids: Vec<EntryId> = group.iter().map(|(id, _)| *id).collect();
                        reader.ack(&ids).await;
                        continue;
                    }
                    if interim_turns > 0 {
                        waiting.extend(group);
                        continue;
                    }
                    interim_turns += 1;
                }
                Some(Work::Recording) => {
                    if recording.as_ref().is_some_and(|t| !t.is_finished()) {
                        waiting.extend(group);
                        continue;
                    }
                    let (now, later) = turn(group, &cfg.args);
                    waiting.extend(later);
                    let (out, args, background) =
                        (out.clone(), cfg.args.clone(), background.clone());
                    recording = Some(tokio::spawn(async move {
                        for (context, group) in batches(now, &args, nexus) {
                            out.encode(&model, context, group, Some(background.clone()))
                                .await;
                        }
                    }));
                    continue;
                }
                Some(Work::LiveFinal) | None => {}
            }
            let (now, later) = turn(group, &cfg.args);
            waiting.extend(later);
            for (context, group) in batches(now, &cfg.args, nexus) {
                let interims = group.iter().all(|(_, s)| !s.is_final);
                let took = out.encode(&model, context, group, None).await;
                if interims {
                    credit.spend(took);
                }
            }
        }
        let recordings: Vec<EntryId> = waiting
            .iter()
            .filter(|(_, s)| work_of(s) == Work::Recording)
            .map(|(id, _)| *id)
            .collect();
        if recordings != waiting_fresh.0 {
            let guard = (!recordings.is_empty())
                .then(|| out.acker.keep_fresh(recordings.clone(), out.fresh_every));
            waiting_fresh = (recordings, guard);
        }
    }
    if let Some(t) = recording {
        let _ = t.await;
    }
    tracing::info!("encoder drained");
    if let Some((health, task)) = server {
        health.set_serving(false).await;
        let _ = task.await;
    }
    Ok(())
}

/// Where encoded windows go: the model, the output stream, the metrics and
/// the acknowledgement of the entries they came from.
struct Output<B: Bus> {
    models: ModelSet,
    bus: B,
    stream: String,
    limits: nexus_bus::StreamLimits,
    work: CancellationToken,
    metrics: std::sync::Arc<nexus_fleet::metrics::StageMetrics>,
    acker: nexus_fleet::Acker<B>,
    /// How often entries in work are marked fresh.
    fresh_every: Duration,
}

impl<B: Bus> Clone for Output<B> {
    fn clone(&self) -> Self {
        Self {
            models: self.models.clone(),
            bus: self.bus.clone(),
            stream: self.stream.clone(),
            limits: self.limits,
            work: self.work.clone(),
            metrics: self.metrics.clone(),
            acker: self.acker.clone(),
            fresh_every: self.fresh_every,
        }
    }
}

impl<B: Bus> Output<B> {
    /// Encodes one batch of `model`'s windows over `context` frames (on
    /// `background` threads where given), writes the features and
    /// acknowledges the entries. Returns how long the encoding took.
    async fn encode(
        &self,
        model: &str,
        context: usize,
        group: Group,
        background: Option<std::sync::Arc<rayon::ThreadPool>>,
    ) -> Duration {
        let ids: Vec<EntryId> = group.iter().map(|(id, _)| *id).collect();
        // A background turn can take long under live load: its entries stay
        // claimed meanwhile. (Live batches take well under the claim time.)
        let _fresh = background
            .is_some()
            .then(|| self.acker.keep_fresh(ids.clone(), self.fresh_every));
        let kinds: Vec<bool> = group.iter().map(|(_, s)| s.is_final).collect();
        let audio_seconds: f64 = group
            .iter()
            .map(|(_, s)| s.pcm_f32le.len() as f64 / 4.0 / f64::from(SAMPLE_RATE))
            .sum();
        let t0 = std::time::Instant::now();
        let encoded = encode_group(&self.models, model, group, context, background).await;
        let took = t0.elapsed();
        self.metrics.call(kinds.len(), took, audio_seconds);
        for is_final in &kinds {
            self.metrics.segment(*is_final, encoded.is_ok());
        }
        match encoded {
            Ok(out) => {
                for seg in out {
                    let fields = encode(&seg)
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect();
                    write(&self.bus, &self.stream, fields, self.limits, &self.work).await;
                }
            }
            Err(e) => {
                // Input the encoder cannot read fails the same way on every replica.
                tracing::error!(model, error = %format!("{e:#}"), entries = ids.len(), "encoding failed; entries dropped");
            }
        }
        self.acker.ack(&ids).await;
        took
    }
}

/// Appends one output, waiting out a full stream (backpressure) or an outage.
async fn write<B: Bus>(
    bus: &B,
    stream: &str,
    fields: nexus_bus::Fields,
    limits: nexus_bus::StreamLimits,
    stop: &CancellationToken,
) {
    let mut wait = Duration::from_millis(20);
    loop {
        let r = retry("write features", Duration::from_secs(30), stop, || {
            bus.add(stream, fields.clone(), limits)
        })
        .await;
        match r {
            Ok(_) => return,
            Err(BusError::Full { .. }) => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(500));
            }
            Err(e) => {
                tracing::warn!(error = %e, "writing features failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

type Group = Vec<(EntryId, AudioSegment)>;

/// Interim windows older than `max_age` (shown text would be stale before it
/// arrives), split off from the rest.
fn drop_stale(group: Group, max_age: Duration) -> (Group, Vec<EntryId>) {
    let now = now_unix_ms();
    let (keep, stale): (Group, Group) = group.into_iter().partition(|(_, s)| {
        let emitted = s.envelope.as_ref().map_or(0, |e| e.emitted_unix_ms);
        s.is_final || now.saturating_sub(emitted) <= max_age.as_millis() as u64
    });
    (keep, stale.into_iter().map(|(id, _)| id).collect())
}

/// Splits a batch into work by model and entries to acknowledge unread: corrupt
/// ones, and interim windows superseded by a newer entry of the same utterance
/// in this batch or older than `max_age`. Groups come in [`Work`] order:
/// live finals first, in their own batches (a final caption is what a user
/// waits for, an interim one only previews it, so under load interims wait
/// and age out rather than finals), then interims, then recordings.
#[cfg(test)]
fn plan(batch: Vec<Entry>, max_age: Duration) -> (Vec<(String, Group)>, Vec<EntryId>) {
    plan_with(batch, Vec::new(), max_age)
}

/// [`plan`] over newly read entries and interim windows read earlier that
/// still wait their turn.
fn plan_with(
    batch: Vec<Entry>,
    waiting: Group,
    max_age: Duration,
) -> (Vec<(String, Group)>, Vec<EntryId>) {
    let mut skip = Vec::new();
    let mut segs: Vec<(EntryId, AudioSegment)> = waiting;
    for e in batch {
        match decode::<AudioSegment>(&e.fields) {
            Ok(s) => segs.push((e.id, s)),
            Err(err) => {
                tracing::error!(id = %e.id, error = %err, "unreadable audio entry dropped");
                skip.push(e.id);
            }
        }
    }
    let key = |s: &AudioSegment| {
        let env = s.envelope.clone().unwrap_or_default();
        (env.session_id, env.segment_id)
    };
    let mut newest: HashMap<(String, u64), u32> = HashMap::new();
    for (_, s) in &segs {
        let r = s.envelope.as_ref().map_or(0, |e| e.revision);
        let e = newest.entry(key(s)).or_insert(r);
        *e = (*e).max(r);
    }
    let now = now_unix_ms();
    let mut by_model: Vec<(String, Work, Group)> = Vec::new();
    for (id, s) in segs {
        let env = s.envelope.clone().unwrap_or_default();
        if !s.is_final {
            let superseded = newest.get(&key(&s)).is_some_and(|r| *r > env.revision);
            let old = now.saturating_sub(env.emitted_unix_ms) > max_age.as_millis() as u64;
            if superseded || old {
                tracing::debug!(session = %env.session_id, segment = env.segment_id, revision = env.revision, superseded, "interim window skipped");
                skip.push(id);
                continue;
            }
        }
        let model = s
            .config
            .as_ref()
            .map(|c| c.model.clone())
            .unwrap_or_default();
        let class = work_of(&s);
        match by_model
            .iter_mut()
            .find(|(m, c, _)| *m == model && *c == class)
        {
            Some((_, _, g)) => g.push((id, s)),
            None => by_model.push((model, class, vec![(id, s)])),
        }
    }
    by_model.sort_by_key(|(_, class, _)| *class);
    let jobs = by_model
        .into_iter()
        .map(|(m, class, mut g)| {
            // Interims by deadline: the one emitted first is due first.
            if class == Work::Interim {
                g.sort_by_key(|(_, s)| s.envelope.as_ref().map_or(0, |e| e.emitted_unix_ms));
            }
            (m, g)
        })
        .collect();
    (jobs, skip)
}

/// The work a window is.
fn work_of(s: &AudioSegment) -> Work {
    Work::of(s.is_final, s.envelope.as_ref().is_some_and(|e| e.live))
}

/// Splits one model's windows (all of one [`Work`], as [`plan_with`] groups
/// them) into those encoded now and those that wait: live finals all go now;
/// interims (due first, first) up to the interim frame budget, a
/// recording's windows up to the recording frame budget, at least one.
fn turn(group: Group, args: &EncoderArgs) -> (Group, Group) {
    let (budget, full, min_ms) = match group.first().map(|(_, s)| work_of(s)) {
        Some(Work::Interim) => (args.interim_frame_budget, args.interim_full_window, 0),
        Some(Work::Recording) => (
            args.recording_frame_budget,
            args.final_full_window,
            args.min_window_ms,
        ),
        Some(Work::LiveFinal) | None => return (group, Vec::new()),
    };
    let mut frames = 0;
    let mut now = Vec::new();
    let mut later = Vec::new();
    for (id, s) in group {
        let context = context_frames(s.pcm_f32le.len() / 4, full, min_ms);
        if now.is_empty() || frames + context <= budget {
            frames += context;
            now.push((id, s));
        } else {
            later.push((id, s));
        }
    }
    (now, later)
}

/// Audio after the end of a window that its encoding still covers: the
/// encoder sees where speech stops, as in a padded 30 s window.
pub const WINDOW_MARGIN_MS: usize = 2_000;

/// Mel frames to encode for a window of `samples`: the audio plus a margin,
/// at least `min_ms`, in whole seconds; or the full 30 s window where `full`.
fn context_frames(samples: usize, full: bool, min_ms: u64) -> usize {
    if full {
        return CHUNK_FRAMES;
    }
    let frames = (samples + SAMPLE_RATE as usize * WINDOW_MARGIN_MS / 1000).div_ceil(HOP_LENGTH);
    let shortest = (min_ms / 10) as usize;
    frames
        .max(shortest)
        .div_ceil(100)
        .saturating_mul(100)
        .min(CHUNK_FRAMES)
}

/// Splits one model's windows into encoder batches: by context length (so
/// short windows are not padded to a long one's length), each within
/// `frame_budget` mel frames, and no batch padding any window beyond a quarter
/// of its own context. `all_full` encodes every window over 30 s.
fn batches(group: Group, args: &EncoderArgs, all_full: bool) -> Vec<(usize, Group)> {
    let mut sized: Vec<(usize, (EntryId, AudioSegment))> = group
        .into_iter()
        .map(|(id, s)| {
            let (full, min_ms) = if s.is_final {
                (args.final_full_window, args.min_window_ms)
            } else {
                (args.interim_full_window, 0)
            };
            (
                context_frames(s.pcm_f32le.len() / 4, all_full || full, min_ms),
                (id, s),
            )
        })
        .collect();
    sized.sort_by_key(|(c, _)| *c);
    // (shortest context, longest context, windows): sorted, so each window
    // joins the last batch or starts the next.
    let mut out: Vec<(usize, usize, Group)> = Vec::new();
    for (context, entry) in sized {
        match out.last_mut() {
            Some((shortest, longest, g))
                if (g.len() + 1) * context <= args.frame_budget.max(CHUNK_FRAMES)
                    && context * 4 <= *shortest * 5 =>
            {
                *longest = context;
                g.push(entry);
            }
            _ => out.push((context, context, vec![entry])),
        }
    }
    out.into_iter()
        .map(|(_, longest, g)| (longest, g))
        .collect()
}

/// Encodes one model's segments in one batch over `context` mel frames.
async fn encode_group(
    models: &ModelSet,
    model: &str,
    group: Group,
    context: usize,
    background: Option<std::sync::Arc<rayon::ThreadPool>>,
) -> anyhow::Result<Vec<EncodedSegment>> {
    if let Some((name, nexus)) = models.nexus(model) {
        return encode_nexus_group(name.to_owned(), nexus.clone(), group, background).await;
    }
    let (name, engine) = models.get(model).with_context(|| {
        format!(
            "model {model:?} is not served here; serving {:?}",
            models.names()
        )
    })?;
    let name = name.to_owned();
    let engine = engine.clone();
    let spans = window_spans(&group, group.len());
    let run = move || {
        let t0 = std::time::Instant::now();
        let mut mels = Vec::with_capacity(group.len());
        let mut valid = Vec::with_capacity(group.len());
        for (_, s) in &group {
            let samples = samples_of(s)?;
            valid.push((samples.len() / HOP_LENGTH).min(context) as u32);
            // Zeros up to the context and one FFT window past it: the frames
            // kept are those of the padded 30 s window (zeros never raise
            // the log floor's peak), without transforming the rest.
            let pad = (context * HOP_LENGTH + N_FFT).saturating_sub(samples.len());
            let mel = engine
                .mel
                .compute(&samples, pad)?
                .to_tensor(&engine.device)?;
            mels.push(mel.i((.., .., ..context))?.contiguous()?);
        }
        let batch = Tensor::cat(&mels, 0)?.to_dtype(engine.dtype)?;
        let feats = engine
            .model
            .encoder
            .forward(&batch)?
            .to_dtype(candle_core::DType::F32)?;
        let (b, frames, hidden) = feats.dims3()?;
        let inference_ms = t0.elapsed().as_millis() as u64;
        for span in &spans {
            span.record("inference_ms", inference_ms);
        }
        tracing::debug!(
            batch = b,
            finals = group.iter().filter(|(_, s)| s.is_final).count(),
            encode_ms = t0.elapsed().as_millis() as u64,
            oldest_wait_ms = group
                .iter()
                .map(|(_, s)| now_unix_ms()
                    .saturating_sub(s.envelope.as_ref().map_or(0, |e| e.emitted_unix_ms)))
                .max()
                .unwrap_or(0),
            "encoded batch"
        );
        let mut out = Vec::with_capacity(b);
        for (i, (_, s)) in group.into_iter().enumerate() {
            let data: Vec<f32> = feats.i(i)?.flatten_all()?.to_vec1()?;
            out.push(encoded(
                s,
                &spans[i],
                &name,
                &data,
                [frames, hidden],
                valid[i],
            ));
        }
        Ok(out)
    };
    tokio::task::spawn_blocking(move || match background {
        Some(pool) => pool.install(run),
        None => run(),
    })
    .await?
}

/// A window's samples (up to 30 s), checked: 16 kHz and not empty.
fn samples_of(s: &AudioSegment) -> anyhow::Result<Vec<f32>> {
    anyhow::ensure!(
        s.sample_rate_hz == SAMPLE_RATE,
        "segment at {} Hz; the encoder takes {SAMPLE_RATE} Hz",
        s.sample_rate_hz
    );
    let samples: Vec<f32> = s
        .pcm_f32le
        .chunks_exact(4)
        .take(CHUNK_SAMPLES)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    anyhow::ensure!(!samples.is_empty(), "segment holds no audio");
    Ok(samples)
}

/// One `encode` span per window, child of the ingest span that wrote it.
fn window_spans(group: &Group, batch_size: usize) -> Vec<tracing::Span> {
    let now = now_unix_ms();
    group
        .iter()
        .map(|(_, s)| {
            let env = s.envelope.clone().unwrap_or_default();
            let span = tracing::info_span!(
                "encode",
                session.id = %env.session_id,
                segment = env.segment_id,
                revision = env.revision,
                is_final = s.is_final,
                queue_ms = now.saturating_sub(env.emitted_unix_ms),
                batch_size,
                inference_ms = tracing::field::Empty,
            );
            nexus_core::trace::follow(&span, env.trace.as_ref());
            span
        })
        .collect()
}

/// The features entry of one window: `data` is (frames, hidden) row-major.
fn encoded(
    s: AudioSegment,
    span: &tracing::Span,
    model: &str,
    data: &[f32],
    [frames, hidden]: [usize; 2],
    valid_frames: u32,
) -> EncodedSegment {
    let mut bytes = Vec::with_capacity(data.len() * 4);
    for x in data {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    let env = s.envelope.unwrap_or_default();
    EncodedSegment {
        envelope: Some(Envelope {
            emitted_unix_ms: now_unix_ms(),
            trace: nexus_core::trace::context_of(span),
            ..env
        }),
        config: s.config,
        start_ms: s.start_ms,
        end_ms: s.end_ms,
        is_final: s.is_final,
        channel_tag: s.channel_tag,
        previous_text: s.previous_text,
        translation_context: s.translation_context,
        lead_ms: s.lead_ms,
        silence_ms: s.silence_ms,
        model: model.to_owned(),
        shape: vec![frames as u32, hidden as u32],
        dtype: DType::F32 as i32,
        data: bytes.into(),
        valid_frames,
    }
}

/// Encodes NEXUS-O segments: Whisper encoder over the padded 30 s window,
/// then the adapter; the features are the LM embeddings (n, hidden) of the
/// adapter frames that cover the audio. One window at a time (their lengths
/// differ); the decoder batches them.
async fn encode_nexus_group(
    name: String,
    model: std::sync::Arc<nexus_models::nexus::NexusModel>,
    group: Group,
    background: Option<std::sync::Arc<rayon::ThreadPool>>,
) -> anyhow::Result<Vec<EncodedSegment>> {
    let spans = window_spans(&group, 1);
    let run = move || {
        let mut out = Vec::with_capacity(group.len());
        for (i, (_, s)) in group.into_iter().enumerate() {
            let t0 = std::time::Instant::now();
            let samples = samples_of(&s)?;
            let emb = model
                .encode_audio(&samples)?
                .to_dtype(candle_core::DType::F32)?;
            let (frames, hidden) = emb.dims2()?;
            let data: Vec<f32> = emb.flatten_all()?.to_vec1()?;
            spans[i].record("inference_ms", t0.elapsed().as_millis() as u64);
            out.push(encoded(
                s,
                &spans[i],
                &name,
                &data,
                [frames, hidden],
                frames as u32,
            ));
        }
        Ok(out)
    };
    tokio::task::spawn_blocking(move || match background {
        Some(pool) => pool.install(run),
        None => run(),
    })
    .await?
}

#[cfg(test)]
mod tests {
    use nexus_proto::speech::RecognitionConfig as StageConfig;

    use super::*;

    fn entry(
        ms: u64,
        session: &str,
        segment: u64,
        revision: u32,
        is_final: bool,
        age_ms: u64,
    ) -> Entry {
        let seg = AudioSegment {
            envelope: Some(Envelope {
                session_id: session.into(),
                segment_id: segment,
                revision,
                emitted_unix_ms: now_unix_ms() - age_ms,
                live: true,
                ..Default::default()
            }),
            config: Some(StageConfig {
                model: "tiny.en".into(),
                ..Default::default()
            }),
            is_final,
            ..Default::default()
        };
        Entry {
            id: EntryId { ms, seq: 0 },
            fields: encode(&seg)
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            deliveries: 1,
        }
    }

    #[test]
    fn windows_are_encoded_over_their_audio_and_a_margin_only() {
        // 3 s of audio + 2 s margin = 500 mel frames (10 ms each).
        assert_eq!(context_frames(48_000, false, 0), 500);
        assert_eq!(context_frames(48_001, false, 0), 600);
        assert_eq!(context_frames(48_000, true, 0), CHUNK_FRAMES);
        assert_eq!(context_frames(29 * 16_000, false, 0), CHUNK_FRAMES);
        // Short windows are padded to the shortest context.
        assert_eq!(context_frames(48_000, false, 10_000), 1_000);
        assert_eq!(context_frames(160_000, false, 10_000), 1_200);
    }

    fn window(ms: u64, seconds: f32, is_final: bool) -> (EntryId, AudioSegment) {
        let samples = (seconds * SAMPLE_RATE as f32) as usize;
        (
            EntryId { ms, seq: 0 },
            AudioSegment {
                is_final,
                pcm_f32le: vec![0u8; samples * 4].into(),
                ..Default::default()
            },
        )
    }

    fn shape(b: &[(usize, Group)]) -> Vec<(usize, Vec<u64>)> {
        b.iter()
            .map(|(c, g)| (*c, g.iter().map(|(id, _)| id.ms).collect()))
            .collect()
    }

    #[test]
    fn batches_group_windows_of_like_length_within_the_frame_budget() {
        let args = EncoderArgs {
            frame_budget: 2_000,
            min_window_ms: 0,
            ..EncoderArgs::default()
        };
        let group = vec![
            window(1, 20.0, true), // 2200 frames: alone, over the budget
            window(2, 2.5, true),  // 500
            window(3, 3.0, true),  // 500
            window(4, 3.5, true),  // 600: within a quarter of 500
            window(5, 8.0, true),  // 1000: too long for the short ones
            window(6, 2.0, true),  // 400
        ];
        assert_eq!(
            shape(&batches(group.clone(), &args, false)),
            vec![
                (500, vec![6, 2, 3]),
                (600, vec![4]),
                (1000, vec![5]),
                (2200, vec![1]),
            ]
        );
        let full = EncoderArgs {
            final_full_window: true,
            ..args.clone()
        };
        assert_eq!(
            shape(&batches(group.clone(), &full, false)),
            (1..=6).map(|i| (CHUNK_FRAMES, vec![i])).collect::<Vec<_>>()
        );
        // Interims follow their own flag; NEXUS-O windows are always full.
        let interims: Group = group
            .iter()
            .cloned()
            .map(|(id, mut s)| {
                s.is_final = false;
                (id, s)
            })
            .collect();
        assert_eq!(
            shape(&batches(interims, &full, false))[0],
            (500, vec![6, 2, 3])
        );
        assert!(
            batches(group.clone(), &args, true)
                .iter()
                .all(|(c, _)| *c == CHUNK_FRAMES)
        );
        // By default a short final gets 10 s of context; interims do not.
        let padded = EncoderArgs {
            frame_budget: 2_000,
            ..EncoderArgs::default()
        };
        assert_eq!(
            shape(&batches(group, &padded, false)),
            vec![
                (1_000, vec![2, 3, 4]),
                (1_000, vec![5, 6]),
                (2_200, vec![1])
            ]
        );
    }

    #[test]
    fn interims_stop_when_their_share_of_time_is_spent() {
        let mut c = super::InterimCredit::new(0.5);
        assert!(c.available());
        c.spend(Duration::from_secs(2));
        assert!(!c.available(), "{c:?}");
        assert!(super::parse_share("0.01").is_err() && super::parse_share("1.5").is_err());
        assert_eq!(super::parse_share("0.25"), Ok(0.25));
    }

    #[test]
    fn finals_are_encoded_before_interims_and_stale_interims_not_at_all() {
        let max_age = Duration::from_millis(2_000);
        let batch = vec![
            entry(1, "a", 0, 1, false, 100),  // interim, superseded by 2
            entry(2, "a", 0, 2, false, 100),  // interim, newest
            entry(3, "b", 4, 1, false, 5000), // interim, too old
            entry(4, "c", 0, 3, true, 5000),  // final: never too old
            entry(5, "d", 1, 1, true, 10),    // final
        ];
        let (jobs, skip) = plan(batch, max_age);
        let ids: Vec<Vec<u64>> = jobs
            .iter()
            .map(|(_, g)| g.iter().map(|(id, _)| id.ms).collect())
            .collect();
        assert_eq!(ids, vec![vec![4, 5], vec![2]]);
        let mut skip: Vec<u64> = skip.iter().map(|id| id.ms).collect();
        skip.sort();
        assert_eq!(skip, vec![1, 3]);

        let group = jobs.into_iter().nth(1).unwrap().1;
        let (keep, stale) = drop_stale(group, Duration::ZERO);
        assert!(
            keep.is_empty() && stale.len() == 1,
            "an interim ages out while finals encode"
        );
    }

    /// A recording's windows come after live finals and interims, and go a
    /// turn at a time: one 30 s window per read of the stream by default.
    #[test]
    fn a_recording_waits_behind_live_work_a_turn_at_a_time() {
        let recording = |ms: u64, segment: u64| {
            let (id, mut s) = window(ms, 30.0, true);
            s.config = Some(StageConfig {
                model: "tiny.en".into(),
                ..Default::default()
            });
            s.envelope = Some(Envelope {
                session_id: "file".into(),
                segment_id: segment,
                emitted_unix_ms: now_unix_ms() - 60_000,
                ..Default::default()
            });
            Entry {
                id,
                fields: encode(&s)
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect(),
                deliveries: 1,
            }
        };
        let batch = vec![
            recording(1, 0),
            recording(2, 1),
            entry(3, "live", 0, 2, false, 10), // interim
            recording(4, 2),
            entry(5, "live", 1, 1, true, 10), // live final
        ];
        let (jobs, skip) = plan(batch, Duration::from_secs(2));
        assert!(skip.is_empty());
        let ids: Vec<Vec<u64>> = jobs
            .iter()
            .map(|(_, g)| g.iter().map(|(id, _)| id.ms).collect())
            .collect();
        assert_eq!(ids, vec![vec![5], vec![3], vec![1, 2, 4]]);
        let args = EncoderArgs::default();
        let (now, later) = turn(jobs[2].1.clone(), &args);
        assert_eq!((now.len(), later.len()), (1, 2), "one window a turn");
        let (now, later) = turn(jobs[0].1.clone(), &args);
        assert_eq!((now.len(), later.len()), (1, 0), "live finals all go");
        // A larger budget takes more of the recording per turn.
        let wide = EncoderArgs {
            recording_frame_budget: 6_000,
            ..args
        };
        assert_eq!(turn(jobs[2].1.clone(), &wide).0.len(), 2);
    }
}
