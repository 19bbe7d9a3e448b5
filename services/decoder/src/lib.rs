//! The decoder stage.
//!
//! Reads encoder features from the `encoded` stream into a pool of fixed slots
//! that decodes many sessions' segments at once ([`pool`]), translates final
//! text into other languages with a GGUF language model when a session asks,
//! and appends each result to its session's result log idempotently, keyed by
//! (segment, revision): a segment redelivered after a crash never shows twice.
//! The replica advertises how many live sessions it takes; ingest admits new
//! sessions only while the fleet's advertised capacity lasts.

pub mod catalog;
pub mod pool;
pub mod translator;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use nexus_bus::{Bus, SessionId, decode, encode};
use nexus_core::grpc::GrpcServer;
use nexus_fleet::{Acker, Fleet, ModelSet, Process, StageReader, now_unix_ms, retry, stages};
use nexus_models::qwen::Translator;
use nexus_proto::pipeline::{DecodeResult, EncodedSegment, Envelope, TranslateDone, TranslateTask};
use nexus_proto::speech::{SpeechRecognitionResult, TranslationResult};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::pool::{Job, Output, Slot};
use crate::translator::TranslationWorker;

/// Settings of the decoder stage.
#[derive(Debug, Clone, clap::Args)]
pub struct DecoderArgs {
    /// Live sessions this replica takes; advertised to ingest for admission.
    #[arg(
        long = "decoder-sessions",
        env = "NEXUS_DECODER_SESSIONS",
        default_value_t = 8
    )]
    pub sessions: u32,
    /// Sequences decoded at once in one batch.
    #[arg(long, env = "NEXUS_DECODER_SLOTS", default_value_t = 16)]
    pub slots: usize,
    /// How long result logs are kept after their last result, for resuming clients.
    #[arg(long, env = "NEXUS_RESULT_TTL_S", default_value_t = 3_600)]
    pub result_ttl_s: u64,
    /// How long an advertisement of capacity lasts; renewed every third of it.
    #[arg(long, env = "NEXUS_ADVERTISE_TTL_MS", default_value_t = 6_000)]
    pub advertise_ttl_ms: u64,
    /// GGUF model for translation into languages Whisper cannot target; none when empty.
    #[arg(long, env = "NEXUS_TRANSLATION_MODEL", default_value = "")]
    pub translation_model: String,
    /// Wall-clock time one caption's (or one piece of a text's) translation
    /// may take, all its attempts together; past it the caption comes back
    /// marked untranslated. At most 600,000.
    #[arg(
        long,
        env = "NEXUS_TRANSLATION_TIME_BUDGET_MS",
        default_value_t = 15_000,
        value_parser = clap::value_parser!(u64).range(1..=600_000)
    )]
    pub translation_time_budget_ms: u64,
    /// How long a live caption may wait for the translation thread while
    /// it translates other captions; one still waiting then comes back
    /// untranslated, marked `behind`, so a translator that falls behind its
    /// live sessions skips stale captions instead of delaying every later
    /// one. At most 600,000.
    #[arg(
        long,
        env = "NEXUS_TRANSLATION_LIVE_WAIT_MS",
        default_value_t = 4_000,
        value_parser = clap::value_parser!(u64).range(1..=600_000)
    )]
    pub translation_live_wait_ms: u64,
}

impl Default for DecoderArgs {
    fn default() -> Self {
        Self {
            sessions: 8,
            slots: 16,
            result_ttl_s: 3_600,
            advertise_ttl_ms: 6_000,
            translation_model: String::new(),
            translation_time_budget_ms: 15_000,
            translation_live_wait_ms: 4_000,
        }
    }
}

/// How long the model catalog stays after the last decoder wrote it.
const CATALOG_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Everything the decoder stage runs with.
#[derive(Clone)]
struct DecoderConfig {
    /// Shared fleet settings.
    fleet: Fleet,
    /// Stage settings.
    args: DecoderArgs,
    /// Text translation into languages Whisper cannot target, with its model name.
    translator: Option<(String, TranslationWorker)>,
}

/// The decoder stage, built: what `nexus-decoder` and `nexus serve` run.
pub struct DecoderStage {
    cfg: DecoderConfig,
    models: ModelSet,
    shutdown: CancellationToken,
}

impl DecoderStage {
    /// The decoder of `process`: the process's models (loaded here when no
    /// other stage of the process has) and `--translation-model`.
    pub async fn build(process: &Process, args: DecoderArgs) -> anyhow::Result<Self> {
        anyhow::ensure!(args.slots > 0, "--slots must be at least 1");
        let (spec, home, device) = (
            args.translation_model.clone(),
            process.home(),
            process.device().clone(),
        );
        let limits = TranslationLimits {
            time_budget: Duration::from_millis(args.translation_time_budget_ms),
            live_wait: Duration::from_millis(args.translation_live_wait_ms),
        };
        let translator =
            tokio::task::spawn_blocking(move || load_translator(&spec, home, &device, limits))
                .await??;
        Ok(Self {
            cfg: DecoderConfig {
                fleet: process.fleet("decoder")?,
                args,
                translator,
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

impl std::fmt::Debug for DecoderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecoderConfig")
            .field("fleet", &self.fleet)
            .field("args", &self.args)
            .field("translator", &self.translator.as_ref().map(|t| &t.0))
            .finish()
    }
}

/// The translation thread's bounds in time.
#[derive(Debug, Clone, Copy)]
struct TranslationLimits {
    /// One caption's or piece's translation, all attempts.
    time_budget: Duration,
    /// A live caption's wait for the thread.
    live_wait: Duration,
}

/// Loads the text translation model named `spec` (registry name or GGUF path);
/// none for an empty name.
fn load_translator(
    spec: &str,
    home: Option<std::path::PathBuf>,
    device: &candle_core::Device,
    limits: TranslationLimits,
) -> anyhow::Result<Option<(String, TranslationWorker)>> {
    if spec.is_empty() {
        return Ok(None);
    }
    let file = nexus_fleet::models::resolve_gguf(spec, home)?;
    let t = Translator::load(&file, device)
        .with_context(|| format!("loading {}", file.display()))?
        .with_time_budget(limits.time_budget);
    let worker =
        TranslationWorker::start(t, limits.live_wait).context("starting the translation thread")?;
    Ok(Some((spec.to_owned(), worker)))
}

async fn run<B: Bus>(
    cfg: DecoderConfig,
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
            let task = nexus_core::task::spawn("decoder-health", async move {
                grpc.serve(tonic::service::RoutesBuilder::default(), l, stop)
                    .await
            });
            Some((health, task))
        }
        None => None,
    };
    let keys = cfg.fleet.keys.clone();
    let mut reader = StageReader::for_stage(
        bus.clone(),
        &cfg.fleet,
        stages::ENCODED,
        stages::DECODER_GROUP,
        &shutdown,
    )
    .await
    .context("joining the encoded stream")?;

    // Capacity is advertised while the replica runs and withdrawn when it
    // drains. What the models can do is written first, so a replica's
    // capacity never shows before its catalog; the catalog outlives the
    // replica (decoders scaled to zero leave it for ingest to check jobs
    // against) and the next replica to start rewrites it.
    let pool_key = keys.pool(stages::DECODER_POOL);
    let ttl = Duration::from_millis(cfg.args.advertise_ttl_ms.max(300));
    let advertiser = {
        let (bus, pool_key, node, stop) = (
            bus.clone(),
            pool_key.clone(),
            cfg.fleet.node.clone(),
            shutdown.clone(),
        );
        let slots = cfg.args.sessions;
        let catalog_key = keys.catalog();
        let catalog = prost::Message::encode_to_vec(&catalog::catalog(
            &models,
            cfg.translator.as_ref().map(|(name, _)| name.as_str()),
        ));
        nexus_core::task::spawn("advertise-capacity", async move {
            loop {
                if let Err(e) = bus.put(&catalog_key, catalog.clone(), CATALOG_TTL).await {
                    tracing::warn!(error = %e, "writing the model catalog failed");
                }
                if let Err(e) = bus.advertise(&pool_key, &node, slots, ttl).await {
                    tracing::warn!(error = %e, "advertising capacity failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(ttl / 3) => {}
                    _ = stop.cancelled() => break,
                }
            }
            bus.advertise(&pool_key, &node, 0, ttl).await
        })
    };

    let translations = match cfg.translator.clone() {
        Some(t) => {
            let reader = StageReader::for_stage(
                bus.clone(),
                &cfg.fleet,
                stages::TRANSLATE,
                stages::DECODER_GROUP,
                &shutdown,
            )
            .await
            .context("joining the translate stream")?;
            let (bus, keys, stop, ttl, fresh) = (
                bus.clone(),
                keys.clone(),
                shutdown.clone(),
                Duration::from_secs(cfg.args.result_ttl_s.max(1)),
                cfg.fleet.claim_idle / 3,
            );
            Some(nexus_core::task::spawn("decoder-translate", async move {
                serve_translations(reader, bus, keys, t, (ttl, fresh), stop).await;
                Ok::<(), std::convert::Infallible>(())
            }))
        }
        None => None,
    };

    let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
    let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<Output>();
    let pool = {
        let (models, slots) = (models.clone(), cfg.args.slots);
        std::thread::Builder::new()
            .name("decoder-pool".into())
            .spawn(move || pool::run_pool(models, slots, job_rx, out_tx))?
    };
    if let Some((health, _)) = &server {
        health.set_serving(true).await;
    }
    tracing::info!(node = %cfg.fleet.node, models = ?models.names(), slots = cfg.args.slots, "decoder ready");

    let slots = Arc::new(Semaphore::new(cfg.args.slots));
    // Slots holding an entry (the reader holds the idle ones while it waits).
    let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let metrics = Arc::new(DecoderMetrics::new(&cfg.args, cfg.fleet.metrics.clone()));
    if let Some(admin) = &cfg.fleet.admin {
        let (busy, m) = (busy.clone(), metrics.clone());
        admin.add(Arc::new(move || {
            m.render(busy.load(std::sync::atomic::Ordering::Relaxed))
        }));
        metrics.stage.fleet.sample_streams(
            bus.clone(),
            &keys,
            &[stages::ENCODED, stages::TRANSLATE],
            Duration::from_secs(2),
            shutdown.clone(),
        );
    }

    let writer = {
        let (bus, keys, acker, cfg, metrics) = (
            bus.clone(),
            keys.clone(),
            reader.acker(),
            cfg.clone(),
            metrics.clone(),
        );
        nexus_core::task::spawn("decoder-writer", async move {
            let mut tasks = tokio::task::JoinSet::new();
            while let Some(o) = out_rx.recv().await {
                let (bus, keys, acker, cfg) =
                    (bus.clone(), keys.clone(), acker.clone(), cfg.clone());
                if o.superseded {
                    // The span says why it carries no batch or inference time.
                    o.span.record("superseded", true);
                    metrics.stage.skipped(1);
                    tasks.spawn(async move { acker.ack(&[o.id]).await });
                    continue;
                }
                metrics.stage.segment(o.seg.is_final, o.result.is_ok());
                metrics.stage.call(
                    o.batch.max(1),
                    Duration::from_millis(u64::from(o.inference_ms)),
                    o.seg.end_ms.saturating_sub(o.seg.start_ms) as f64 / 1000.0,
                );
                tasks.spawn(async move { write(o, &bus, &keys, &acker, &cfg).await });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
            Ok::<(), std::convert::Infallible>(())
        })
    };

    let acker = reader.acker();
    let max_age = cfg.fleet.interim_max_age.as_millis() as u64;
    loop {
        let first = tokio::select! {
            p = slots.clone().acquire_owned() => p?,
            _ = shutdown.cancelled() => break,
        };
        let mut permits = vec![first];
        while let Ok(p) = slots.clone().try_acquire_owned() {
            permits.push(p);
        }
        let batch = reader
            .next(permits.len(), Duration::from_secs(1), &shutdown)
            .await;
        let Some(batch) = batch else { break };
        let mut skip = Vec::new();
        for e in batch {
            let seg = match decode::<EncodedSegment>(&e.fields) {
                Ok(s) => s,
                Err(err) => {
                    tracing::error!(id = %e.id, error = %err, "unreadable features entry dropped");
                    skip.push(e.id);
                    continue;
                }
            };
            let env = seg.envelope.clone().unwrap_or_default();
            if !seg.is_final && now_unix_ms().saturating_sub(env.emitted_unix_ms) > max_age {
                tracing::debug!(session = %env.session_id, segment = env.segment_id, "stale interim skipped");
                metrics.stage.skipped(1);
                skip.push(e.id);
                continue;
            }
            let span = tracing::info_span!(
                "decode",
                session.id = %env.session_id,
                segment = env.segment_id,
                revision = env.revision,
                is_final = seg.is_final,
                queue_ms = now_unix_ms().saturating_sub(env.emitted_unix_ms),
                batch_size = tracing::field::Empty,
                inference_ms = tracing::field::Empty,
                superseded = tracing::field::Empty,
            );
            nexus_core::trace::follow(&span, env.trace.as_ref());
            let permit = Slot::new(
                permits
                    .pop()
                    .context("more entries than free slots; this is a bug")?,
                busy.clone(),
            );
            job_tx
                .send(Job {
                    id: e.id,
                    seg,
                    permit,
                    // Queued behind others and decoded (and translated), an
                    // entry can stay unacknowledged past the claim idle time.
                    fresh: Some(acker.keep_fresh(vec![e.id], cfg.fleet.claim_idle / 3)),
                    span,
                })
                .context("the decoding pool stopped")?;
        }
        reader.ack(&skip).await;
    }
    // Drain: no new work; what the pool holds finishes and is written within the grace.
    tracing::info!("decoder draining");
    drop(job_tx);
    let grace = cfg.fleet.drain.grace;
    let finished = tokio::time::timeout(grace, async {
        let _ = tokio::task::spawn_blocking(move || pool.join()).await;
        let _ = writer.await;
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            ?grace,
            "drain grace elapsed; unfinished segments go to another replica"
        );
    }
    let _ = advertiser.await;
    if let Some(t) = translations {
        let _ = t.await;
    }
    if let Some((health, task)) = server {
        health.set_serving(false).await;
        let _ = task.await;
    }
    tracing::info!("decoder drained");
    Ok(())
}

/// Answers TranslateText requests (each batched with whatever captions the
/// translation thread has waiting).
async fn serve_translations<B: Bus>(
    mut reader: StageReader<B>,
    bus: B,
    keys: nexus_bus::Keys,
    (name, tr): (String, TranslationWorker),
    (ttl, fresh): (Duration, Duration),
    shutdown: CancellationToken,
) {
    while let Some(batch) = reader.next(1, Duration::from_secs(1), &shutdown).await {
        for e in batch {
            let task = match decode::<TranslateTask>(&e.fields) {
                Ok(t) => t,
                Err(err) => {
                    tracing::error!(id = %e.id, error = %err, "unreadable translate entry dropped");
                    reader.ack(&[e.id]).await;
                    continue;
                }
            };
            let env = task.envelope.clone().unwrap_or_default();
            let _fresh = reader.acker().keep_fresh(vec![e.id], fresh);
            let t0 = std::time::Instant::now();
            let captions = task
                .texts
                .iter()
                .map(|t| translator::Caption {
                    session: String::new(),
                    text: t.clone(),
                    source: task.source_language.clone(),
                    target: task.target_language.clone(),
                    context: Vec::new(),
                    glossary: Vec::new(),
                })
                .collect();
            let out = tr.translate(captions, translator::Priority::Text).await;
            let mut done = TranslateDone {
                envelope: Some(Envelope {
                    emitted_unix_ms: now_unix_ms(),
                    ..env.clone()
                }),
                model: name.clone(),
                inference_ms: t0.elapsed().as_millis() as u32,
                ..Default::default()
            };
            match out {
                Ok(out) => {
                    done.failures = out
                        .iter()
                        .map(|t| t.failure.unwrap_or_default().to_owned())
                        .collect();
                    done.texts = out.into_iter().map(|t| t.text).collect();
                }
                Err(err) => done.error = format!("translation failed: {err}"),
            }
            let Ok(request) = SessionId::parse(&env.session_id) else {
                tracing::error!(id = %e.id, "translate entry with a bad request id dropped");
                reader.ack(&[e.id]).await;
                continue;
            };
            let fields: nexus_bus::Fields = encode(&done)
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
            let log = keys.results(&request);
            let never = CancellationToken::new();
            match retry("write translation", Duration::from_secs(60), &never, || {
                bus.add_unique(&log, "translation", fields.clone(), ttl)
            })
            .await
            {
                Ok(_) => reader.ack(&[e.id]).await,
                Err(err) => {
                    tracing::error!(request = %request, error = %err, "translation not written; it will be redelivered")
                }
            }
        }
    }
}

/// Translates a final if asked, appends the result to the session's log once,
/// then acknowledges the features entry and frees the slot.
async fn write<B: Bus>(
    o: Output,
    bus: &B,
    keys: &nexus_bus::Keys,
    acker: &Acker<B>,
    cfg: &DecoderConfig,
) {
    let Output {
        id,
        seg,
        result,
        inference_ms,
        permit,
        fresh,
        model_translated,
        batch,
        span,
        speech,
        superseded: _,
    } = o;
    span.record("inference_ms", inference_ms);
    span.record("batch_size", batch);
    let env = seg.envelope.clone().unwrap_or_default();
    tracing::debug!(
        session = %env.session_id,
        segment = env.segment_id,
        revision = env.revision,
        is_final = seg.is_final,
        inference_ms,
        since_encoded_ms = now_unix_ms().saturating_sub(env.emitted_unix_ms),
        "decoded"
    );
    let mut msg = DecodeResult {
        envelope: Some(Envelope {
            emitted_unix_ms: now_unix_ms(),
            trace: nexus_core::trace::context_of(&span),
            ..env.clone()
        }),
        inference_ms,
        ..Default::default()
    };
    match result {
        Ok((mut r, mut segments)) => {
            if let Err(e) = translate(&mut r, &mut segments, &seg, model_translated, cfg).await {
                msg.error = e;
            }
            msg.result = Some(r);
            msg.segments = segments;
        }
        Err(e) => msg.error = e,
    }
    let session = match SessionId::parse(&env.session_id) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "features entry with a bad session id dropped");
            acker.ack(&[id]).await;
            return;
        }
    };
    let log = keys.results(&session);
    let fields: nexus_bus::Fields = encode(&msg)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let unique = stages::result_key(env.segment_id, env.revision);
    let ttl = Duration::from_secs(cfg.args.result_ttl_s.max(1));
    let never = CancellationToken::new();
    match retry("write result", Duration::from_secs(60), &never, || {
        bus.add_unique(&log, &unique, fields.clone(), ttl)
    })
    .await
    {
        Ok((_, added)) => {
            if !added {
                tracing::info!(session = %session, segment = env.segment_id, revision = env.revision, "result already written by an earlier delivery");
            }
            // The final's speech codes go to the vocoders (once: with the result's first write).
            if let (Some(codes), true) = (speech, added) {
                let fields: nexus_bus::Fields = encode(&codes)
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect();
                let stream = stages::stream(keys, stages::CODES);
                if let Err(e) = retry(
                    "queue speech codes",
                    Duration::from_secs(10),
                    &never,
                    || bus.add(&stream, fields.clone(), cfg.fleet.limits),
                )
                .await
                {
                    tracing::error!(session = %session, segment = env.segment_id, error = %e, "speech codes not queued; the segment will not be spoken");
                }
            }
            acker.ack(&[id]).await;
        }
        Err(e) => {
            tracing::error!(session = %session, error = %e, "result not written; the segment will be redelivered");
        }
    }
    drop(fresh);
    drop(permit);
}

async fn translate(
    r: &mut nexus_proto::speech::StreamingRecognitionResult,
    segments: &mut [SpeechRecognitionResult],
    seg: &EncodedSegment,
    model_translated: Option<String>,
    cfg: &DecoderConfig,
) -> Result<(), String> {
    let rc = seg.config.clone().unwrap_or_default();
    let Some(t) = rc
        .translation
        .filter(|_| rc.task == nexus_proto::speech::Task::Translate as i32)
    else {
        return Ok(());
    };
    if !seg.is_final {
        // The session will want its pair's prompt prefix at its first
        // final: the thread computes it meanwhile, when idle.
        if model_translated.is_none()
            && let Some((_, tr)) = &cfg.translator
        {
            tr.warm(&r.language, &t.target_language);
        }
        return Ok(());
    }
    if r.alternatives.is_empty() {
        return Ok(());
    }
    let text_of = |s: &SpeechRecognitionResult| {
        s.alternatives
            .first()
            .map(|a| a.transcript.clone())
            .unwrap_or_default()
    };
    // Each timed segment is translated on its own, so subtitles stay in step;
    // the utterance's translation joins them.
    let mut texts: Vec<String> = segments.iter().map(text_of).collect();
    if texts.is_empty() {
        texts.push(r.alternatives[0].transcript.clone());
    }
    let mut failures = vec![String::new(); texts.len()];
    let (model, target) = if let Some(target) = model_translated {
        // The model translated itself (Whisper into English, NEXUS-O into any language).
        (seg.model.clone(), target)
    } else {
        let Some((name, tr)) = cfg.translator.clone() else {
            return Err(format!(
                "translation into {:?} needs a text translation model; start the decoder with --translation-model",
                t.target_language
            ));
        };
        // The session's earlier finals (and this utterance's earlier pieces)
        // are context; its hotwords are the glossary.
        let glossary = rc
            .speech_context
            .as_ref()
            .map(|c| c.hotwords.clone())
            .unwrap_or_default();
        let mut context = seg.translation_context.clone();
        let mut captions = Vec::with_capacity(texts.len());
        for text in &texts {
            captions.push(translator::Caption {
                session: seg
                    .envelope
                    .as_ref()
                    .map(|e| e.session_id.clone())
                    .unwrap_or_default(),
                text: text.clone(),
                source: r.language.clone(),
                target: t.target_language.clone(),
                context: context.clone(),
                glossary: glossary.clone(),
            });
            context.push(text.clone());
        }
        // A live caption goes before any text; a recording's segments are
        // text (translated piece by piece, live captions taken between).
        let priority = if seg.envelope.as_ref().is_some_and(|e| e.live) {
            translator::Priority::Live
        } else {
            translator::Priority::Text
        };
        let out = tr
            .translate(captions, priority)
            .await
            .map_err(|e| format!("translation failed: {e}"))?;
        failures = out
            .iter()
            .map(|t| t.failure.unwrap_or_default().to_owned())
            .collect();
        texts = out.into_iter().map(|t| t.text).collect();
        (name, t.target_language)
    };
    let result = |text: String, failure: String| TranslationResult {
        source_language: r.language.clone(),
        target_language: target.clone(),
        text,
        model: model.clone(),
        failure,
    };
    for ((s, text), failure) in segments.iter_mut().zip(&texts).zip(&failures) {
        s.translation = Some(result(text.clone(), failure.clone()));
    }
    let sep = if nexus_models::whisper::align::written_without_spaces(&target) {
        ""
    } else {
        " "
    };
    // The utterance's translation: its pieces that translated; marked failed
    // (with the first piece's reason) only when none did.
    let good: Vec<&str> = texts
        .iter()
        .zip(&failures)
        .filter(|(_, f)| f.is_empty())
        .map(|(t, _)| t.as_str())
        .collect();
    let failure = if good.is_empty() {
        failures
            .iter()
            .find(|f| !f.is_empty())
            .cloned()
            .unwrap_or_default()
    } else {
        String::new()
    };
    r.translation = Some(result(good.join(sep), failure));
    Ok(())
}

/// The decoder's metrics: the stage's work counters and its capacity gauges
/// (`nexus_decoder_slots`, `_free`, `_used`, `nexus_decoder_sessions_advertised`),
/// the autoscaler's signal for live capacity.
struct DecoderMetrics {
    stage: nexus_fleet::metrics::StageMetrics,
    total: usize,
    free: prometheus_client::metrics::gauge::Gauge,
    used: prometheus_client::metrics::gauge::Gauge,
}

impl DecoderMetrics {
    fn new(args: &DecoderArgs, fleet: nexus_fleet::metrics::FleetMetrics) -> Self {
        use prometheus_client::metrics::gauge::Gauge;
        let mut stage = nexus_fleet::metrics::StageMetrics::new("decoder", fleet);
        let (slots, free, used, sessions) = (
            Gauge::<i64>::default(),
            Gauge::<i64>::default(),
            Gauge::<i64>::default(),
            Gauge::<i64>::default(),
        );
        slots.set(args.slots as i64);
        sessions.set(i64::from(args.sessions));
        let sub = stage.registry_mut().sub_registry_with_prefix("decoder");
        sub.register("slots", "Sequences this replica decodes at once", slots);
        sub.register("slots_free", "Decoding slots free now", free.clone());
        sub.register("slots_used", "Decoding slots busy now", used.clone());
        sub.register(
            "sessions_advertised",
            "Live sessions this replica offers ingest",
            sessions,
        );
        Self {
            stage,
            total: args.slots,
            free,
            used,
        }
    }

    fn render(&self, busy: usize) -> String {
        let used = busy.min(self.total);
        self.used.set(used as i64);
        self.free.set((self.total - used) as i64);
        self.stage.render()
    }
}
