//! The vocoder stage.
//!
//! Reads speech synthesis requests from the `synthesize` stream, speaks them
//! sentence by sentence with a Piper voice, and appends each sentence's audio
//! to the request's result log as a `SynthesisChunk` the moment it is ready
//! (keyed by its index, so a redelivered request never duplicates audio); the
//! ingest replica that took the call streams the chunks to the client.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use nexus_bus::{Bus, SessionId, decode, encode};
use nexus_core::grpc::{DrainOptions, GrpcServer};
use nexus_fleet::{Fleet, StageReader, now_unix_ms, retry, stages};
use nexus_models::tts::{PiperVoice, SynthesisOptions, sentences};
use nexus_proto::pipeline::{Envelope, SynthesisChunk, SynthesisTask};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Settings of the vocoder stage.
#[derive(Debug, Clone, clap::Args)]
pub struct VocoderArgs {
    /// Voices to serve, by registry name or folder; the first is the default.
    #[arg(
        long = "voice",
        env = "NEXUS_VOICES",
        value_delimiter = ',',
        default_value = "piper-en-us-joe-medium"
    )]
    pub voices: Vec<String>,
    /// Requests synthesised at once.
    #[arg(
        long = "vocoder-concurrency",
        env = "NEXUS_VOCODER_CONCURRENCY",
        default_value_t = 2
    )]
    pub concurrency: usize,
    /// How long synthesis result logs are kept after their last chunk.
    #[arg(
        long = "vocoder-result-ttl-s",
        id = "vocoder_result_ttl_s",
        env = "NEXUS_VOCODER_RESULT_TTL_S",
        default_value_t = 600
    )]
    pub result_ttl_s: u64,
}

/// Everything the vocoder stage runs with.
#[derive(Debug, Clone)]
pub struct VocoderConfig {
    /// Shared fleet settings.
    pub fleet: Fleet,
    /// Stage settings.
    pub args: VocoderArgs,
    /// How health and the drain behave.
    pub drain: DrainOptions,
}

/// Loaded voices by name; the first is the default.
#[derive(Clone)]
pub struct Voices {
    voices: Arc<BTreeMap<String, Arc<PiperVoice>>>,
    default: String,
}

impl std::fmt::Debug for Voices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.voices.keys()).finish()
    }
}

/// The folder of a voice given by registry name or path.
pub fn resolve_voice(
    spec: &str,
    home: Option<std::path::PathBuf>,
) -> anyhow::Result<std::path::PathBuf> {
    let p = std::path::Path::new(spec);
    if p.is_dir() {
        return Ok(p.to_owned());
    }
    let store = nexus_weights::Store::new(home.unwrap_or_else(nexus_weights::Store::default_root));
    let entry = nexus_weights::Registry::builtin().get(spec)?.clone();
    anyhow::ensure!(
        entry.family == "piper",
        "{} is a {} model, not a voice",
        entry.name,
        entry.family
    );
    let dir = store.model_dir(&entry.name);
    anyhow::ensure!(
        dir.join("model.safetensors").is_file(),
        "voice {} is not on this machine; run `nexus models pull {}`",
        entry.name,
        entry.name
    );
    Ok(dir)
}

impl Voices {
    /// Loads the named voices.
    pub fn load(
        names: &[String],
        home: Option<std::path::PathBuf>,
        device: &candle_core::Device,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!names.is_empty(), "name at least one voice");
        let mut voices = BTreeMap::new();
        for n in names {
            let dir = resolve_voice(n, home.clone())?;
            let v = PiperVoice::load(&dir, device).with_context(|| format!("loading voice {n}"))?;
            voices.insert(n.clone(), Arc::new(v));
        }
        Ok(Self {
            voices: Arc::new(voices),
            default: names[0].clone(),
        })
    }

    /// The named voice, or the default for an empty name.
    pub fn get(&self, name: &str) -> Option<(&str, &Arc<PiperVoice>)> {
        let key = if name.is_empty() { &self.default } else { name };
        self.voices.get_key_value(key).map(|(k, v)| (k.as_str(), v))
    }

    /// Names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.voices.keys().cloned().collect()
    }
}

/// Runs the vocoder stage until `shutdown`.
pub async fn run<B: Bus>(
    cfg: VocoderConfig,
    bus: B,
    voices: Voices,
    listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let server = match listener {
        Some(l) => {
            let grpc = GrpcServer::new(&[], cfg.drain).await;
            let health = grpc.health_handle();
            let stop = shutdown.clone();
            let task = nexus_core::task::spawn("vocoder-health", async move {
                grpc.serve(tonic_routes(), l, stop).await
            });
            Some((health, task))
        }
        None => None,
    };
    let mut reader = StageReader::for_stage(
        bus.clone(),
        &cfg.fleet,
        stages::SYNTHESIZE,
        stages::VOCODER_GROUP,
        &shutdown,
    )
    .await
    .context("joining the synthesize stream")?;
    if let Some((health, _)) = &server {
        health.set_serving(true).await;
    }
    tracing::info!(node = %cfg.fleet.node, voices = ?voices.names(), "vocoder ready");
    let ttl = Duration::from_secs(cfg.args.result_ttl_s.max(1));
    let fresh = cfg.fleet.claim_idle / 3;
    let limit = Arc::new(tokio::sync::Semaphore::new(cfg.args.concurrency.max(1)));
    let mut running = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p?,
            _ = shutdown.cancelled() => break,
        };
        let Some(batch) = reader.next(1, Duration::from_secs(1), &shutdown).await else {
            break;
        };
        let Some(e) = batch.into_iter().next() else {
            continue;
        };
        let task = match decode::<SynthesisTask>(&e.fields) {
            Ok(t) => t,
            Err(err) => {
                tracing::error!(id = %e.id, error = %err, "unreadable synthesis entry dropped");
                reader.ack(&[e.id]).await;
                continue;
            }
        };
        let acker = reader.acker();
        let keep = acker.keep_fresh(vec![e.id], fresh);
        let (bus, keys, voices) = (bus.clone(), cfg.fleet.keys.clone(), voices.clone());
        running.spawn(async move {
            let _permit = permit;
            let _keep = keep;
            if speak(&bus, &keys, &voices, task, ttl).await {
                acker.ack(&[e.id]).await;
            }
        });
        while running.try_join_next().is_some() {}
    }
    tracing::info!("vocoder draining");
    let _ = tokio::time::timeout(cfg.drain.grace, async {
        while running.join_next().await.is_some() {}
    })
    .await;
    if let Some((health, task)) = server {
        health.set_serving(false).await;
        let _ = task.await;
    }
    tracing::info!("vocoder drained");
    Ok(())
}

fn tonic_routes() -> tonic::service::RoutesBuilder {
    tonic::service::RoutesBuilder::default()
}

/// Speaks one request into its result log; false when the log could not be
/// written (the entry is then redelivered).
async fn speak<B: Bus>(
    bus: &B,
    keys: &nexus_bus::Keys,
    voices: &Voices,
    task: SynthesisTask,
    ttl: Duration,
) -> bool {
    let env = task.envelope.clone().unwrap_or_default();
    let Ok(request) = SessionId::parse(&env.session_id) else {
        tracing::error!("synthesis entry with a bad request id dropped");
        return true;
    };
    let span =
        tracing::info_span!("synthesize", request = %request, chars = task.text.chars().count());
    nexus_core::trace::follow(&span, env.trace.as_ref());
    let log = keys.results(&request);
    let write = |chunk: SynthesisChunk| {
        let fields: nexus_bus::Fields = encode(&chunk)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let key = format!("chunk:{}", chunk.index);
        let log = log.clone();
        async move {
            let never = CancellationToken::new();
            retry("write audio", Duration::from_secs(60), &never, || {
                bus.add_unique(&log, &key, fields.clone(), ttl)
            })
            .await
        }
    };
    let chunk = |index: u32| SynthesisChunk {
        envelope: Some(Envelope {
            emitted_unix_ms: now_unix_ms(),
            ..env.clone()
        }),
        index,
        ..Default::default()
    };
    let Some((name, voice)) = voices.get(&task.voice) else {
        let mut c = chunk(0);
        c.is_last = true;
        c.error = format!(
            "voice {:?} is not served here; serving {:?}",
            task.voice,
            voices.names()
        );
        return write(c).await.is_ok();
    };
    let (name, voice) = (name.to_owned(), voice.clone());
    let opts = SynthesisOptions {
        length_scale: if task.length_scale > 0.0 {
            task.length_scale
        } else {
            voice.default_options().length_scale
        },
        seed: task.seed,
        ..voice.default_options()
    };
    let parts = sentences(&task.text);
    if parts.is_empty() {
        let mut c = chunk(0);
        c.is_last = true;
        c.error = "the text has nothing to say".into();
        return write(c).await.is_ok();
    }
    let rate = voice.sample_rate();
    let gap = rate as usize / 5;
    let n = parts.len();
    for (i, s) in parts.into_iter().enumerate() {
        let t0 = std::time::Instant::now();
        let v = voice.clone();
        let out = tokio::task::spawn_blocking(move || v.synthesize_sentence(&s, &opts)).await;
        let mut c = chunk(i as u32);
        c.voice = name.clone();
        c.sample_rate_hz = rate;
        c.inference_ms = t0.elapsed().as_millis() as u32;
        match out
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            Ok(mut samples) => {
                // Sentences are spoken with a short pause between them.
                if i + 1 < n {
                    samples.extend(std::iter::repeat_n(0.0, gap));
                }
                c.pcm_f32le = samples
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect::<Vec<u8>>()
                    .into();
                c.is_last = i + 1 == n;
            }
            Err(e) => {
                c.error = format!("synthesis failed: {e}");
                c.is_last = true;
            }
        }
        let last = c.is_last;
        if let Err(e) = write(c).await {
            tracing::error!(parent: &span, error = %e, "audio not written; the request will be redelivered");
            return false;
        }
        if last {
            break;
        }
    }
    true
}
