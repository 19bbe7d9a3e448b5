//! `nexus translate`: text translation with the fleet's language model.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use nexus_models::qwen::Translator;

/// Translate text into another language.
#[derive(Debug, Args)]
pub struct TranslateArgs {
    /// The text to translate.
    #[arg(long)]
    text: String,
    /// Target language (ISO 639-1), e.g. `zh`, `en`, `de`.
    #[arg(long)]
    to: String,
    /// Source language; the model tells when absent.
    #[arg(long)]
    from: Option<String>,
    /// Names and terms to keep as written (repeat the flag for each).
    #[arg(long = "glossary", value_name = "TERM")]
    glossary: Vec<String>,
    /// Registry name of a GGUF chat model, or a `.gguf` path.
    #[arg(long, default_value = "qwen2.5-0.5b-instruct")]
    model: String,
    /// Where weights are kept.
    #[arg(long, env = "NEXUS_HOME")]
    home: Option<PathBuf>,
}

pub use nexus_weights::resolve::resolve_gguf;

/// Checks a target language before any model is loaded.
pub fn check_target(lang: &str) -> anyhow::Result<()> {
    if nexus_models::qwen::language_name(lang).is_none() {
        bail!(
            "target language {lang:?} is not supported; use an ISO 639-1 code such as en, zh, de, fr, es, ja, ko, ru"
        );
    }
    Ok(())
}

/// Runs `nexus translate`.
pub fn run(args: TranslateArgs) -> anyhow::Result<()> {
    check_target(&args.to)?;
    let file = resolve_gguf(&args.model, args.home)?;
    let mut t = Translator::load(&file, &candle_core::Device::Cpu)?;
    // Line by line and sentence by sentence: every line of the text comes back.
    let out = t.translate_long(&nexus_models::qwen::prompt::Spec {
        text: &args.text,
        source: args.from.as_deref(),
        target: &args.to,
        context: &[],
        glossary: &args.glossary,
    })?;
    if let Some(why) = out.failure {
        bail!(
            "the text could not be translated ({why}, after {} attempts)",
            out.attempts
        );
    }
    println!("{}", out.text);
    Ok(())
}
