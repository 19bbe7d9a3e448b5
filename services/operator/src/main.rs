//! `nexus-operator`: the TranscriptionJob controller.

use clap::Parser;
use nexus_bus::{Keys, RedisBus};
use nexus_core::telemetry::TelemetryArgs;

/// Runs batch transcription jobs declared as `TranscriptionJob` resources.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The fleet's Redis (the job stream and job records).
    #[arg(long, env = "NEXUS_REDIS", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Key prefix of the fleet on that Redis (as the stages' --key-prefix).
    #[arg(long, env = "NEXUS_KEY_PREFIX", default_value = "nexus")]
    key_prefix: String,
    #[command(flatten)]
    operator: nexus_operator::Args,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = nexus_core::telemetry::init(&cli.telemetry, "nexus-operator")?;
    let keys = Keys::new(&cli.key_prefix)?;
    let shutdown = nexus_core::shutdown::on_signals();
    let admin = tokio::net::TcpListener::bind(cli.operator.admin_addr).await?;
    let bus = RedisBus::connect(&cli.redis).await?;
    let client = kube::Client::try_default().await?;
    let jobs = cli.operator.job_store(bus, keys);
    nexus_operator::run(client, cli.operator, jobs, admin, shutdown).await
}
