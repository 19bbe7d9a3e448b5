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
use nexus_core::grpc::{DrainOptions, GrpcServer};
use nexus_fleet::{Fleet, ModelSet, StageReader, now_unix_ms, retry, stages};
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
}

impl Default for EncoderArgs {
    fn default() -> Self {
        Self {
            frame_budget: 12_000,
        }
    }
}

/// Everything the encoder stage runs with.
#[derive(Debug, Clone)]
pub struct EncoderConfig {
    /// Shared fleet settings.
    pub fleet: Fleet,
    /// Stage settings.
    pub args: EncoderArgs,
    /// How health and the drain behave.
    pub drain: DrainOptions,
}

/// Runs the encoder stage until `shutdown`, serving health on `listener` when given.
pub async fn run<B: Bus>(
    cfg: EncoderConfig,
    bus: B,
    models: ModelSet,
    listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let server = match listener {
        Some(l) => {
            let grpc = GrpcServer::new(&[], cfg.drain).await;
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
    let mut reader = StageReader::new(
        bus.clone(),
        stages::stream(keys, stages::AUDIO),
        stages::ENCODER_GROUP,
        &cfg.fleet.node,
        keys.dead_letter(stages::AUDIO),
        cfg.fleet.limits,
        cfg.fleet.claim_idle,
    );
    reader
        .join(&shutdown)
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
        reader.ack(&skip).await;
        for (model, group) in jobs {
            let ids: Vec<EntryId> = group.iter().map(|(id, _)| *id).collect();
            match encode_group(&models, &model, group).await {
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

/// Splits a batch into work by model and entries to acknowledge unread: corrupt
/// ones, and interim windows superseded by a newer entry of the same utterance
/// in this batch or older than `max_age`.
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
    let mut by_model: Vec<(String, Group)> = Vec::new();
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
        match by_model.iter_mut().find(|(m, _)| *m == model) {
            Some((_, g)) => g.push((id, s)),
            None => by_model.push((model, vec![(id, s)])),
        }
    }
    (by_model, skip)
}

/// Encodes one model's segments in one batch.
async fn encode_group(
    models: &ModelSet,
    model: &str,
    group: Group,
) -> anyhow::Result<Vec<EncodedSegment>> {
    let (name, engine) = models.get(model).with_context(|| {
        format!(
            "model {model:?} is not served here; serving {:?}",
            models.names()
        )
    })?;
    let name = name.to_owned();
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || {
        let t0 = std::time::Instant::now();
        let mut mels = Vec::with_capacity(group.len());
        let mut valid = Vec::with_capacity(group.len());
        for (_, s) in &group {
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
            valid.push((samples.len() / nexus_models::mel::HOP_LENGTH).min(CHUNK_FRAMES) as u32);
            let mel = engine
                .mel
                .compute(&samples, CHUNK_SAMPLES)?
                .to_tensor(&engine.device)?;
            mels.push(mel.i((.., .., ..CHUNK_FRAMES))?.contiguous()?);
        }
        let batch = Tensor::cat(&mels, 0)?.to_dtype(engine.dtype)?;
        let feats = engine
            .model
            .encoder
            .forward(&batch)?
            .to_dtype(candle_core::DType::F32)?;
        let (b, frames, hidden) = feats.dims3()?;
        tracing::debug!(
            batch = b,
            encode_ms = t0.elapsed().as_millis() as u64,
            "encoded batch"
        );
        let mut out = Vec::with_capacity(b);
        for (i, (_, s)) in group.into_iter().enumerate() {
            let data: Vec<f32> = feats.i(i)?.flatten_all()?.to_vec1()?;
            let mut bytes = Vec::with_capacity(data.len() * 4);
            for x in data {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
            let env = s.envelope.unwrap_or_default();
            out.push(EncodedSegment {
                envelope: Some(Envelope {
                    emitted_unix_ms: now_unix_ms(),
                    ..env
                }),
                config: s.config,
                start_ms: s.start_ms,
                end_ms: s.end_ms,
                is_final: s.is_final,
                channel_tag: s.channel_tag,
                previous_text: s.previous_text,
                model: name.clone(),
                shape: vec![frames as u32, hidden as u32],
                dtype: DType::F32 as i32,
                data: bytes.into(),
                valid_frames: valid[i],
            });
        }
        Ok(out)
    })
    .await?
}
