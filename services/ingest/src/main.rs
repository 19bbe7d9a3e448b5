//! `nexus-ingest`: the ingest stage (the public speech API) as its own process.

use std::net::SocketAddr;

use clap::Parser;
use nexus_core::telemetry::TelemetryArgs;
use nexus_fleet::{FleetArgs, StageProcessArgs};
use nexus_ingest::{FleetOffer, IngestArgs, IngestStage};

/// The ingest stage: serves StreamingRecognize, segments audio into Redis, returns results.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Address of the public gRPC API.
    #[arg(long, env = "NEXUS_LISTEN", default_value = "0.0.0.0:50051")]
    listen: SocketAddr,
    #[command(flatten)]
    process: StageProcessArgs,
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

fn main() -> anyhow::Result<()> {
    nexus_fleet::serving_runtime()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = nexus_core::telemetry::init(&cli.telemetry, "nexus-ingest")?;
    let (process, bus) = cli.process.start(&cli.fleet, &telemetry).await?;
    let offer = FleetOffer { voices: cli.voices };
    let stage = IngestStage::build(&process, cli.stage, offer).await?;
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    stage.run(bus, listener).await
}
