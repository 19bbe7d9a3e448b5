//! `nexus-encoder`: the encoder stage as its own process.

use std::net::SocketAddr;

use clap::Parser;
use nexus_bus::RedisBus;
use nexus_core::grpc::DrainOptions;
use nexus_core::telemetry::TelemetryArgs;
use nexus_encoder::{EncoderArgs, EncoderConfig};
use nexus_fleet::{FleetArgs, ModelSet, StageProcessArgs};

/// The encoder stage: reads segmented audio from Redis, writes encoder features.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Address of the health endpoint (gRPC health and reflection).
    #[arg(long, env = "NEXUS_LISTEN", default_value = "0.0.0.0:50052")]
    listen: SocketAddr,
    #[command(flatten)]
    process: StageProcessArgs,
    #[command(flatten)]
    fleet: FleetArgs,
    #[command(flatten)]
    stage: EncoderArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = nexus_core::telemetry::init(&cli.telemetry, "nexus-encoder")?;
    let shutdown = nexus_core::shutdown::on_signals();
    let mut fleet = cli.fleet.resolve("encoder")?;
    fleet.admin = cli.fleet.admin_port(&shutdown).await?;
    if let Some(admin) = &fleet.admin {
        admin.set_log_filter(telemetry.log_filter());
    }
    let device = nexus_models::parse_device(&cli.process.device)?;
    let names = cli.process.models.clone();
    let models =
        tokio::task::spawn_blocking(move || ModelSet::load_on(&names, None, &device)).await??;
    let bus = RedisBus::connect(&cli.process.redis).await?;
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    let cfg = EncoderConfig {
        fleet,
        args: cli.stage,
        drain: DrainOptions::default(),
    };
    nexus_encoder::run(cfg, bus, models, Some(listener), shutdown).await
}
