//! `nexus serve`: the fleet. With no Redis, every stage runs in this process
//! over in-memory streams (the embedded default); with `--redis URL --role R`
//! this process runs one stage of a distributed fleet. Same code either way.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, ValueEnum};
use nexus_bus::{Bus, MemoryBus, RedisBus};
use nexus_core::grpc::DrainOptions;
use nexus_decoder::{DecoderArgs, DecoderConfig};
use nexus_encoder::{EncoderArgs, EncoderConfig};
use nexus_fleet::{FleetArgs, ModelSet};
use nexus_ingest::{IngestArgs, IngestConfig};
use nexus_models::vad::SileroVad;
use nexus_vocoder::{Codecs, VocoderArgs, VocoderConfig, Voices};
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
    /// GGUF model for translation into languages Whisper cannot target; none when empty.
    #[arg(long, env = "NEXUS_TRANSLATION_MODEL", default_value = "")]
    translation_model: String,
    /// Where weights are kept.
    #[arg(long, env = "NEXUS_HOME")]
    home: Option<PathBuf>,
    /// Seconds in-flight work gets to finish on SIGTERM.
    #[arg(long, env = "NEXUS_DRAIN_GRACE_S", default_value_t = 25)]
    drain_grace_s: u64,
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

/// Runs the command.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let shutdown = nexus_core::shutdown::on_signals();
    match (&args.redis, args.role) {
        (None, Role::All) => {
            tracing::info!("embedded fleet: every stage in this process, in-memory streams");
            run_roles(&args, MemoryBus::new(), shutdown).await
        }
        (None, role) => {
            anyhow::bail!("--role {role:?} runs one stage of a fleet and needs --redis URL")
        }
        (Some(url), _) => {
            let bus = RedisBus::connect(url)
                .await
                .with_context(|| format!("connecting to {url}"))?;
            run_roles(&args, bus, shutdown).await
        }
    }
}

async fn run_roles<B: Bus>(
    args: &ServeArgs,
    bus: B,
    shutdown: nexus_core::CancellationToken,
) -> anyhow::Result<()> {
    // One admin port for every stage of this process.
    let admin = args.fleet.admin_port(&shutdown).await?;
    let resolve = |role: &str| -> anyhow::Result<nexus_fleet::Fleet> {
        let mut f = args.fleet.resolve(role)?;
        f.admin = admin.clone();
        Ok(f)
    };
    let drain = DrainOptions {
        grace: std::time::Duration::from_secs(args.drain_grace_s),
        ..DrainOptions::default()
    };
    let role = args.role;
    let needs_models = matches!(role, Role::All | Role::Encoder | Role::Decoder);
    let models = if needs_models {
        let (names, home) = (args.models.clone(), args.home.clone());
        Some(tokio::task::spawn_blocking(move || ModelSet::load(&names, home)).await??)
    } else {
        None
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let mut tasks = tokio::task::JoinSet::new();
    let mut listener = Some(listener);
    // Voices for speech synthesis. The embedded fleet speaks when the voice
    // is on this machine and says why not otherwise.
    let voices = if matches!(role, Role::All | Role::Vocoder) {
        let (names, home) = (args.vocoder.voices.clone(), args.home.clone());
        let loaded = tokio::task::spawn_blocking(move || {
            Voices::load(&names, home, &candle_core::Device::Cpu)
        })
        .await?;
        match (loaded, role) {
            (Ok(v), _) => Some(v),
            (Err(e), Role::All) => {
                tracing::warn!(error = %format!("{e:#}"), "speech synthesis is off");
                None
            }
            (Err(e), _) => return Err(e),
        }
    } else {
        None
    };
    let codecs = if matches!(role, Role::All | Role::Vocoder) {
        let (names, home) = (args.vocoder.codecs.clone(), args.home.clone());
        tokio::task::spawn_blocking(move || Codecs::load(&names, home, &candle_core::Device::Cpu))
            .await??
    } else {
        Codecs::default()
    };
    let v = voices.clone().unwrap_or_default();
    if !v.is_empty() || !codecs.is_empty() {
        let cfg = VocoderConfig {
            fleet: resolve("vocoder")?,
            args: args.vocoder.clone(),
            drain,
        };
        let l = if role == Role::Vocoder {
            listener.take()
        } else {
            None
        };
        let (bus, stop) = (bus.clone(), shutdown.clone());
        tasks.spawn(async move { nexus_vocoder::run(cfg, bus, (v, codecs), l, stop).await });
    }
    if matches!(role, Role::All | Role::Encoder) {
        let cfg = EncoderConfig {
            fleet: resolve("encoder")?,
            args: args.encoder.clone(),
            drain,
        };
        let l = if role == Role::Encoder {
            listener.take()
        } else {
            None
        };
        let (bus, models, stop) = (
            bus.clone(),
            models.clone().context("models")?,
            shutdown.clone(),
        );
        tasks.spawn(async move { nexus_encoder::run(cfg, bus, models, l, stop).await });
    }
    if matches!(role, Role::All | Role::Decoder) {
        let translator =
            nexus_decoder::load_translator(&args.translation_model, &candle_core::Device::Cpu)?;
        let cfg = DecoderConfig {
            fleet: resolve("decoder")?,
            args: args.decoder.clone(),
            drain,
            translator,
        };
        let l = if role == Role::Decoder {
            listener.take()
        } else {
            None
        };
        let (bus, models, stop) = (
            bus.clone(),
            models.clone().context("models")?,
            shutdown.clone(),
        );
        tasks.spawn(async move { nexus_decoder::run(cfg, bus, models, l, stop).await });
    }
    if matches!(role, Role::All | Role::Ingest) {
        let vad_path = nexus_fleet::models::resolve_vad(args.home.clone())?;
        let vad = Arc::new(SileroVad::load(&vad_path, &candle_core::Device::Cpu)?);
        let english_only = match &models {
            Some(m) => m
                .names()
                .into_iter()
                .filter(|n| m.get(n).is_some_and(|(_, e)| !e.tokenizer.multilingual))
                .collect(),
            None => nexus_fleet::models::english_only_by_name(&args.models),
        };
        let cfg = IngestConfig {
            fleet: resolve("ingest")?,
            args: args.ingest.clone(),
            drain,
            models: args.models.clone(),
            english_only,
            translation_model: (!args.translation_model.is_empty())
                .then(|| args.translation_model.clone()),
            self_translating: nexus_fleet::models::nexus_by_config(&args.models, args.home.clone()),
            voices: match (role, &voices) {
                (Role::All, Some(v)) => v.names(),
                (Role::All, None) => Vec::new(),
                _ => args.vocoder.voices.clone(),
            },
        };
        let l = nexus_ingest::Listeners {
            grpc: listener
                .take()
                .context("the listener went to another stage; this is a bug")?,
            http: args.ingest.bind_http().await?,
        };
        if let Some(h) = &l.http {
            println!(
                "nexus HTTP API (OpenAI-compatible) on http://{}",
                h.local_addr()?
            );
        }
        let (bus, stop) = (bus.clone(), shutdown.clone());
        tasks.spawn(async move { nexus_ingest::run(cfg, bus, vad, l, stop).await });
    }
    println!("nexus serving {:?} on {}", role, args.listen);
    let mut first_err = None;
    while let Some(r) = tasks.join_next().await {
        let r = r.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(e) = r {
            tracing::error!(error = %format!("{e:#}"), "a stage failed; stopping the others");
            shutdown.cancel();
            first_err.get_or_insert(e);
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
