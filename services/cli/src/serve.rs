//! `nexus serve`: the fleet. With no Redis, every stage runs in this process
//! over in-memory streams (the embedded default); with `--redis URL --role R`
//! this process runs one stage of a distributed fleet. Each stage is built by
//! its own crate's builder, the same one its binary uses: this file only
//! chooses which stages run and which of them takes the listener.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use nexus_bus::{Bus, MemoryBus, RedisBus};
use nexus_core::telemetry::LogFilter;
use nexus_decoder::{DecoderArgs, DecoderStage};
use nexus_encoder::{EncoderArgs, EncoderStage};
use nexus_fleet::{FleetArgs, ModelArgs, Process};
use nexus_ingest::{FleetOffer, IngestArgs, IngestStage};
use nexus_vocoder::{MissingVoice, VocoderArgs, VocoderStage};
use tokio::net::TcpListener;

/// Which stages this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Every stage.
    All,
    /// The public API, audio decoding and segmentation.
    Ingest,
    /// Log-mel and the Whisper encoder.
    Encoder,
    /// The pooled decoder and translation.
    Decoder,
    /// Speech synthesis.
    Vocoder,
}

impl Role {
    fn runs(self, stage: Role) -> bool {
        self == Role::All || self == stage
    }
}

/// Serve live recognition.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Redis holding the fleet's streams; without it every stage runs in this
    /// process on in-memory streams.
    #[arg(long, env = "NEXUS_REDIS")]
    redis: Option<String>,
    /// Stages this process runs; one stage needs --redis.
    #[arg(long, value_enum, default_value = "all")]
    role: Role,
    /// Address to serve on: the public API (ingest), or health for other roles.
    #[arg(long, env = "NEXUS_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Whisper models to serve (registry names or folders); the first is the default.
    #[arg(
        long = "model",
        env = "NEXUS_MODELS",
        value_delimiter = ',',
        default_value = "base"
    )]
    models: Vec<String>,
    /// Where weights are kept.
    #[arg(long, env = "NEXUS_HOME")]
    home: Option<PathBuf>,
    /// Device the models run on: cpu, cuda or cuda:N (CUDA needs a build
    /// with `--features cuda`, scripts/build-cuda.sh).
    #[arg(long, env = "NEXUS_DEVICE", default_value = "cpu")]
    device: String,
    /// How Whisper's linear layers hold their weights: f32, f16 (GPUs only),
    /// or int8 (CPU only: Q8_0 blocks for token steps, a scale per output
    /// for the encoder's frames). Default: int8 on CPU, f16 on GPUs.
    /// NEXUS-O models run as stored.
    #[arg(long, env = "NEXUS_PRECISION")]
    precision: Option<nexus_models::Precision>,
    #[command(flatten)]
    fleet: FleetArgs,
    #[command(flatten)]
    ingest: IngestArgs,
    #[command(flatten)]
    encoder: EncoderArgs,
    #[command(flatten)]
    decoder: DecoderArgs,
    #[command(flatten)]
    vocoder: VocoderArgs,
}

/// Runs the command; `log` is the filter the admin port's `PUT /log` changes.
pub fn run(args: ServeArgs, log: LogFilter) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(args, log))
}

async fn serve(args: ServeArgs, log: LogFilter) -> anyhow::Result<()> {
    let shutdown = nexus_core::shutdown::on_signals();
    let device = nexus_models::parse_device(&args.device)?;
    let precision = nexus_models::Precision::for_device(args.precision, &device)?;
    let models = ModelArgs {
        names: args.models.clone(),
        home: args.home.clone(),
        precision,
        device,
    };
    let process = Process::start(&args.fleet, models, Some(log), shutdown).await?;
    match (&args.redis, args.role) {
        (None, Role::All) => {
            tracing::info!("embedded fleet: every stage in this process, in-memory streams");
            run_roles(&args, &process, MemoryBus::new()).await
        }
        (None, role) => {
            anyhow::bail!("--role {role:?} runs one stage of a fleet and needs --redis URL")
        }
        (Some(url), _) => {
            let bus = RedisBus::connect(url)
                .await
                .with_context(|| format!("connecting to {url}"))?;
            run_roles(&args, &process, bus).await
        }
    }
}

async fn run_roles<B: Bus>(args: &ServeArgs, process: &Process, bus: B) -> anyhow::Result<()> {
    let role = args.role;
    // Every stage is built (models loaded, once) before any listens.
    let vocoder = if role.runs(Role::Vocoder) {
        let missing = if role == Role::All {
            MissingVoice::Warn
        } else {
            MissingVoice::Fail
        };
        Some(VocoderStage::build(process, args.vocoder.clone(), missing).await?)
    } else {
        None
    };
    let encoder = if role.runs(Role::Encoder) {
        Some(EncoderStage::build(process, args.encoder.clone()).await?)
    } else {
        None
    };
    let decoder = if role.runs(Role::Decoder) {
        Some(DecoderStage::build(process, args.decoder.clone()).await?)
    } else {
        None
    };
    let ingest = if role.runs(Role::Ingest) {
        let offer = FleetOffer {
            // The embedded fleet offers the voices it loaded.
            voices: match &vocoder {
                Some(v) => v.voices(),
                None => args.vocoder.voices.clone(),
            },
        };
        Some(IngestStage::build(process, args.ingest.clone(), offer).await?)
    } else {
        None
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    // The listener serves the public API, or the health of the one stage.
    let mut listener = Some(listener);
    let mut health = |stage: Role| if role == stage { listener.take() } else { None };
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(v) = vocoder.filter(|v| !v.is_idle()) {
        let (bus, l) = (bus.clone(), health(Role::Vocoder));
        tasks.spawn(v.run(bus, l));
    }
    if let Some(e) = encoder {
        let (bus, l) = (bus.clone(), health(Role::Encoder));
        tasks.spawn(e.run(bus, l));
    }
    if let Some(d) = decoder {
        let (bus, l) = (bus.clone(), health(Role::Decoder));
        tasks.spawn(d.run(bus, l));
    }
    if let Some(i) = ingest {
        let l = listener
            .take()
            .context("the listener went to another stage; this is a bug")?;
        tasks.spawn(i.run(bus.clone(), l));
    }
    println!("nexus serving {:?} on {}", role, args.listen);
    let mut first_err = None;
    while let Some(r) = tasks.join_next().await {
        let r = r.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(e) = r {
            tracing::error!(error = %format!("{e:#}"), "a stage failed; stopping the others");
            process.shutdown.cancel();
            first_err.get_or_insert(e);
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
