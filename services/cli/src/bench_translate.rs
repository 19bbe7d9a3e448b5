//! `nexus bench translate`: text translation speed of the Qwen GGUF as
//! loaded for the fleet (slow block formats requantised to Q8_0) beside the
//! same file with its tensors as stored, on the same sentences and thread
//! count, with the outputs printed for a look at quality.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use nexus_models::qwen::Translator;

/// Options of `nexus bench translate`.
#[derive(Debug, Args)]
pub struct TranslateBenchArgs {
    /// Registry name of a GGUF chat model, or a `.gguf` path.
    #[arg(long, default_value = "qwen2.5-0.5b-instruct")]
    model: String,
    /// Target language.
    #[arg(long, default_value = "de")]
    to: String,
    /// Where weights are kept.
    #[arg(long, env = "NEXUS_HOME")]
    home: Option<PathBuf>,
}

const SENTENCES: [&str; 4] = [
    "Go forward ten meters.",
    "Thank you very much.",
    "The meeting starts at nine tomorrow morning in the large room.",
    "Please send me the slides before the end of the day.",
];

struct Run {
    load_s: f64,
    total_s: f64,
    tokens: usize,
    outputs: Vec<String>,
}

fn measure(t: &mut Translator, load_s: f64, to: &str) -> anyhow::Result<Run> {
    // One warm-up sentence: first-call allocations are not the model's speed.
    t.translate(SENTENCES[0], Some("en"), to)?;
    let start = Instant::now();
    let mut outputs = Vec::new();
    let mut tokens = 0;
    for s in SENTENCES {
        let out = t.translate(s, Some("en"), to)?;
        tokens += t.encode(&out)?.len();
        outputs.push(out);
    }
    Ok(Run {
        load_s,
        total_s: start.elapsed().as_secs_f64(),
        tokens,
        outputs,
    })
}

/// Runs the benchmark.
pub fn run(args: TranslateBenchArgs) -> anyhow::Result<()> {
    crate::translate::check_target(&args.to)?;
    let file = crate::translate::resolve_gguf(&args.model, args.home)?;
    let dev = candle_core::Device::Cpu;
    let mut rows = Vec::new();
    for (label, requantize) in [("as loaded (Q8_0)", true), ("as stored", false)] {
        let t0 = Instant::now();
        let mut t = if requantize {
            Translator::load(&file, &dev)?
        } else {
            Translator::load_as_stored(&file, &dev)?
        };
        let load_s = t0.elapsed().as_secs_f64();
        rows.push((label, measure(&mut t, load_s, &args.to)?));
    }
    println!(
        "Text translation, {} sentences en → {}, {} ({} threads)",
        SENTENCES.len(),
        args.to,
        file.display(),
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:<18} {:>8} {:>12} {:>12} {:>10}",
        "weights", "load s", "s/sentence", "tokens/s", "vs stored"
    );
    let stored = rows.last().map_or(1.0, |(_, r)| r.total_s);
    for (label, r) in &rows {
        println!(
            "{:<18} {:>8.2} {:>12.2} {:>12.1} {:>9.2}x",
            label,
            r.load_s,
            r.total_s / SENTENCES.len() as f64,
            r.tokens as f64 / r.total_s,
            stored / r.total_s
        );
    }
    for (i, s) in SENTENCES.iter().enumerate() {
        println!("{s}");
        for (label, r) in &rows {
            println!("  {label:<18} {}", r.outputs[i]);
        }
    }
    Ok(())
}
