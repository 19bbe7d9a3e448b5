//! `nexus`: the embedded fleet and its tools in one binary.
//!
//! Subcommands appear here as the features behind them are built; there are no
//! placeholders. Without the `fleet` feature (the quickstart's build) it is the
//! transcription tool alone: `transcribe`, `translate`, `models`, `bench asr`.

mod bench;
#[cfg(feature = "fleet")]
mod bench_bus;
mod bench_diarize;
mod bench_translate;
#[cfg(feature = "fleet")]
mod bench_tts;
mod bench_whisper;
mod data;
mod gpu_check;
mod models;
#[cfg(feature = "fleet")]
mod serve;
mod status_line;
mod train;
mod train_eval;
mod transcribe;
mod translate;

use clap::{Parser, Subcommand};
use nexus_core::telemetry::{self, TelemetryArgs};

/// Nexus fleet: live captioning and speech translation.
#[derive(Debug, Parser)]
#[command(name = "nexus", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    telemetry: TelemetryArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve live recognition: every stage in this process, or one stage of a fleet.
    #[cfg(feature = "fleet")]
    Serve(Box<serve::ServeArgs>),
    /// List, fetch and convert model weights.
    Models(models::ModelsArgs),
    /// Transcribe or translate an audio file on this machine.
    Transcribe(transcribe::TranscribeArgs),
    /// Translate text with the fleet's language model.
    Translate(translate::TranslateArgs),
    /// Measure speed, memory and accuracy beside the reference engines.
    Bench(bench::BenchArgs),
    /// Make training data: synthesised speech from text.
    Data(data::DataArgs),
    /// Train NEXUS-mini's adapter on synthesised speech.
    Train(train::TrainArgs),
    /// Prove a device (a CUDA GPU) against the CPU's results and measure it.
    GpuCheck(gpu_check::GpuCheckArgs),
    /// API keys: print the digest under which the keys file stores a key.
    #[cfg(feature = "fleet")]
    #[command(subcommand)]
    Keys(KeysCommand),
}

/// `nexus keys`.
#[cfg(feature = "fleet")]
#[derive(Debug, clap::Subcommand)]
enum KeysCommand {
    /// Prints the SHA-256 digest of KEY for the `sha256` field of the keys file.
    Hash {
        /// The API key.
        key: String,
    },
    /// Makes a new random key and prints it with its keys-file entry.
    New {
        /// The tenant the key belongs to.
        #[arg(long)]
        tenant: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Before any thread starts (telemetry and the runtimes start some).
    #[cfg(feature = "fleet")]
    let serving = matches!(cli.command, Command::Serve(_));
    #[cfg(not(feature = "fleet"))]
    let serving = false;
    nexus_models::threads::settle_cpu_threads(if serving {
        nexus_models::threads::CpuUse::Serving
    } else {
        nexus_models::threads::CpuUse::Offline
    });
    let telemetry = telemetry::init(&cli.telemetry, "nexus")?;
    let done = match cli.command {
        #[cfg(feature = "fleet")]
        Command::Serve(args) => serve::run(*args, telemetry.log_filter()),
        Command::Models(args) => models::run(args),
        Command::Transcribe(args) => transcribe::run(args),
        Command::Translate(args) => translate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Data(args) => data::run(args),
        Command::Train(args) => train::run(args),
        Command::GpuCheck(args) => gpu_check::run(args),
        #[cfg(feature = "fleet")]
        Command::Keys(KeysCommand::Hash { key }) => {
            println!("{}", nexus_ingest::auth::hash_key(&key));
            Ok(())
        }
        #[cfg(feature = "fleet")]
        Command::Keys(KeysCommand::New { tenant }) => {
            let key = format!("nx-{}", uuid::Uuid::new_v4().simple());
            println!("key: {key}");
            println!(
                "\n[[keys]]\ntenant = {tenant:?}\nsha256 = \"{}\"",
                nexus_ingest::auth::hash_key(&key)
            );
            Ok(())
        }
    };
    // Spans still buffered are exported before the process exits.
    drop(telemetry);
    done
}
