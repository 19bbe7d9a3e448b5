//! The ingest stage: the public `nexus.speech.v1.SpeechRecognition` API.
//!
//! A StreamingRecognize call is validated, then admitted against the decoder
//! pool's advertised capacity (RESOURCE_EXHAUSTED at once when it is full,
//! UNAVAILABLE when no decoder runs). Its audio is decoded to 16 kHz mono, the
//! Silero VAD and the endpointer cut it into utterances, and each utterance goes
//! to the encoder stage as interim windows while it grows and one final window
//! at its end. Results come back from the session's own log; interim text is
//! stabilised by local agreement before the client sees it.

mod agreement;
mod audio_in;
pub mod auth;
mod bounds;
mod catalog;
mod http;
pub mod jobs;
pub mod metrics;
mod models;
mod realtime;
mod recognize;
mod resume;
mod rooms;
mod session;
mod speakers;
mod synthesis;
pub mod tls;
mod transcript;
mod translate;
pub mod webrtc;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use nexus_audio::{AudioLimits, EndpointConfig};
use nexus_bus::{Bus, Holder, Lease, SessionId};
use nexus_core::grpc::GrpcServer;
use nexus_fleet::{Fleet, Process, stages};
use nexus_models::vad::SileroVad;
use nexus_proto::speech::models_server::ModelsServer;
use nexus_proto::speech::speech_recognition_server::{SpeechRecognition, SpeechRecognitionServer};
use nexus_proto::speech::speech_synthesis_server::SpeechSynthesisServer;
use nexus_proto::speech::streaming_recognize_request::StreamingRequest;
use nexus_proto::speech::transcription_jobs_server::TranscriptionJobsServer;
use nexus_proto::speech::translation_server::TranslationServer;
use nexus_proto::speech::{
    Capability, RecognitionConfig, RecognizeRequest, RecognizeResponse, StreamingRecognitionConfig,
    StreamingRecognizeRequest, StreamingRecognizeResponse, Task,
};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

pub use agreement::Agreement;

/// Name of the main service this stage hosts.
pub const SERVICE: &str = "nexus.speech.v1.SpeechRecognition";
/// Every service this stage hosts.
pub const SERVICES: &[&str] = &[
    SERVICE,
    "nexus.speech.v1.Models",
    "nexus.speech.v1.Translation",
    "nexus.speech.v1.SpeechSynthesis",
    "nexus.speech.v1.TranscriptionJobs",
];

/// Settings of the ingest stage.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestArgs {
    /// Live sessions this ingest replica holds at most.
    #[arg(
        long = "ingest-sessions",
        env = "NEXUS_INGEST_SESSIONS",
        default_value_t = 256
    )]
    pub max_sessions: usize,
    /// Fraction (0-1) of the decoder pool's live-session slots kept, where
    /// the keys file names several tenants, for tenants holding less than
    /// their fair share (the pool's capacity over the tenants holding slots
    /// plus one): one tenant fills the pool but for this reserve, so another
    /// arriving still gets in (0: first come, first served).
    #[arg(long, env = "NEXUS_POOL_RESERVE", default_value_t = 0.25, value_parser = parse_fraction)]
    pub pool_reserve: f32,
    /// A session's decoder slot lease; renewed every third of it.
    #[arg(long, env = "NEXUS_LEASE_TTL_MS", default_value_t = 10_000)]
    pub lease_ttl_ms: u64,
    /// How long a session waits out an unreachable bus before failing with UNAVAILABLE.
    #[arg(long, env = "NEXUS_BUS_RETRY_MS", default_value_t = 15_000)]
    pub bus_retry_ms: u64,
    /// How long after its audio ends a session waits for its final results.
    #[arg(long, env = "NEXUS_FINAL_TIMEOUT_MS", default_value_t = 60_000)]
    pub final_timeout_ms: u64,
    /// How long a live session whose client dropped waits to be resumed (0: it ends at once).
    #[arg(long, env = "NEXUS_RESUME_GRACE_MS", default_value_t = 30_000)]
    pub resume_grace_ms: u64,
    /// Longest live session, in minutes: at this length the utterance in
    /// progress is finalised, its final delivered, and the session ends with
    /// OUT_OF_RANGE. Live streams are bounded by duration, not bytes.
    #[arg(long, env = "NEXUS_MAX_SESSION_MINUTES", default_value_t = 240)]
    pub max_session_minutes: u64,
    /// A live session that receives no audio for this long (ms) is finalised
    /// and ends with DEADLINE_EXCEEDED, freeing its slot (0: never).
    #[arg(long, env = "NEXUS_IDLE_TIMEOUT_MS", default_value_t = 30_000)]
    pub idle_timeout_ms: u64,
    /// How long a WebSocket client (/v1/realtime) may leave an event unread
    /// before it is disconnected; its session then waits to be resumed.
    #[arg(long, env = "NEXUS_CLIENT_WRITE_TIMEOUT_MS", default_value_t = 10_000)]
    pub client_write_timeout_ms: u64,
    /// Fastest a live session's audio is read, as a multiple of real time,
    /// after its first `--live-burst-s` seconds: a sender that is faster is
    /// slowed by flow control, so one stream cannot do a batch job's work.
    #[arg(long, env = "NEXUS_LIVE_MAX_SPEED", default_value_t = 4.0)]
    pub live_max_speed: f64,
    /// Audio a live session may send ahead of `--live-max-speed`, in seconds.
    #[arg(long, env = "NEXUS_LIVE_BURST_S", default_value_t = 60)]
    pub live_burst_s: u64,
    /// Audio before an utterance (after its pre-roll) that its final's
    /// window also carries, in ms, as far back as the previous utterance's
    /// end: Whisper misreads words that begin right at a window's start
    /// (BENCHMARKS.md, "Where the live WER goes"). 0 starts finals at the
    /// pre-roll.
    #[arg(long, env = "NEXUS_FINAL_LEAD_MS", default_value_t = 700, value_parser = clap::value_parser!(u64).range(0..=5_000))]
    pub final_lead_ms: u64,
    /// Largest audio a Recognize call may carry, in MiB.
    #[arg(long, env = "NEXUS_MAX_AUDIO_MB", default_value_t = 100)]
    pub max_audio_mb: u64,
    /// Folder whose files Recognize may read through `file://` URIs; none when unset.
    #[arg(long, env = "NEXUS_FILE_ROOT")]
    pub file_root: Option<std::path::PathBuf>,
    /// API keys file (TOML: SHA-256 digests of keys, their tenants and limits);
    /// without it the API is open and refuses to listen beyond loopback.
    #[arg(long, env = "NEXUS_API_KEYS")]
    pub api_keys: Option<std::path::PathBuf>,
    /// Serve without API keys on a non-loopback address (behind a gateway that authenticates).
    #[arg(long, env = "NEXUS_ALLOW_OPEN")]
    pub allow_open: bool,
    /// Address of the OpenAI-compatible HTTP API; `none` leaves it off.
    #[arg(long, env = "NEXUS_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: String,
    /// Calls one tenant may have in progress when the keys file sets no limit (0: unbounded).
    #[arg(long, env = "NEXUS_TENANT_MAX_CONCURRENT", default_value_t = 0)]
    pub tenant_max_concurrent: u32,
    /// Calls one tenant may start per minute when the keys file sets no limit (0: unbounded).
    #[arg(long, env = "NEXUS_TENANT_RPM", default_value_t = 0)]
    pub tenant_requests_per_minute: u32,
    /// PEM certificate chain: the gRPC and HTTP APIs speak TLS (needs --tls-key).
    #[arg(long, env = "NEXUS_TLS_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "NEXUS_TLS_KEY")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Settings of the batch job runner.
    #[command(flatten)]
    pub jobs: jobs::JobArgs,
    /// Settings of live captioning over WebRTC.
    #[command(flatten)]
    pub webrtc: webrtc::WebRtcArgs,
}

impl Default for IngestArgs {
    fn default() -> Self {
        Self {
            max_sessions: 256,
            pool_reserve: 0.25,
            lease_ttl_ms: 10_000,
            bus_retry_ms: 15_000,
            final_timeout_ms: 60_000,
            resume_grace_ms: 30_000,
            max_session_minutes: 240,
            idle_timeout_ms: 30_000,
            client_write_timeout_ms: 10_000,
            live_max_speed: 4.0,
            live_burst_s: 60,
            final_lead_ms: 700,
            max_audio_mb: 100,
            file_root: None,
            api_keys: None,
            allow_open: false,
            http_listen: "none".into(),
            tenant_max_concurrent: 0,
            tenant_requests_per_minute: 0,
            jobs: jobs::JobArgs::default(),
            webrtc: webrtc::WebRtcArgs::default(),
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// Everything the ingest stage runs with.
#[derive(Debug, Clone)]
struct IngestConfig {
    /// Shared fleet settings.
    fleet: Fleet,
    /// Stage settings.
    args: IngestArgs,
    /// Whisper models the fleet's encoders and decoders serve; the first is the default.
    models: Vec<String>,
    /// Voices the fleet's vocoders serve; the first is the default. Empty: no synthesis.
    voices: Vec<String>,
}

/// What the rest of the fleet serves, as far as ingest must know to route
/// and check requests.
#[derive(Debug, Clone, Default)]
pub struct FleetOffer {
    /// Voices the fleet's vocoders serve; the first is the default. Empty: no synthesis.
    pub voices: Vec<String>,
}

/// The ingest stage, built: what `nexus-ingest` and `nexus serve` run.
pub struct IngestStage {
    cfg: IngestConfig,
    vad: Arc<SileroVad>,
    speaker: Option<Arc<nexus_models::speaker::SpeakerEncoder>>,
    shutdown: CancellationToken,
}

impl IngestStage {
    /// The ingest of `process`: the Silero VAD (on the CPU) and the speaker
    /// encoder when pulled. What the models can do is read from the
    /// decoders' catalog on the bus as requests come.
    pub async fn build(
        process: &Process,
        args: IngestArgs,
        offer: FleetOffer,
    ) -> anyhow::Result<Self> {
        let home = process.home();
        let vad = {
            let home = home.clone();
            tokio::task::spawn_blocking(move || {
                anyhow::Ok(SileroVad::load(
                    &nexus_fleet::models::resolve_vad(home)?,
                    &candle_core::Device::Cpu,
                )?)
            })
            .await??
        };
        // The speaker encoder, when pulled: diarization of whole audio runs
        // here, beside the VAD whose speech regions it reads.
        let speaker = match nexus_fleet::models::resolve_speaker_encoder(home) {
            Some(dir) => Some(Arc::new(
                tokio::task::spawn_blocking(move || {
                    nexus_models::speaker::SpeakerEncoder::load(&dir, &candle_core::Device::Cpu)
                })
                .await??,
            )),
            None => None,
        };
        Ok(Self {
            cfg: IngestConfig {
                fleet: process.fleet("ingest")?,
                models: process.model_names().to_vec(),
                voices: offer.voices.into_iter().filter(|v| !v.is_empty()).collect(),
                args,
            },
            vad: Arc::new(vad),
            speaker,
            shutdown: process.shutdown.clone(),
        })
    }

    /// Runs until the process shuts down: the gRPC API on `grpc` and the
    /// HTTP API on `--http-listen`; live sessions finish their current
    /// utterance and receive their finals within the drain grace.
    pub async fn run<B: Bus>(self, bus: B, grpc: TcpListener) -> anyhow::Result<()> {
        let listeners = Listeners {
            grpc,
            http: self.cfg.args.bind_http().await?,
        };
        if let Some(h) = &listeners.http {
            println!(
                "nexus HTTP API (OpenAI-compatible) on http://{}",
                h.local_addr()?
            );
        }
        run(
            self.cfg,
            bus,
            self.vad,
            self.speaker,
            listeners,
            self.shutdown,
        )
        .await
    }
}

pub(crate) struct Settings {
    pub(crate) fleet: Fleet,
    pub(crate) lease_ttl: Duration,
    /// Share of the decoder pool kept for tenants below their fair share:
    /// `--pool-reserve` where the keys name several tenants, else 0.
    pub(crate) pool_reserve: f32,
    pub(crate) bus_retry: Duration,
    pub(crate) final_timeout: Duration,
    pub(crate) resume_grace: Duration,
    pub(crate) drain_grace: Duration,
    /// Longest live session.
    pub(crate) max_session: Duration,
    /// Longest a live session may go without audio; zero: no bound.
    pub(crate) idle_timeout: Duration,
    /// Longest a WebSocket client may leave an event unread.
    pub(crate) client_write_timeout: Duration,
    /// Fastest live audio is read after the burst, × real time.
    pub(crate) live_max_speed: f64,
    /// Audio a live session may send ahead of that pace.
    pub(crate) live_burst: Duration,
    /// Audio before an utterance that its final's window carries.
    pub(crate) final_lead: Duration,
    pub(crate) models: Vec<String>,
    pub(crate) voices: Vec<String>,
    pub(crate) file_root: Option<std::path::PathBuf>,
}

pub(crate) struct Inner<B: Bus> {
    pub(crate) cfg: Settings,
    pub(crate) bus: B,
    /// What the decoders' models can do, as they advertise it.
    pub(crate) catalog: catalog::Catalog,
    pub(crate) vad: Arc<SileroVad>,
    /// The GE2E encoder, when pulled (`nexus models pull ge2e`).
    pub(crate) speaker: Option<Arc<nexus_models::speaker::SpeakerEncoder>>,
    pub(crate) sessions: Arc<Semaphore>,
    pub(crate) max_sessions: usize,
    pub(crate) shutdown: CancellationToken,
    pub(crate) limits: AudioLimits,
    pub(crate) access: auth::Access,
    pub(crate) jobs: jobs::JobArgs,
    /// Resumable sessions running on this replica, by id: their tenant and
    /// the way to hand them a resumed call.
    pub(crate) resumable: std::sync::Mutex<std::collections::HashMap<String, Parked>>,
    /// WebRTC sessions and caption rooms.
    pub(crate) webrtc: webrtc::WebRtc,
    /// What the admin port reports.
    pub(crate) metrics: Arc<metrics::IngestMetrics>,
    /// Syntheses this replica follows at once.
    pub(crate) synthesis_slots: Arc<Semaphore>,
    /// Threads at background priority for a whole recording's preparation
    /// (decoding, voice activity, speakers): live sessions' audio goes first.
    pub(crate) background: Arc<rayon::ThreadPool>,
}

pub(crate) type Parked = (String, mpsc::Sender<session::Reattach>);

impl<B: Bus> Inner<B> {
    /// Runs `work` for a whole recording on the background threads, off the
    /// async runtime.
    pub(crate) fn in_background<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        let pool = self.background.clone();
        tokio::task::spawn_blocking(move || pool.install(work))
    }

    /// Gives the decoder-pool slot of `id` back; when that fails, the lease
    /// lapses by its TTL.
    pub(crate) async fn release_slot(&self, id: &SessionId, tenant: &str) {
        let pool = self.cfg.fleet.keys.pool(stages::DECODER_POOL);
        let holder = Holder {
            tenant,
            id: id.as_str(),
        };
        if let Err(e) = self.bus.release(&pool, holder).await {
            tracing::warn!(id = %id, error = %e, "releasing a decoder slot failed; its lease expires");
        }
    }

    /// Queues audio for the encoders, riding out bus outages and a full
    /// audio stage for up to `--bus-retry-ms`; the last error after that
    /// (`BusError::Full` when the stage stayed full).
    pub(crate) async fn queue_audio(
        &self,
        fields: nexus_bus::Fields,
    ) -> Result<(), nexus_bus::BusError> {
        let stream = stages::stream(&self.cfg.fleet.keys, stages::AUDIO);
        let limits = self.cfg.fleet.limits;
        let budget = self.cfg.bus_retry;
        let never = CancellationToken::new();
        let t0 = std::time::Instant::now();
        loop {
            let left = budget.saturating_sub(t0.elapsed());
            match nexus_fleet::retry("queue audio", left, &never, || {
                self.bus.add(&stream, fields.clone(), limits)
            })
            .await
            {
                Ok(_) => return Ok(()),
                Err(nexus_bus::BusError::Full { backlog, .. }) if t0.elapsed() < budget => {
                    tracing::debug!(backlog, "audio stage full; waiting");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The SpeechRecognition service of an ingest replica.
pub struct Ingest<B: Bus> {
    inner: Arc<Inner<B>>,
}

impl<B: Bus> Clone for Ingest<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl IngestArgs {
    /// Binds the HTTP API's listener, unless it is off.
    pub async fn bind_http(&self) -> anyhow::Result<Option<TcpListener>> {
        let a = self.http_listen.trim();
        if a.is_empty() || a == "none" {
            return Ok(None);
        }
        let l = TcpListener::bind(a)
            .await
            .map_err(|e| anyhow::anyhow!("binding the HTTP API on {a}: {e}"))?;
        Ok(Some(l))
    }
}

/// Where an ingest replica listens.
#[derive(Debug)]
struct Listeners {
    /// The gRPC API (and health).
    grpc: TcpListener,
    /// The OpenAI-compatible HTTP API; none to leave it off.
    http: Option<TcpListener>,
}

pub(crate) type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<StreamingRecognizeResponse, Status>> + Send>>;

/// The end of a transcript that conditions the next window
/// (`decoding.condition_on_previous_text`): its last 200 characters, as
/// Whisper's prompt keeps only the latest text anyway.
pub(crate) fn previous_text_tail(text: &str) -> String {
    const KEEP: usize = 200;
    let text = text.trim();
    let skip = text.chars().count().saturating_sub(KEEP);
    text.chars().skip(skip).collect()
}

/// Whether a config asks windows to be conditioned on the text before them.
pub(crate) fn conditions_on_previous_text(rc: &RecognitionConfig) -> bool {
    rc.decoding
        .as_ref()
        .is_some_and(|d| d.condition_on_previous_text)
}

pub(crate) fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}

impl<B: Bus> Ingest<B> {
    fn endpointing(cfg: &StreamingRecognitionConfig) -> Result<EndpointConfig, Status> {
        let mut e = EndpointConfig::default();
        let Some(c) = &cfg.endpointing else {
            return Ok(e);
        };
        let prob = |name: &str, v: f32| {
            if (0.0..=1.0).contains(&v) {
                Ok(v)
            } else {
                Err(invalid(format!(
                    "endpointing.{name} is {v}; use a value in 0..1"
                )))
            }
        };
        let most = |name: &str, v: u32, limit: u32| {
            if v > limit {
                Err(invalid(format!(
                    "endpointing.{name} is {v}; the limit is {limit}"
                )))
            } else {
                Ok(v)
            }
        };
        most("start_history_ms", c.start_history_ms, 10_000)?;
        most("stop_history_ms", c.stop_history_ms, 30_000)?;
        most("interim_interval_ms", c.interim_interval_ms, 30_000)?;
        most("pre_roll_ms", c.pre_roll_ms, 2_000)?;
        if c.start_history_ms > 0 {
            e.start_history_ms = c.start_history_ms.max(e.frame_ms);
        }
        if c.pre_roll_ms > 0 {
            e.pre_roll_ms = c.pre_roll_ms;
        }
        e.manual = c.manual;
        if c.start_threshold > 0.0 {
            e.start_threshold = prob("start_threshold", c.start_threshold)?;
        }
        if c.stop_history_ms > 0 {
            e.stop_history_ms = c.stop_history_ms.max(e.frame_ms);
        }
        if c.stop_threshold > 0.0 {
            e.silence_probability = prob("stop_threshold", c.stop_threshold)?;
            e.speech_probability = e.speech_probability.max(e.silence_probability);
        }
        if c.max_utterance_ms > 0 {
            if c.max_utterance_ms > 30_000 {
                return Err(invalid(format!(
                    "endpointing.max_utterance_ms is {}; the models take at most 30000",
                    c.max_utterance_ms
                )));
            }
            e.max_utterance_ms = c.max_utterance_ms.max(1_000);
        }
        if c.interim_interval_ms > 0 {
            e.interim_interval_ms = c.interim_interval_ms.max(200);
        }
        Ok(e)
    }

    /// The speaker counts and the encoder of a request that asks for
    /// diarization, checked: the counts' bounds, and that this server has
    /// the encoder. `None` when it does not ask.
    #[allow(clippy::type_complexity)]
    pub(crate) fn diarization(
        &self,
        rc: &RecognitionConfig,
    ) -> Result<
        Option<(
            nexus_models::speaker::SpeakerCount,
            Arc<nexus_models::speaker::SpeakerEncoder>,
        )>,
        Status,
    > {
        let Some(d) = rc.diarization.as_ref().filter(|d| d.enable) else {
            return Ok(None);
        };
        let nz = |v: u32| (v > 0).then_some(v as usize);
        let count = nexus_models::speaker::speaker_count(nz(d.min_speakers), nz(d.max_speakers))
            .map_err(|e| invalid(format!("diarization.{e}")))?;
        let encoder = self.inner.speaker.clone().ok_or_else(|| {
            Status::failed_precondition(
                "diarization needs the speaker encoder on this server: run `nexus models pull ge2e` and restart it",
            )
        })?;
        Ok(Some((count, encoder)))
    }

    /// Checks what a request asks of the models and fills in the default model;
    /// the error says what to change.
    pub(crate) async fn check_config(&self, rc: &mut RecognitionConfig) -> Result<(), Status> {
        let inner = &self.inner;
        bounds::check_recognition(rc)?;
        if rc.model.is_empty() {
            rc.model = inner.cfg.models[0].clone();
        }
        if !inner.cfg.models.contains(&rc.model) {
            return Err(invalid(format!(
                "model {:?} is not served here; use one of {:?}",
                rc.model, inner.cfg.models
            )));
        }
        // What the model can do, as the decoders that loaded it say. Before
        // any decoder has advertised it (none has started since the catalog
        // was last written), only what needs no model is checked here; a job
        // queued then that asks what the model cannot do fails at the decoder.
        let model = inner
            .catalog
            .model(&inner.bus, &inner.cfg.fleet.keys.catalog(), &rc.model)
            .await;
        let english_only = model.as_ref().is_some_and(|m| m.languages == ["en"]);
        if !rc.language.is_empty() && rc.language != "auto" {
            if nexus_models::whisper::tokenizer::language_code_known(&rc.language).is_none() {
                return Err(invalid(format!(
                    "language {:?} is not one Whisper knows; use an ISO 639-1 code such as en, de, zh, or leave it empty to detect",
                    rc.language
                )));
            }
            if english_only && rc.language != "en" {
                return Err(invalid(format!(
                    "model {} is English-only; use a multilingual model for {:?}",
                    rc.model, rc.language
                )));
            }
        }
        if self.diarization(rc)?.is_some() {
            // Speaker changes are placed at word boundaries.
            rc.enable_word_time_offsets = true;
        } else if rc
            .diarization
            .as_ref()
            .is_some_and(|d| d.min_speakers > 0 || d.max_speakers > 0)
        {
            return Err(invalid(
                "diarization.min_speakers/max_speakers are set but diarization.enable is false",
            ));
        }
        if rc.speech_output.as_ref().is_some_and(|s| s.enabled)
            && model.as_ref().is_some_and(|m| {
                !m.capabilities
                    .contains(&(Capability::SpeechSynthesis as i32))
            })
        {
            return Err(invalid(format!(
                "speech_output needs a NEXUS-O model with an audio decoder (it speaks); {} writes text only",
                rc.model
            )));
        }
        if rc.task == Task::Translate as i32 {
            let target = rc
                .translation
                .as_ref()
                .map(|t| t.target_language.clone())
                .unwrap_or_default();
            if target.is_empty() {
                return Err(invalid(
                    "task TRANSLATE needs config.translation.target_language",
                ));
            }
            let targets = model.as_ref().map(|m| m.translation_targets.as_slice());
            if targets.is_some_and(|t| !t.contains(&target) && t.iter().all(|t| t == "en")) {
                return Err(invalid(format!(
                    "translation into {target:?} needs a text translation model and none is configured; ask for target_language \"en\" with a multilingual model"
                )));
            }
            let known = match targets {
                Some(t) => t.contains(&target),
                None => target == "en" || nexus_models::qwen::language_name(&target).is_some(),
            };
            if !known {
                return Err(invalid(format!(
                    "target_language {target:?} is not supported; use an ISO 639-1 code"
                )));
            }
        }
        Ok(())
    }

    /// Takes one slot of the decoder pool for `id` of `tenant`:
    /// RESOURCE_EXHAUSTED at once when every slot is in use, or when only the
    /// reserve is left and the tenant holds its fair share; UNAVAILABLE when
    /// no decoder serves.
    pub(crate) async fn admit(
        &self,
        id: &SessionId,
        tenant: &str,
        model: &str,
    ) -> Result<(), Status> {
        let inner = &self.inner;
        let pool = inner.cfg.fleet.keys.pool(stages::DECODER_POOL);
        let holder = Holder {
            tenant,
            id: id.as_str(),
        };
        match inner
            .bus
            .lease(&pool, holder, inner.cfg.lease_ttl, inner.cfg.pool_reserve)
            .await
        {
            Ok(Lease::Granted { used, capacity }) => {
                tracing::info!(session = %id, used, capacity, model = %model, "session admitted");
            }
            Ok(Lease::Full { capacity }) => {
                inner.metrics.refused("decoder_pool_full");
                return Err(Status::resource_exhausted(format!(
                    "all {capacity} live-session slots of the decoder pool are in use; retry later"
                )));
            }
            Ok(Lease::OverShare {
                capacity,
                held,
                tenants,
            }) => {
                inner.metrics.refused("tenant_share");
                return Err(Status::resource_exhausted(format!(
                    "tenant {tenant:?} holds {held} of the decoder pool's {capacity} live-session slots, its fair share with {tenants} tenants active; the free slots left are kept for tenants below theirs (--pool-reserve); retry later"
                )));
            }
            Ok(Lease::NoCapacity) => {
                return Err(Status::unavailable(
                    "no decoder replica is serving; retry once one has started",
                ));
            }
            Err(e) => return Err(Status::unavailable(format!("admission failed: {e}; retry"))),
        }
        Ok(())
    }

    /// Checks a live session's settings; the recognition config with its
    /// defaults filled in, the audio decoder and the endpointer's settings.
    pub(crate) async fn check_stream(
        &self,
        cfg: &StreamingRecognitionConfig,
    ) -> Result<(RecognitionConfig, audio_in::AudioIn, EndpointConfig), Status> {
        let inner = &self.inner;
        let mut rc = cfg
            .config
            .clone()
            .ok_or_else(|| invalid("streaming_config.config is required"))?;
        if rc
            .diarization
            .as_ref()
            .is_some_and(|d| d.enable && d.min_speakers > 0)
        {
            return Err(invalid(
                "diarization.min_speakers applies to whole recordings; a live stream finds its speakers as they speak (max_speakers bounds them)",
            ));
        }
        self.check_config(&mut rc).await?;
        bounds::check_streaming(cfg)?;
        if rc.separate_recognition_per_channel {
            return Err(invalid(
                "separate_recognition_per_channel is not supported on streams yet; open one stream per channel",
            ));
        }
        let fmt = rc
            .audio_format
            .ok_or_else(|| invalid("config.audio_format is required for streams"))?;
        inner
            .limits
            .check_format(fmt.sample_rate_hz.max(8_000), fmt.channels.max(1))
            .map_err(|e| invalid(e.to_string()))?;
        let audio_in = audio_in::AudioIn::new(&fmt, &inner.limits.live()).map_err(invalid)?;
        let endpoint = Self::endpointing(cfg)?;
        Ok((rc, audio_in, endpoint))
    }

    async fn open(
        &self,
        cfg: StreamingRecognitionConfig,
        grant: auth::Grant,
    ) -> Result<(session::Session<B>, audio_in::AudioIn), Status> {
        let id = SessionId::parse(&uuid::Uuid::new_v4().to_string())
            .map_err(|e| Status::internal(e.to_string()))?;
        self.open_as(id, cfg, grant).await
    }

    /// Opens the live session `id`: checks its settings, takes a place on
    /// this replica and a slot of the decoder pool.
    pub(crate) async fn open_as(
        &self,
        id: SessionId,
        cfg: StreamingRecognitionConfig,
        grant: auth::Grant,
    ) -> Result<(session::Session<B>, audio_in::AudioIn), Status> {
        let inner = &self.inner;
        let (rc, audio_in, endpoint) = self.check_stream(&cfg).await?;
        let local = inner.sessions.clone().try_acquire_owned().map_err(|_| {
            inner.metrics.refused("replica_sessions_full");
            Status::resource_exhausted(format!(
                "this ingest replica holds its maximum of {} live sessions; retry later or on another replica",
                inner.max_sessions
            ))
        })?;
        self.admit(&id, &grant.tenant, &rc.model).await?;
        inner.metrics.session_started();
        let span = tracing::info_span!(
            "session",
            session.id = %id,
            tenant = %grant.tenant,
            model = %rc.model,
        );
        let session = session::Session {
            inner: inner.clone(),
            span,
            id,
            cfg,
            rc,
            endpoint,
            tenant: grant.tenant.clone(),
            _grant: grant,
            _local: local,
            resumable: true,
        };
        Ok((session, audio_in))
    }
}

#[tonic::async_trait]
impl<B: Bus> SpeechRecognition for Ingest<B> {
    async fn recognize(
        &self,
        request: Request<RecognizeRequest>,
    ) -> Result<Response<RecognizeResponse>, Status> {
        if self.inner.shutdown.is_cancelled() {
            return Err(Status::unavailable(
                "this ingest replica is draining; retry on another",
            ));
        }
        let grant = self.inner.access.admit_grpc(request.metadata())?;
        let span = tracing::info_span!("recognize", tenant = %grant.tenant);
        nexus_core::trace::follow_metadata(&span, request.metadata());
        let r = tracing::Instrument::instrument(
            self.recognize_audio(request.into_inner(), grant.tenant.clone()),
            span,
        )
        .await;
        self.inner
            .metrics
            .call("Recognize", r.as_ref().err().map(Status::code));
        if let Ok(done) = &r {
            self.inner
                .metrics
                .audio(false, done.audio_duration_ms as f64 / 1000.0);
        }
        Ok(Response::new(r?))
    }

    type StreamingRecognizeStream = ResponseStream;

    async fn streaming_recognize(
        &self,
        request: Request<Streaming<StreamingRecognizeRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        if self.inner.shutdown.is_cancelled() {
            return Err(Status::unavailable(
                "this ingest replica is draining; retry on another",
            ));
        }
        let tenant = self.inner.access.authenticate_grpc(request.metadata())?;
        let metadata = request.metadata().clone();
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            invalid("the stream ended before its first message; send streaming_config first")
        })?;
        let cfg = match first.streaming_request {
            Some(StreamingRequest::StreamingConfig(c)) => c,
            Some(StreamingRequest::Resume(r)) => return self.resume(r, tenant, inbound).await,
            Some(StreamingRequest::AudioContent(_) | StreamingRequest::Control(_)) | None => {
                return Err(invalid(
                    "the first message must carry streaming_config; audio follows it",
                ));
            }
        };
        let grant = self.inner.access.limit(tenant)?;
        let (session, audio_in) = self.open(cfg, grant).await?;
        nexus_core::trace::follow_metadata(&session.span, &metadata);
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(session.run(audio_in, Box::pin(inbound), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn run<B: Bus>(
    cfg: IngestConfig,
    bus: B,
    vad: Arc<SileroVad>,
    speaker: Option<Arc<nexus_models::speaker::SpeakerEncoder>>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        !cfg.models.is_empty(),
        "the ingest needs the list of served models"
    );
    anyhow::ensure!(
        cfg.args.live_max_speed.is_finite() && cfg.args.live_max_speed >= 1.0,
        "--live-max-speed is {}; use a number of at least 1 (times real time)",
        cfg.args.live_max_speed
    );
    let access = match &cfg.args.api_keys {
        Some(path) => auth::Access::load(path)?,
        None => auth::Access::open(auth::Limits {
            max_concurrent: cfg.args.tenant_max_concurrent,
            requests_per_minute: cfg.args.tenant_requests_per_minute,
        }),
    };
    if !access.requires_keys() && !cfg.args.allow_open {
        let mut addrs = vec![listeners.grpc.local_addr()?];
        if let Some(h) = &listeners.http {
            addrs.push(h.local_addr()?);
        }
        if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            anyhow::bail!(
                "refusing to serve the API without keys on {a}: give --api-keys FILE, listen on 127.0.0.1, or pass --allow-open when a gateway in front authenticates"
            );
        }
    }
    let listener = listeners.grpc;
    let tls = tls::TlsFiles::from_args(cfg.args.tls_cert.clone(), cfg.args.tls_key.clone())?;
    let mut grpc = GrpcServer::new(SERVICES, cfg.fleet.drain).await;
    if let Some(t) = &tls {
        grpc = grpc.with_tls(t.grpc()?);
    }
    let inner = Arc::new(Inner {
        cfg: Settings {
            fleet: cfg.fleet.clone(),
            lease_ttl: Duration::from_millis(cfg.args.lease_ttl_ms.max(300)),
            // The keys are fixed for the replica's life: whether tenants
            // share the pool is known now.
            pool_reserve: if access.tenants_share_pool() {
                cfg.args.pool_reserve
            } else {
                0.0
            },
            bus_retry: Duration::from_millis(cfg.args.bus_retry_ms),
            final_timeout: Duration::from_millis(cfg.args.final_timeout_ms),
            resume_grace: Duration::from_millis(cfg.args.resume_grace_ms),
            drain_grace: cfg.fleet.drain.grace,
            max_session: Duration::from_secs(cfg.args.max_session_minutes.max(1) * 60),
            idle_timeout: Duration::from_millis(cfg.args.idle_timeout_ms),
            client_write_timeout: Duration::from_millis(cfg.args.client_write_timeout_ms.max(100)),
            live_max_speed: cfg.args.live_max_speed,
            live_burst: Duration::from_secs(cfg.args.live_burst_s),
            final_lead: Duration::from_millis(cfg.args.final_lead_ms),
            models: cfg.models.clone(),
            voices: cfg.voices.clone(),
            file_root: cfg.args.file_root.clone(),
        },
        bus,
        catalog: catalog::Catalog::default(),
        vad,
        speaker,
        sessions: Arc::new(Semaphore::new(cfg.args.max_sessions)),
        max_sessions: cfg.args.max_sessions,
        background: Arc::new(
            nexus_core::priority::background_pool("ingest-bg")
                .map_err(|e| anyhow::anyhow!("building ingest's background thread pool: {e}"))?,
        ),
        shutdown: shutdown.clone(),
        limits: AudioLimits {
            max_bytes: cfg.args.max_audio_mb.max(1) << 20,
            ..AudioLimits::default()
        },
        access,
        jobs: cfg.args.jobs.clone(),
        resumable: Default::default(),
        webrtc: webrtc::WebRtc::new(cfg.args.webrtc.clone())?,
        metrics: Arc::new(metrics::IngestMetrics::new(cfg.fleet.metrics.clone())),
        synthesis_slots: synthesis::slots(),
    });
    if let Some(admin) = &cfg.fleet.admin {
        let m = inner.metrics.clone();
        admin.add(Arc::new(move || m.render()));
        let keys = &cfg.fleet.keys;
        inner.metrics.fleet.sample_streams(
            inner.bus.clone(),
            keys,
            &[stages::AUDIO, stages::JOBS, stages::JOBS_URGENT],
            Duration::from_secs(2),
            shutdown.clone(),
        );
    }
    let mut routes = tonic::service::RoutesBuilder::default();
    // Recognize carries whole files: the audio limit, not gRPC's 4 MB default,
    // bounds them. Up to twice the limit the call gets INVALID_ARGUMENT naming
    // it; beyond that the transport refuses the message (RESOURCE_EXHAUSTED).
    let max_message =
        usize::try_from(inner.limits.max_bytes.saturating_mul(2)).unwrap_or(usize::MAX);
    // With keys, a caller is authenticated from its metadata before the
    // transport reads a message body (a Recognize may carry 200 MiB).
    let check_key = {
        let inner = inner.clone();
        move |req: Request<()>| -> Result<Request<()>, Status> {
            if inner.access.requires_keys() {
                inner.access.authenticate_grpc(req.metadata())?;
            }
            Ok(req)
        }
    };
    routes.add_service(tonic::service::interceptor::InterceptedService::new(
        SpeechRecognitionServer::new(Ingest {
            inner: inner.clone(),
        })
        .max_decoding_message_size(max_message),
        check_key.clone(),
    ));
    routes.add_service(ModelsServer::new(models::ModelsService(Ingest {
        inner: inner.clone(),
    })));
    routes.add_service(TranslationServer::new(translate::TranslationService(
        Ingest {
            inner: inner.clone(),
        },
    )));
    routes.add_service(SpeechSynthesisServer::new(synthesis::SynthesisService(
        Ingest {
            inner: inner.clone(),
        },
    )));
    // A job carries its audio like Recognize does.
    routes.add_service(tonic::service::interceptor::InterceptedService::new(
        TranscriptionJobsServer::new(jobs::JobsService(Ingest {
            inner: inner.clone(),
        }))
        .max_decoding_message_size(max_message),
        check_key,
    ));
    let runner = tokio::spawn(jobs::run_jobs(
        Ingest {
            inner: inner.clone(),
        },
        shutdown.clone(),
    ));
    let http = match listeners.http {
        Some(l) => {
            let addr = l.local_addr()?;
            let app = http::router(Ingest {
                inner: inner.clone(),
            });
            let stop = shutdown.clone();
            tracing::info!(%addr, tls = tls.is_some(), "HTTP API listening");
            Some(match &tls {
                Some(t) => tokio::spawn(serve_http(t.http(l)?, app, stop)),
                None => {
                    use axum::serve::ListenerExt;
                    // Small messages (WebSocket events, SSE lines) leave at once,
                    // not after the peer's delayed ACK.
                    let l = l.tap_io(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                    tokio::spawn(serve_http(l, app, stop))
                }
            })
        }
        None => None,
    };
    grpc.set_serving(true).await;
    tracing::info!(models = ?cfg.models, keys = inner.access.requires_keys(), "ingest ready");
    grpc.serve(routes, listener, shutdown).await?;
    if let Some(h) = http {
        h.await??;
    }
    let _ = runner.await;
    Ok(())
}

/// Serves the HTTP API on `listener` (plain TCP or TLS) until `stop`.
async fn serve_http<L>(
    listener: L,
    app: axum::Router,
    stop: CancellationToken,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

/// A fraction from 0 to 1, for `--pool-reserve`.
fn parse_fraction(s: &str) -> Result<f32, String> {
    let v: f32 = s.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not a fraction from 0 to 1"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_proto::speech::EndpointingConfig;

    #[test]
    fn pool_reserve_is_a_fraction() {
        assert_eq!(parse_fraction(" 0.25"), Ok(0.25));
        let e = parse_fraction("1.5").unwrap_err();
        assert!(e.contains("not a fraction from 0 to 1"), "{e}");
        assert!(parse_fraction("NaN").is_err());
        assert!(parse_fraction("a quarter").is_err());
    }

    fn endpointing(e: EndpointingConfig) -> Result<EndpointConfig, Status> {
        Ingest::<nexus_bus::MemoryBus>::endpointing(&StreamingRecognitionConfig {
            endpointing: Some(e),
            ..Default::default()
        })
    }

    #[test]
    fn endpointing_durations_are_bounded_and_name_their_field() {
        let e = endpointing(EndpointingConfig {
            start_history_ms: u32::MAX,
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            e.message().contains("endpointing.start_history_ms") && e.message().contains("10000"),
            "{e:?}"
        );
        for (field, cfg) in [
            (
                "stop_history_ms",
                EndpointingConfig {
                    stop_history_ms: 30_001,
                    ..Default::default()
                },
            ),
            (
                "interim_interval_ms",
                EndpointingConfig {
                    interim_interval_ms: 30_001,
                    ..Default::default()
                },
            ),
            (
                "pre_roll_ms",
                EndpointingConfig {
                    pre_roll_ms: 2_001,
                    ..Default::default()
                },
            ),
            (
                "max_utterance_ms",
                EndpointingConfig {
                    max_utterance_ms: 30_001,
                    ..Default::default()
                },
            ),
        ] {
            let e = endpointing(cfg).unwrap_err();
            assert!(e.message().contains(field), "{field}: {e:?}");
        }
        let ok = endpointing(EndpointingConfig {
            pre_roll_ms: 500,
            manual: true,
            stop_history_ms: 30_000,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (ok.pre_roll_ms, ok.manual, ok.stop_history_ms),
            (500, true, 30_000)
        );
    }
}
