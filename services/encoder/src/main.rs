//! `nexus-encoder`: the encoder stage as its own process.

use std::net::SocketAddr;

use clap::Parser;
use nexus_core::telemetry::TelemetryArgs;
use nexus_encoder::{EncoderArgs, EncoderStage};
use nexus_fleet::{FleetArgs, StageProcessArgs};

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

fn main() -> anyhow::Result<()> {
    nexus_fleet::serving_runtime()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = nexus_core::telemetry::init(&cli.telemetry, "nexus-encoder")?;
    let (process, bus) = cli.process.start(&cli.fleet, &telemetry).await?;
    let stage = EncoderStage::build(&process, cli.stage).await?;
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    stage.run(bus, Some(listener)).await
}
