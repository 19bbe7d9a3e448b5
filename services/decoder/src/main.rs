//! `nexus-decoder`: the decoder stage as its own process.

use std::net::SocketAddr;

use clap::Parser;
use nexus_bus::RedisBus;
use nexus_core::grpc::DrainOptions;
use nexus_core::telemetry::TelemetryArgs;
use nexus_decoder::{DecoderArgs, DecoderConfig};
use nexus_fleet::{FleetArgs, ModelSet, StageProcessArgs};

/// The decoder stage: reads encoder features from Redis, writes results to session logs.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Address of the health endpoint (gRPC health and reflection).
    #[arg(long, env = "NEXUS_LISTEN", default_value = "0.0.0.0:50053")]
    listen: SocketAddr,
    #[command(flatten)]
    process: StageProcessArgs,
    /// GGUF model for translation into languages Whisper cannot target; none when empty.
    #[arg(long, env = "NEXUS_TRANSLATION_MODEL", default_value = "")]
    translation_model: String,
    #[command(flatten)]
    fleet: FleetArgs,
    #[command(flatten)]
    stage: DecoderArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = nexus_core::telemetry::init(&cli.telemetry, "nexus-decoder")?;
    let shutdown = nexus_core::shutdown::on_signals();
    let mut fleet = cli.fleet.resolve("decoder")?;
    fleet.admin = cli.fleet.admin_port(&shutdown).await?;
    if let Some(admin) = &fleet.admin {
        admin.set_log_filter(telemetry.log_filter());
    }
    let device = nexus_models::parse_device(&cli.process.device)?;
    let names = cli.process.models.clone();
    let translator = nexus_decoder::load_translator(&cli.translation_model, &device)?;
    let models =
        tokio::task::spawn_blocking(move || ModelSet::load_on(&names, None, &device)).await??;
    let bus = RedisBus::connect(&cli.process.redis).await?;
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    let cfg = DecoderConfig {
        fleet,
        args: cli.stage,
        drain: DrainOptions::default(),
        translator,
    };
    nexus_decoder::run(cfg, bus, models, Some(listener), shutdown).await
}
