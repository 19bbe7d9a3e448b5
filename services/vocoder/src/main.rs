//! `nexus-vocoder`: the vocoder stage as its own process.

use std::net::SocketAddr;

use clap::Parser;
use nexus_bus::RedisBus;
use nexus_core::grpc::DrainOptions;
use nexus_core::telemetry::TelemetryArgs;
use nexus_fleet::FleetArgs;
use nexus_vocoder::{Codecs, VocoderArgs, VocoderConfig, Voices};

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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = nexus_core::telemetry::init(&cli.telemetry, "nexus-vocoder")?;
    let shutdown = nexus_core::shutdown::on_signals();
    let mut fleet = cli.fleet.resolve("vocoder")?;
    fleet.admin = cli.fleet.admin_port(&shutdown).await?;
    if let Some(admin) = &fleet.admin {
        admin.set_log_filter(telemetry.log_filter());
    }
    let device = nexus_models::parse_device(&cli.device)?;
    let (names, codec_names) = (cli.stage.voices.clone(), cli.stage.codecs.clone());
    let (voices, codecs) = tokio::task::spawn_blocking(move || {
        anyhow::Ok((
            Voices::load(&names, None, &device)?,
            Codecs::load(&codec_names, None, &device)?,
        ))
    })
    .await??;
    let bus = RedisBus::connect(&cli.redis).await?;
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    let cfg = VocoderConfig {
        fleet,
        args: cli.stage,
        drain: DrainOptions::default(),
    };
    nexus_vocoder::run(cfg, bus, (voices, codecs), Some(listener), shutdown).await
}
