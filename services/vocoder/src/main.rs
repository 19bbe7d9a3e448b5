//! `nexus-vocoder`: the vocoder stage as its own process.

use std::net::SocketAddr;

use clap::Parser;
use nexus_core::telemetry::TelemetryArgs;
use nexus_fleet::{FleetArgs, ModelArgs};
use nexus_vocoder::{MissingVoice, VocoderArgs, VocoderStage};

/// The vocoder stage: reads synthesis requests from Redis, writes audio to their result logs.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Address of the health endpoint (gRPC health and reflection).
    #[arg(long, env = "NEXUS_LISTEN", default_value = "0.0.0.0:50054")]
    listen: SocketAddr,
    /// Redis URL of the fleet's streams.
    #[arg(long, env = "NEXUS_REDIS", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Where the voices run: cpu, cuda or cuda:N.
    #[arg(long, env = "NEXUS_DEVICE", default_value = "cpu")]
    device: String,
    #[command(flatten)]
    fleet: FleetArgs,
    #[command(flatten)]
    stage: VocoderArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

fn main() -> anyhow::Result<()> {
    nexus_fleet::serving_runtime()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = nexus_core::telemetry::init(&cli.telemetry, "nexus-vocoder")?;
    // The vocoder serves no recognition model; its voices are its stage's.
    let models = ModelArgs {
        names: Vec::new(),
        home: None,
        device: nexus_models::parse_device(&cli.device)?,
        // No Whisper model here: the precision has nothing to apply to.
        precision: nexus_models::Precision::F32,
    };
    let (process, bus) =
        nexus_fleet::process::on_redis(&cli.redis, &cli.fleet, models, &telemetry).await?;
    let stage = VocoderStage::build(&process, cli.stage, MissingVoice::Fail).await?;
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    stage.run(bus, Some(listener)).await
}
