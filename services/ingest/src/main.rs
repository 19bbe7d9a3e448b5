//! `nexus-ingest`: the ingest stage (the public speech API) as its own process.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use nexus_bus::RedisBus;
use nexus_core::grpc::DrainOptions;
use nexus_core::telemetry::TelemetryArgs;
use nexus_fleet::{FleetArgs, StageProcessArgs};
use nexus_ingest::{IngestArgs, IngestConfig};
use nexus_models::vad::SileroVad;

/// The ingest stage: serves StreamingRecognize, segments audio into Redis, returns results.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Address of the public gRPC API.
    #[arg(long, env = "NEXUS_LISTEN", default_value = "0.0.0.0:50051")]
    listen: SocketAddr,
    #[command(flatten)]
    process: StageProcessArgs,
    /// The decoders' text translation model; none when empty.
    #[arg(long, env = "NEXUS_TRANSLATION_MODEL", default_value = "")]
    translation_model: String,
    /// Voices the fleet's vocoders serve (SpeechSynthesis); the first is the default; none when empty.
    #[arg(
        long = "voice",
        env = "NEXUS_VOICES",
        value_delimiter = ',',
        default_value = "piper-en-us-joe-medium"
    )]
    voices: Vec<String>,
    #[command(flatten)]
    fleet: FleetArgs,
    #[command(flatten)]
    stage: IngestArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = nexus_core::telemetry::init(&cli.telemetry, "nexus-ingest")?;
    let shutdown = nexus_core::shutdown::on_signals();
    let mut fleet = cli.fleet.resolve("ingest")?;
    fleet.admin = cli.fleet.admin_port(&shutdown).await?;
    if let Some(admin) = &fleet.admin {
        admin.set_log_filter(telemetry.log_filter());
    }
    let vad = Arc::new(SileroVad::load(
        &nexus_fleet::models::resolve_vad(None)?,
        &candle_core::Device::Cpu,
    )?);
    let bus = RedisBus::connect(&cli.process.redis).await?;
    let listeners = nexus_ingest::Listeners {
        grpc: tokio::net::TcpListener::bind(cli.listen).await?,
        http: cli.stage.bind_http().await?,
    };
    let cfg = IngestConfig {
        fleet,
        args: cli.stage,
        drain: DrainOptions::default(),
        english_only: nexus_fleet::models::english_only_by_name(&cli.process.models),
        self_translating: nexus_fleet::models::nexus_by_config(&cli.process.models, None),
        voices: cli.voices.into_iter().filter(|v| !v.is_empty()).collect(),
        models: cli.process.models,
        translation_model: (!cli.translation_model.is_empty()).then_some(cli.translation_model),
    };
    nexus_ingest::run(cfg, bus, vad, listeners, shutdown).await
}
