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
use nexus_core::grpc::GrpcServer;
use nexus_fleet::{Fleet, Process, StageReader, now_unix_ms, retry, stages};
use nexus_models::tts::{PiperVoice, SynthesisOptions, sentences};
use nexus_models::vocoder::{Firefly, FireflyStream};
use nexus_proto::pipeline::{DecodeResult, Envelope, SpeechCodes, SynthesisChunk, SynthesisTask};
use nexus_proto::speech::SpeechAudio;
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
    /// FireFly codecs (folders, or names `nexus models import` stored) that
    /// turn NEXUS-O speech codes into audio; the first is the default.
    #[arg(long = "codec", env = "NEXUS_CODECS", value_delimiter = ',')]
    pub codecs: Vec<String>,
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
struct VocoderConfig {
    /// Shared fleet settings.
    fleet: Fleet,
    /// Stage settings.
    args: VocoderArgs,
}

/// What to do when a voice cannot be loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingVoice {
    /// The stage does not start (a vocoder process: its voices are its job).
    Fail,
    /// Synthesis is off, with a warning saying why (the embedded fleet
    /// speaks when the voice is on this machine).
    Warn,
}

/// The vocoder stage, built: what `nexus-vocoder` and `nexus serve` run.
pub struct VocoderStage {
    cfg: VocoderConfig,
    voices: Voices,
    codecs: Codecs,
    shutdown: CancellationToken,
}

impl VocoderStage {
    /// The vocoder of `process`: its voices and codecs, loaded on the
    /// process's device.
    pub async fn build(
        process: &Process,
        args: VocoderArgs,
        missing: MissingVoice,
    ) -> anyhow::Result<Self> {
        let (names, codec_names, home, device) = (
            args.voices.clone(),
            args.codecs.clone(),
            process.home(),
            process.device().clone(),
        );
        let (voices, codecs) = tokio::task::spawn_blocking(move || {
            let voices = match (Voices::load(&names, home.clone(), &device), missing) {
                (Ok(v), _) => v,
                (Err(e), MissingVoice::Warn) => {
                    tracing::warn!(error = %format!("{e:#}"), "speech synthesis is off");
                    Voices::default()
                }
                (Err(e), MissingVoice::Fail) => return Err(e),
            };
            anyhow::Ok((voices, Codecs::load(&codec_names, home, &device)?))
        })
        .await??;
        Ok(Self {
            cfg: VocoderConfig {
                fleet: process.fleet("vocoder")?,
                args,
            },
            voices,
            codecs,
            shutdown: process.shutdown.clone(),
        })
    }

    /// The voices it speaks, sorted.
    pub fn voices(&self) -> Vec<String> {
        self.voices.names()
    }

    /// Whether it has nothing to do: no voice and no codec loaded.
    pub fn is_idle(&self) -> bool {
        self.voices.is_empty() && self.codecs.is_empty()
    }

    /// Runs until the process shuts down, serving health on `listener` when given.
    pub async fn run<B: Bus>(self, bus: B, listener: Option<TcpListener>) -> anyhow::Result<()> {
        run(
            self.cfg,
            bus,
            (self.voices, self.codecs),
            listener,
            self.shutdown,
        )
        .await
    }
}

/// Loaded voices by name; the first is the default.
#[derive(Clone, Default)]
pub struct Voices {
    voices: Arc<BTreeMap<String, Arc<PiperVoice>>>,
    default: String,
}

impl std::fmt::Debug for Voices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.voices.keys()).finish()
    }
}

/// The folder of a voice given by registry name, imported name or path
/// (resolved as models are), refusing registry models that are not voices.
pub fn resolve_voice(
    spec: &str,
    home: Option<std::path::PathBuf>,
) -> anyhow::Result<std::path::PathBuf> {
    let dir = nexus_fleet::models::resolve_model(spec, home)?;
    if let Ok(entry) = nexus_weights::Registry::builtin().get(spec) {
        anyhow::ensure!(
            entry.family == "piper",
            "{} is a {} model, not a voice",
            entry.name,
            entry.family
        );
    }
    Ok(dir)
}

impl Voices {
    /// Loads the named voices.
    pub fn load(
        names: &[String],
        home: Option<std::path::PathBuf>,
        device: &candle_core::Device,
    ) -> anyhow::Result<Self> {
        let mut voices = BTreeMap::new();
        for n in names.iter().filter(|n| !n.is_empty()) {
            let dir = resolve_voice(n, home.clone())?;
            let v = PiperVoice::load(&dir, device).with_context(|| format!("loading voice {n}"))?;
            voices.insert(n.clone(), Arc::new(v));
        }
        Ok(Self {
            default: names
                .iter()
                .find(|n| !n.is_empty())
                .cloned()
                .unwrap_or_default(),
            voices: Arc::new(voices),
        })
    }

    /// Whether none is loaded (the vocoder then only decodes speech codes).
    pub fn is_empty(&self) -> bool {
        self.voices.is_empty()
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

/// Loaded FireFly codecs by name; the first is the default.
#[derive(Clone, Default)]
pub struct Codecs {
    codecs: Arc<BTreeMap<String, Arc<Firefly>>>,
    default: String,
}

impl std::fmt::Debug for Codecs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.codecs.keys()).finish()
    }
}

impl Codecs {
    /// Loads the named codecs (folders, or names in the weights store).
    pub fn load(
        names: &[String],
        home: Option<std::path::PathBuf>,
        device: &candle_core::Device,
    ) -> anyhow::Result<Self> {
        let mut codecs = BTreeMap::new();
        for n in names.iter().filter(|n| !n.is_empty()) {
            let c = nexus_fleet::models::resolve_model(n, home.clone())
                .map_err(anyhow::Error::from)
                .and_then(|dir| Ok(Firefly::load(&dir, device)?))
                .with_context(|| {
                    format!(
                        "loading codec {n} (a FireFly folder, or `nexus models import` one first)"
                    )
                })?;
            codecs.insert(n.clone(), Arc::new(c));
        }
        Ok(Self {
            default: codecs.keys().next().cloned().unwrap_or_default(),
            codecs: Arc::new(codecs),
        })
    }

    /// Whether none is loaded.
    pub fn is_empty(&self) -> bool {
        self.codecs.is_empty()
    }

    /// The codec named (by its name or its folder's name), or the default for an empty name.
    pub fn get(&self, name: &str) -> Option<&Arc<Firefly>> {
        if name.is_empty() {
            return self.codecs.get(&self.default);
        }
        self.codecs.get(name).or_else(|| {
            self.codecs
                .iter()
                .find(|(k, _)| {
                    std::path::Path::new(k)
                        .file_name()
                        .is_some_and(|f| f == name)
                })
                .map(|(_, v)| v)
        })
    }
}

/// Code frames turned into audio per chunk of a segment's reply.
pub const CODE_CHUNK_FRAMES: usize = 25;

async fn run<B: Bus>(
    cfg: VocoderConfig,
    bus: B,
    (voices, codecs): (Voices, Codecs),
    listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let server = match listener {
        Some(l) => {
            let grpc = GrpcServer::new(&[], cfg.fleet.drain).await;
            let health = grpc.health_handle();
            let stop = shutdown.clone();
            let task = nexus_core::task::spawn("vocoder-health", async move {
                grpc.serve(tonic_routes(), l, stop).await
            });
            Some((health, task))
        }
        None => None,
    };
    anyhow::ensure!(
        !voices.is_empty() || !codecs.is_empty(),
        "the vocoder has nothing to serve: give it a --voice or a --codec"
    );
    if cfg.fleet.admin.is_some() {
        let streams: Vec<&str> = [
            (!voices.is_empty()).then_some(stages::SYNTHESIZE),
            (!codecs.is_empty()).then_some(stages::CODES),
        ]
        .into_iter()
        .flatten()
        .collect();
        cfg.fleet.metrics.sample_streams(
            bus.clone(),
            &cfg.fleet.keys,
            &streams,
            Duration::from_secs(2),
            shutdown.clone(),
        );
    }
    // Only a vocoder with voices takes synthesis requests.
    let mut reader = if voices.is_empty() {
        None
    } else {
        Some(
            StageReader::for_stage(
                bus.clone(),
                &cfg.fleet,
                stages::SYNTHESIZE,
                stages::VOCODER_GROUP,
                &shutdown,
            )
            .await
            .context("joining the synthesize stream")?,
        )
    };
    let ttl = Duration::from_secs(cfg.args.result_ttl_s.max(1));
    let fresh = cfg.fleet.claim_idle / 3;
    let codes_task = if codecs.is_empty() {
        None
    } else {
        let reader = StageReader::for_stage(
            bus.clone(),
            &cfg.fleet,
            stages::CODES,
            stages::VOCODER_GROUP,
            &shutdown,
        )
        .await
        .context("joining the codes stream")?;
        let (bus, keys, stop, codecs) = (
            bus.clone(),
            cfg.fleet.keys.clone(),
            shutdown.clone(),
            codecs.clone(),
        );
        Some(nexus_core::task::spawn("vocoder-codes", async move {
            serve_codes(reader, bus, keys, codecs, (ttl, fresh), stop).await;
            Ok::<(), std::convert::Infallible>(())
        }))
    };
    if let Some((health, _)) = &server {
        health.set_serving(true).await;
    }
    tracing::info!(node = %cfg.fleet.node, voices = ?voices.names(), codecs = ?codecs, "vocoder ready");
    let limit = Arc::new(tokio::sync::Semaphore::new(cfg.args.concurrency.max(1)));
    let mut running = tokio::task::JoinSet::new();
    loop {
        let Some(reader) = reader.as_mut() else {
            shutdown.cancelled().await;
            break;
        };
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
    let _ = tokio::time::timeout(cfg.fleet.drain.grace, async {
        while running.join_next().await.is_some() {}
    })
    .await;
    if let Some(t) = codes_task {
        let _ = tokio::time::timeout(cfg.fleet.drain.grace, t).await;
    }
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
        let key = format!("chunk:{}", chunk.index);
        let log = log.clone();
        async move { append_once(bus, &log, &key, &chunk, ttl).await }
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
    let gap = voice.sentence_gap();
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

/// Turns speech codes into audio chunks in their session's result log.
async fn serve_codes<B: Bus>(
    mut reader: StageReader<B>,
    bus: B,
    keys: nexus_bus::Keys,
    codecs: Codecs,
    (ttl, fresh): (Duration, Duration),
    shutdown: CancellationToken,
) {
    while let Some(batch) = reader.next(1, Duration::from_secs(1), &shutdown).await {
        for e in batch {
            let codes = match decode::<SpeechCodes>(&e.fields) {
                Ok(c) => c,
                Err(err) => {
                    tracing::error!(id = %e.id, error = %err, "unreadable codes entry dropped");
                    reader.ack(&[e.id]).await;
                    continue;
                }
            };
            let _fresh = reader.acker().keep_fresh(vec![e.id], fresh);
            if speak_codes(&bus, &keys, &codecs, codes, ttl).await {
                reader.ack(&[e.id]).await;
            }
        }
    }
}

/// Decodes one segment's codes in chunks; false when its log could not be written.
async fn speak_codes<B: Bus>(
    bus: &B,
    keys: &nexus_bus::Keys,
    codecs: &Codecs,
    codes: SpeechCodes,
    ttl: Duration,
) -> bool {
    let env = codes.envelope.clone().unwrap_or_default();
    let Ok(session) = SessionId::parse(&env.session_id) else {
        tracing::error!("codes entry with a bad session id dropped");
        return true;
    };
    let log = keys.results(&session);
    let segment = env.segment_id;
    let write = |chunk: u32, audio: Vec<u8>, rate: u32, is_last: bool, error: String| {
        let msg = DecodeResult {
            envelope: Some(Envelope {
                emitted_unix_ms: now_unix_ms(),
                ..env.clone()
            }),
            speech: Some(SpeechAudio {
                segment_id: segment,
                chunk,
                audio: audio.into(),
                sample_rate_hz: rate,
                is_last,
                error,
            }),
            ..Default::default()
        };
        let (log, key) = (log.clone(), format!("speech:{segment}:{chunk}"));
        async move { append_once(bus, &log, &key, &msg, ttl).await.is_ok() }
    };
    let k = codes.num_codebooks as usize;
    let f = codes.frames as usize;
    let problem = match codecs.get(&codes.vocoder) {
        None => Some(format!(
            "codec {:?} is not served by this vocoder ({codecs:?})",
            codes.vocoder
        )),
        Some(_) if k == 0 || codes.codes.len() != k * f => Some(format!(
            "{} codes for {k} codebooks × {f} frames",
            codes.codes.len()
        )),
        Some(c) if c.codebooks() != k => {
            Some(format!("{k} codebooks for a codec of {}", c.codebooks()))
        }
        Some(_) => None,
    };
    if let Some(p) = problem {
        tracing::error!(session = %session, segment, error = %p, "speech codes cannot be spoken");
        return write(0, Vec::new(), 0, true, p).await;
    }
    let Some(codec) = codecs.get(&codes.vocoder).cloned() else {
        return true;
    };
    let rate = codec.sample_rate();
    // Codebook-major → frames × codebooks.
    let frames: Vec<Vec<u32>> = (0..f)
        .map(|t| (0..k).map(|c| codes.codes[c * f + t]).collect())
        .collect();
    let mut stream = FireflyStream::new(codec);
    let chunks: Vec<Vec<Vec<u32>>> = frames
        .chunks(CODE_CHUNK_FRAMES)
        .map(<[Vec<u32>]>::to_vec)
        .collect();
    let n = chunks.len().max(1);
    if chunks.is_empty() {
        return write(0, Vec::new(), rate, true, String::new()).await;
    }
    for (i, part) in chunks.into_iter().enumerate() {
        let mut s = stream.clone();
        let out = tokio::task::spawn_blocking(move || s.push(&part).map(|w| (w, s))).await;
        let (audio, error) = match out
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            Ok((wave, s)) => {
                stream = s;
                (nexus_audio::wav::pcm16_le(&wave), String::new())
            }
            Err(e) => (Vec::new(), format!("decoding speech codes: {e}")),
        };
        let last = i + 1 == n || !error.is_empty();
        if !write(i as u32, audio, rate, last, error).await {
            return false;
        }
        if last {
            break;
        }
    }
    true
}

/// Appends `msg` to `log` once under `key` (a redelivery finds it there),
/// retrying through bus outages for a minute.
async fn append_once<B: Bus, M: nexus_bus::StreamMessage>(
    bus: &B,
    log: &str,
    key: &str,
    msg: &M,
    ttl: Duration,
) -> Result<(), nexus_bus::BusError> {
    let fields: nexus_bus::Fields = encode(msg)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let never = CancellationToken::new();
    retry(
        "write to a result log",
        Duration::from_secs(60),
        &never,
        || bus.add_unique(log, key, fields.clone(), ttl),
    )
    .await
    .map(|_| ())
}
