//! The encoder stage.
//!
//! Reads segmented audio from the `audio` stream, drops interim windows that a
//! newer window of the same utterance already supersedes (or that waited too
//! long to still be useful), computes log-mel features and runs the Whisper
//! encoder over the rest in batches (up to a budget of mel frames), and writes
//! the features to the `encoded` stream. An entry is acknowledged only after its
//! features are written, so a crash hands it to another replica.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use candle_core::{IndexOp, Tensor};
use nexus_bus::{Bus, BusError, Entry, EntryId, decode, encode};
use nexus_core::grpc::GrpcServer;
use nexus_fleet::{Fleet, ModelSet, Process, StageReader, now_unix_ms, retry, stages};
use nexus_models::mel::{CHUNK_FRAMES, CHUNK_SAMPLES, SAMPLE_RATE};
use nexus_proto::pipeline::{AudioSegment, DType, EncodedSegment, Envelope};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Settings of the encoder stage.
#[derive(Debug, Clone, clap::Args)]
pub struct EncoderArgs {
    /// Mel frames one batch may hold (a 30 s window is 3000).
    #[arg(long, env = "NEXUS_ENCODER_FRAME_BUDGET", default_value_t = 12_000)]
    pub frame_budget: usize,
    /// Encode interim windows over the full 30 s like finals. By default an
    /// interim window is encoded over its audio plus `INTERIM_MARGIN_MS` only
    /// (a 5 s utterance costs a sixth of a full window); finals always get the
    /// full window, so final text equals offline transcription.
    #[arg(long, env = "NEXUS_ENCODER_INTERIM_FULL_WINDOW")]
    pub interim_full_window: bool,
}

impl Default for EncoderArgs {
    fn default() -> Self {
        Self {
            frame_budget: 12_000,
            interim_full_window: false,
        }
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
    let out_stream = stages::stream(keys, stages::ENCODED);
    let max_batch = (cfg.args.frame_budget / CHUNK_FRAMES).max(1);
    let max_age = cfg.fleet.interim_max_age;
    // In-flight work finishes after shutdown: reading stops, the batch completes.
    let work = CancellationToken::new();
    while let Some(batch) = reader
        .next(max_batch, Duration::from_secs(1), &shutdown)
        .await
    {
        if batch.is_empty() {
            continue;
        }
        let (jobs, skip) = plan(batch, max_age);
        metrics.skipped(skip.len());
        reader.ack(&skip).await;
        for (model, group) in jobs {
            // Finals went first; interims that aged meanwhile are not worth encoding.
            let (group, stale) = drop_stale(group, max_age);
            metrics.skipped(stale.len());
            reader.ack(&stale).await;
            if group.is_empty() {
                continue;
            }
            let ids: Vec<EntryId> = group.iter().map(|(id, _)| *id).collect();
            let kinds: Vec<bool> = group.iter().map(|(_, s)| s.is_final).collect();
            let audio_seconds: f64 = group
                .iter()
                .map(|(_, s)| s.pcm_f32le.len() as f64 / 4.0 / f64::from(SAMPLE_RATE))
                .sum();
            let t0 = std::time::Instant::now();
            let encoded = encode_group(&models, &model, group, cfg.args.interim_full_window).await;
            metrics.call(kinds.len(), t0.elapsed(), audio_seconds);
            for is_final in &kinds {
                metrics.segment(*is_final, encoded.is_ok());
            }
            match encoded {
                Ok(out) => {
                    for seg in out {
                        let fields = encode(&seg)
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), v))
                            .collect();
                        write(&bus, &out_stream, fields, cfg.fleet.limits, &work).await;
                    }
                    reader.ack(&ids).await;
                }
                Err(e) => {
                    // Input the encoder cannot read fails the same way on every replica.
                    tracing::error!(model, error = %format!("{e:#}"), entries = ids.len(), "encoding failed; entries dropped");
                    reader.ack(&ids).await;
                }
            }
        }
    }
    tracing::info!("encoder drained");
    if let Some((health, task)) = server {
        health.set_serving(false).await;
        let _ = task.await;
    }
    Ok(())
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
/// in this batch or older than `max_age`. Final windows come first, in their
/// own batches: a final caption is what a user waits for, an interim one only
/// previews it, so under load interims wait (and age out) rather than finals.
fn plan(batch: Vec<Entry>, max_age: Duration) -> (Vec<(String, Group)>, Vec<EntryId>) {
    let mut skip = Vec::new();
    let mut segs: Vec<(EntryId, AudioSegment)> = Vec::new();
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
    let mut by_model: Vec<(String, bool, Group)> = Vec::new();
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
        let is_final = s.is_final;
        match by_model
            .iter_mut()
            .find(|(m, f, _)| *m == model && *f == is_final)
        {
            Some((_, _, g)) => g.push((id, s)),
            None => by_model.push((model, is_final, vec![(id, s)])),
        }
    }
    by_model.sort_by_key(|(_, is_final, _)| !*is_final);
    let jobs = by_model.into_iter().map(|(m, _, g)| (m, g)).collect();
    (jobs, skip)
}

/// Audio after the end of an interim window that its encoding still covers.
pub const INTERIM_MARGIN_MS: usize = 2_000;

/// Mel frames to encode for a window of `samples`: the full window for finals,
/// the audio plus a margin (in whole seconds) for interims.
fn context_frames(samples: usize, is_final: bool, full_window: bool) -> usize {
    if is_final || full_window {
        return CHUNK_FRAMES;
    }
    let hop = nexus_models::mel::HOP_LENGTH;
    let frames = (samples + SAMPLE_RATE as usize * INTERIM_MARGIN_MS / 1000).div_ceil(hop);
    frames.div_ceil(100).saturating_mul(100).min(CHUNK_FRAMES)
}

/// Encodes one model's segments in one batch.
async fn encode_group(
    models: &ModelSet,
    model: &str,
    group: Group,
    full_window: bool,
) -> anyhow::Result<Vec<EncodedSegment>> {
    if let Some((name, nexus)) = models.nexus(model) {
        return encode_nexus_group(name.to_owned(), nexus.clone(), group).await;
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
    tokio::task::spawn_blocking(move || {
        let t0 = std::time::Instant::now();
        let mut mels = Vec::with_capacity(group.len());
        let mut valid = Vec::with_capacity(group.len());
        // One batch is one length: the longest context any of its windows needs.
        let context = group
            .iter()
            .map(|(_, s)| context_frames(s.pcm_f32le.len() / 4, s.is_final, full_window))
            .max()
            .unwrap_or(CHUNK_FRAMES);
        for (_, s) in &group {
            let samples = samples_of(s)?;
            valid.push((samples.len() / nexus_models::mel::HOP_LENGTH).min(context) as u32);
            let mel = engine
                .mel
                .compute(&samples, CHUNK_SAMPLES)?
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
) -> anyhow::Result<Vec<EncodedSegment>> {
    let spans = window_spans(&group, 1);
    tokio::task::spawn_blocking(move || {
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
    fn interims_are_encoded_over_their_audio_and_a_margin_only() {
        // 3 s of audio + 2 s margin = 500 mel frames (10 ms each).
        assert_eq!(context_frames(48_000, false, false), 500);
        assert_eq!(context_frames(48_001, false, false), 600);
        assert_eq!(context_frames(48_000, true, false), CHUNK_FRAMES);
        assert_eq!(context_frames(48_000, false, true), CHUNK_FRAMES);
        assert_eq!(context_frames(29 * 16_000, false, false), CHUNK_FRAMES);
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
}
