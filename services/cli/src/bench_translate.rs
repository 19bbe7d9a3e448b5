//! `nexus bench translate`: translation quality and speed on the caption
//! test set (`crates/eval/data/translation`), per direction and per prompt:
//! chrF and BLEU against the references, failures by kind (answered,
//! untranslated, wrong language, truncated, overlong), captions the
//! translator marked as untranslatable, seconds per caption and tokens per
//! second. The prompts run side by side in one process on the same model:
//! `plain` (the single-instruction prompt the fleet used first), `chat` (the
//! caption framed as data, with examples, one attempt) and `checked` (what
//! the fleet runs: `chat`, checked, retried under the strict prompt, marked
//! when that fails too).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use nexus_eval::translation::{DIRECTIONS, Failure, Pair, check, test_set};
use nexus_models::qwen::Translator;
use nexus_models::qwen::lm::Products;
use nexus_models::qwen::prompt::{Spec, Style};

/// The texts of `outs`, a failed one as the empty text it delivers.
fn texts(outs: &[nexus_models::qwen::Translated]) -> Vec<&str> {
    outs.iter().map(|r| r.text.as_str()).collect()
}

/// Options of `nexus bench translate`.
#[derive(Debug, Args)]
pub struct TranslateBenchArgs {
    /// Registry name of a GGUF chat model, or a `.gguf` path.
    #[arg(long, default_value = "qwen2.5-0.5b-instruct")]
    model: String,
    /// Directions to run, as source-target (en-de, en-zh, zh-en, en-es).
    #[arg(long, value_delimiter = ',', default_value = "en-de,en-zh,zh-en,en-es")]
    directions: Vec<String>,
    /// Prompts to compare: plain, chat, checked.
    #[arg(long, value_delimiter = ',', default_value = "plain,checked")]
    prompts: Vec<String>,
    /// Sentences per direction (the first N; all when absent).
    #[arg(long)]
    limit: Option<usize>,
    /// Print every output, not only failed ones.
    #[arg(long)]
    print_all: bool,
    /// Load the GGUF's tensors as stored (no Q8_0 requantisation).
    #[arg(long)]
    as_stored: bool,
    /// Concurrent sessions to time (each sends a caption at the same moment,
    /// caption after caption: as the live translation thread takes them, and
    /// one by one).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    sessions: Vec<usize>,
    /// Captions (from en-de) each session of the session timing sends.
    #[arg(long, default_value_t = 6)]
    session_captions: usize,
    /// Prompt lengths (tokens) to time one forward pass of, from an empty
    /// cache: how a translation's prompt cost grows with its context. Set,
    /// batched decoding steps of 1, 8 and 16 sequences are timed too.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,160")]
    prefill: Vec<usize>,
    /// Write the figures and outputs as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Where weights are kept.
    #[arg(long, env = "NEXUS_HOME")]
    home: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prompt {
    Plain,
    Chat,
    Checked,
}

impl Prompt {
    fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "plain" => Prompt::Plain,
            "chat" => Prompt::Chat,
            "checked" => Prompt::Checked,
            _ => bail!("--prompts: {s:?} is not one of plain, chat, checked"),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Prompt::Plain => "plain",
            Prompt::Chat => "chat",
            Prompt::Checked => "checked",
        }
    }
}

#[derive(Debug, serde::Serialize)]
struct Output {
    kind: &'static str,
    source: &'static str,
    reference: &'static str,
    output: String,
    /// The benchmark's check of the output (as the translator would judge it).
    failure: Option<&'static str>,
    /// The translator's own marker: it gave up on this caption.
    marked: Option<&'static str>,
    attempts: u32,
}

#[derive(Debug, serde::Serialize)]
struct Row {
    direction: String,
    prompt: &'static str,
    sentences: usize,
    chrf: f64,
    bleu: f64,
    failures: BTreeMap<&'static str, usize>,
    marked: usize,
    retried: usize,
    seconds_per_caption: f64,
    tokens_per_s: f64,
    outputs: Vec<Output>,
}

fn run_one(
    t: &mut Translator,
    set: &[Pair],
    (src, dst): (&str, &str),
    prompt: Prompt,
) -> anyhow::Result<Row> {
    let start = Instant::now();
    let mut tokens = 0;
    let mut outputs = Vec::with_capacity(set.len());
    for p in set {
        let spec = Spec {
            text: p.source,
            source: Some(src),
            target: dst,
            context: &[],
            glossary: &[],
        };
        let (output, marked, attempts) = match prompt {
            Prompt::Plain | Prompt::Chat => {
                let style = if prompt == Prompt::Plain {
                    Style::Plain
                } else {
                    Style::Chat
                };
                let (text, n) = t.attempt(style, &spec)?;
                tokens += n;
                (text, None, 1)
            }
            Prompt::Checked => {
                let r = t.translate(&spec)?;
                tokens += r.tokens;
                (r.text, r.failure, r.attempts)
            }
        };
        // A caption the translator marked is not an output a viewer reads as
        // a translation: it is counted as marked, not as a failure.
        let failure = if marked.is_some() {
            None
        } else {
            check(p.source, &output, src, dst).map(Failure::as_str)
        };
        outputs.push(Output {
            kind: p.kind,
            source: p.source,
            reference: p.reference,
            output,
            failure,
            marked,
            attempts,
        });
    }
    let secs = start.elapsed().as_secs_f64();
    let hyps: Vec<&str> = outputs.iter().map(|o| o.output.as_str()).collect();
    let refs: Vec<&str> = outputs.iter().map(|o| o.reference).collect();
    let mut failures: BTreeMap<&'static str, usize> =
        Failure::ALL.iter().map(|f| (f.as_str(), 0)).collect();
    for o in &outputs {
        if let Some(f) = o.failure {
            *failures.entry(f).or_default() += 1;
        }
    }
    Ok(Row {
        direction: format!("{src}-{dst}"),
        prompt: prompt.name(),
        sentences: set.len(),
        chrf: nexus_eval::mt::chrf(&hyps, &refs),
        bleu: nexus_eval::mt::bleu(&hyps, &refs, dst),
        failures,
        marked: outputs.iter().filter(|o| o.marked.is_some()).count(),
        retried: outputs.iter().filter(|o| o.attempts > 1).count(),
        seconds_per_caption: secs / set.len().max(1) as f64,
        tokens_per_s: tokens as f64 / secs,
        outputs,
    })
}

#[derive(Debug, serde::Serialize)]
struct SessionRow {
    sessions: usize,
    captions: usize,
    /// Mean time from a caption's arrival to its translation, as the
    /// decoder's translation thread does it: every session's caption
    /// continues its conversation, the replies decode as one batch.
    live_mean_s: f64,
    live_max_s: f64,
    /// The same captions one after another, each with its session's
    /// earlier captions in its prompt (the thread before conversations).
    serial_mean_s: f64,
    serial_max_s: f64,
    /// Reply tokens per second, both ways.
    live_tokens_per_s: f64,
    serial_tokens_per_s: f64,
    /// chrF of the translations against the set's references, both ways.
    live_chrf: f64,
    serial_chrf: f64,
    /// Captions that came back failed (marked), both ways.
    live_marked: usize,
    serial_marked: usize,
}

/// Translation time per caption when `n` sessions each send a caption at
/// the same moment, caption after caption (each session reads its own run
/// of the en-de set, its earlier captions its context): through
/// [`Translator::translate_live`] as the decoder's translation thread does,
/// and one after another through [`Translator::translate`] with the context
/// in every prompt.
fn time_sessions(t: &mut Translator, args: &TranslateBenchArgs) -> anyhow::Result<Vec<SessionRow>> {
    let set = test_set("en", "de").context("test set")?;
    let mut rows = Vec::new();
    let per = args.session_captions.max(1);
    for &n in &args.sessions {
        if n == 0 {
            continue;
        }
        // Session i reads captions i*per.. of the set (cycled).
        let stream =
            |i: usize| -> Vec<&Pair> { set.iter().cycle().skip(i * per).take(per).collect() };
        let pairs: Vec<Vec<&Pair>> = (0..n).map(stream).collect();
        let (mut live_out, mut serial_out, mut refs) = (Vec::new(), Vec::new(), Vec::new());
        let ids: Vec<String> = (0..n).map(|i| format!("bench-{n}-{i}")).collect();
        let (mut live, mut serial) = (Vec::new(), Vec::new());
        let (mut live_tokens, mut serial_tokens) = (0, 0);
        let (mut live_s, mut serial_s) = (0.0, 0.0);
        for round in 0..per {
            let contexts: Vec<Vec<String>> = pairs
                .iter()
                .map(|s| {
                    let from = round.saturating_sub(nexus_models::qwen::prompt::MAX_CONTEXT);
                    s[from..round].iter().map(|p| p.source.to_owned()).collect()
                })
                .collect();
            let specs: Vec<Spec<'_>> = pairs
                .iter()
                .zip(&contexts)
                .map(|(s, c)| Spec {
                    text: s[round].source,
                    source: Some("en"),
                    target: "de",
                    context: c,
                    glossary: &[],
                })
                .collect();
            let items: Vec<(&str, Spec<'_>)> = ids
                .iter()
                .map(|i| i.as_str())
                .zip(specs.iter().copied())
                .collect();
            let t0 = Instant::now();
            for r in t.translate_live(&items)? {
                let r = r?;
                live_tokens += r.tokens;
                live_out.push(r);
            }
            refs.extend(pairs.iter().map(|s| s[round].reference));
            let took = t0.elapsed().as_secs_f64();
            live_s += took;
            live.extend(std::iter::repeat_n(took, n));
            let t0 = Instant::now();
            for s in &specs {
                let r = t.translate(s)?;
                serial_tokens += r.tokens;
                serial_out.push(r);
                serial.push(t0.elapsed().as_secs_f64());
            }
            serial_s += t0.elapsed().as_secs_f64();
        }
        for i in &ids {
            t.forget(i);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        rows.push(SessionRow {
            sessions: n,
            captions: live.len(),
            live_mean_s: mean(&live),
            live_max_s: max(&live),
            serial_mean_s: mean(&serial),
            serial_max_s: max(&serial),
            live_tokens_per_s: live_tokens as f64 / live_s,
            serial_tokens_per_s: serial_tokens as f64 / serial_s,
            live_chrf: nexus_eval::mt::chrf(&texts(&live_out), &refs),
            serial_chrf: nexus_eval::mt::chrf(&texts(&serial_out), &refs),
            live_marked: live_out.iter().filter(|r| r.failure.is_some()).count(),
            serial_marked: serial_out.iter().filter(|r| r.failure.is_some()).count(),
        });
    }
    if !rows.is_empty() {
        println!(
            "\nTranslation time per caption, en-de, N sessions each sending a caption at once, caption after caption (seconds from arrival to translation; reply tokens/s; chrF against the references, captions marked failed in brackets)"
        );
        println!(
            "{:>8} {:>8} {:>10} {:>9} {:>9} {:>10} {:>12} {:>11} {:>10} {:>11} {:>9}",
            "sessions",
            "captions",
            "live mean",
            "live max",
            "live tok/s",
            "live chrF",
            "serial mean",
            "serial max",
            "serial tok/s",
            "serial chrF",
            "speed-up"
        );
        for r in &rows {
            println!(
                "{:>8} {:>8} {:>10.2} {:>9.2} {:>9.1} {:>10} {:>12.2} {:>11.2} {:>10.1} {:>11} {:>8.2}x",
                r.sessions,
                r.captions,
                r.live_mean_s,
                r.live_max_s,
                r.live_tokens_per_s,
                format!("{:.1} ({})", r.live_chrf, r.live_marked),
                r.serial_mean_s,
                r.serial_max_s,
                r.serial_tokens_per_s,
                format!("{:.1} ({})", r.serial_chrf, r.serial_marked),
                r.serial_mean_s / r.live_mean_s
            );
        }
    }
    Ok(rows)
}

#[derive(Debug, serde::Serialize)]
struct PrefillRow {
    /// `prefill` (one forward pass of `tokens` from an empty cache) or
    /// `step` (one decoding step of `tokens` sequences together, each after
    /// a 64-token prompt).
    kind: &'static str,
    tokens: usize,
    /// Best of three runs, Q8_0 products by `nexus_models::q8` in this
    /// CPU's fastest layout.
    ms: f64,
    /// The layout it ran (`Packed` for AVX-512 VNNI, `Rows` for AVX2).
    layout: String,
    /// The same through `q8`'s row layout (AVX2), where that is not already
    /// the fastest.
    rows_ms: Option<f64>,
    /// The same through candle's quantised product (the anchor).
    candle_ms: f64,
}

/// Best of three forward passes of each length in `args.prefill` (English
/// captions of the test set, end to end) from an empty cache, and best of
/// three batched decoding steps of 1, 8 and 16 sequences, through `t`, the
/// row layout (where `t` runs another) and `anchor` (the same weights,
/// candle's Q8_0 product).
fn time_prefill(
    t: &Translator,
    rows: Option<&Translator>,
    anchor: &Translator,
    args: &TranslateBenchArgs,
) -> anyhow::Result<Vec<PrefillRow>> {
    const STEP_PROMPT: usize = 64;
    let lens: Vec<usize> = args
        .prefill
        .iter()
        .copied()
        .filter(|&n| (1..=nexus_models::qwen::lm::MAX_POSITIONS).contains(&n))
        .collect();
    let Some(&longest) = lens.iter().max() else {
        return Ok(Vec::new());
    };
    let set = test_set("en", "de").context("test set")?;
    let mut ids = Vec::new();
    for p in set.iter().cycle().take(10_000) {
        if ids.len() >= longest.max(STEP_PROMPT + 16) {
            break;
        }
        ids.extend(t.encode(p.source)?);
    }
    let best_prefill = |m: &Translator, n: usize| -> anyhow::Result<f64> {
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let mut cache = m.model().new_cache();
            let t0 = Instant::now();
            m.model().forward(&ids[..n], &mut cache)?;
            best = best.min(t0.elapsed().as_secs_f64() * 1e3);
        }
        Ok(best)
    };
    let best_step = |m: &Translator, n: usize| -> anyhow::Result<f64> {
        let mut prompt = m.model().new_cache();
        m.model().forward(&ids[..STEP_PROMPT], &mut prompt)?;
        let tokens: Vec<u32> = ids[STEP_PROMPT..STEP_PROMPT + n.min(16)]
            .iter()
            .copied()
            .cycle()
            .take(n)
            .collect();
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let mut caches: Vec<_> = (0..n).map(|_| prompt.clone()).collect();
            let mut refs: Vec<&mut _> = caches.iter_mut().collect();
            let t0 = Instant::now();
            m.model().step_batch(&tokens, &mut refs)?;
            best = best.min(t0.elapsed().as_secs_f64() * 1e3);
        }
        Ok(best)
    };
    let layout = format!("{:?}", nexus_models::q8::Layout::best());
    let mut out = Vec::new();
    type Timer<'a> = &'a dyn Fn(&Translator, usize) -> anyhow::Result<f64>;
    let runs: [(&'static str, Vec<usize>, Timer); 2] = [
        ("prefill", lens, &best_prefill),
        ("step", vec![1, 8, 16], &best_step),
    ];
    for (kind, ns, best) in runs {
        for n in ns {
            let time = |m: &Translator| best(m, n);
            out.push(PrefillRow {
                kind,
                tokens: n,
                ms: time(t)?,
                layout: layout.clone(),
                rows_ms: rows.map(time).transpose()?,
                candle_ms: time(anchor)?,
            });
        }
    }
    println!(
        "\nQ8_0 products, best of 3: a prompt (prefill) of N tokens from an empty cache, and one decoding step of N sequences together (each after a {STEP_PROMPT}-token prompt); nexus_models::q8 in this CPU's layout ({layout}), in its row layout (AVX2), and candle's product, on the same weights"
    );
    println!(
        "{:>8} {:>5} {:>9} {:>12} {:>15} {:>9} {:>17} {:>10} {:>10}",
        "kind",
        "N",
        "ms",
        "ms per N",
        "rows ms per N",
        "rows/ours",
        "candle ms per N",
        "candle ms",
        "candle/ours"
    );
    for r in &out {
        let per = |ms: f64| ms / r.tokens as f64;
        println!(
            "{:>8} {:>5} {:>9.1} {:>12.2} {:>15} {:>9} {:>17.2} {:>10.1} {:>10.2}x",
            r.kind,
            r.tokens,
            r.ms,
            per(r.ms),
            r.rows_ms.map_or("-".into(), |v| format!("{:.2}", per(v))),
            r.rows_ms
                .map_or("-".into(), |v| format!("{:.2}x", v / r.ms)),
            per(r.candle_ms),
            r.candle_ms,
            r.candle_ms / r.ms
        );
    }
    Ok(out)
}

/// Runs the benchmark.
pub fn run(args: TranslateBenchArgs) -> anyhow::Result<()> {
    let prompts: Vec<Prompt> = args
        .prompts
        .iter()
        .map(|p| Prompt::parse(p))
        .collect::<anyhow::Result<_>>()?;
    let mut directions = Vec::new();
    for d in &args.directions {
        let Some((s, t)) = d.split_once('-') else {
            bail!("--directions: {d:?} is not source-target, e.g. en-de");
        };
        if !DIRECTIONS.contains(&(s, t)) {
            bail!("--directions: the test set has no {d}; it has en-de, en-zh, zh-en, en-es");
        }
        directions.push((s, t));
    }
    let file = crate::translate::resolve_gguf(&args.model, args.home.clone())?;
    let dev = candle_core::Device::Cpu;
    let t0 = Instant::now();
    // Quality as the model gives it: no time budget cuts a retry short
    // when the machine is busy.
    let mut t = Translator::load_with(&file, &dev, !args.as_stored, Products::Q8)?
        .with_time_budget(std::time::Duration::from_secs(3_600));
    let load_s = t0.elapsed().as_secs_f64();
    // One warm-up caption: first-call allocations are not the model's speed.
    t.translate_text("Good morning.", Some("en"), "de")?;
    let prefill = if args.prefill.is_empty() {
        Vec::new()
    } else {
        // The same weights (requantised or as stored, as `t`), candle's product.
        let anchor = Translator::load_with(&file, &dev, !args.as_stored, Products::Candle)?;
        let rows = if nexus_models::q8::Layout::best() == nexus_models::q8::Layout::Rows {
            None
        } else {
            Some(Translator::load_with(
                &file,
                &dev,
                !args.as_stored,
                Products::Q8Rows,
            )?)
        };
        time_prefill(&t, rows.as_ref(), &anchor, &args)?
    };
    let mut rows = Vec::new();
    for &(s, d) in &directions {
        let mut set = test_set(s, d).context("test set")?;
        if let Some(n) = args.limit {
            set.truncate(n);
        }
        for &p in &prompts {
            let row = run_one(&mut t, &set, (s, d), p)?;
            eprintln!(
                "{} {}: chrF {:.1}, {:.2} s/caption",
                row.direction, row.prompt, row.chrf, row.seconds_per_caption
            );
            rows.push(row);
        }
    }
    println!(
        "Caption translation, {} ({} threads, loaded in {load_s:.1} s{})",
        file.display(),
        candle_core::utils::get_num_threads(),
        if args.as_stored {
            ", tensors as stored"
        } else {
            ""
        }
    );
    println!(
        "{:<6} {:<8} {:>4} {:>6} {:>6} {:>8} {:>7} {:>6} {:>6} {:>6} {:>6} {:>7} {:>6} {:>7}",
        "dir",
        "prompt",
        "n",
        "chrF",
        "BLEU",
        "answered",
        "untrans",
        "wrong",
        "trunc",
        "long",
        "marked",
        "retried",
        "s/cap",
        "tok/s"
    );
    for r in &rows {
        let f = |k: Failure| r.failures.get(k.as_str()).copied().unwrap_or(0);
        println!(
            "{:<6} {:<8} {:>4} {:>6.1} {:>6.1} {:>8} {:>7} {:>6} {:>6} {:>6} {:>6} {:>7} {:>6.2} {:>7.1}",
            r.direction,
            r.prompt,
            r.sentences,
            r.chrf,
            r.bleu,
            f(Failure::Answered),
            f(Failure::Untranslated),
            f(Failure::WrongLanguage),
            f(Failure::Truncated),
            f(Failure::Overlong),
            r.marked,
            r.retried,
            r.seconds_per_caption,
            r.tokens_per_s
        );
    }
    for r in &rows {
        for o in &r.outputs {
            if args.print_all || o.failure.is_some() || o.marked.is_some() {
                let why = o.failure.or(o.marked.map(|_| "marked")).unwrap_or("ok");
                println!(
                    "[{} {} {why}] {} => {}",
                    r.direction, r.prompt, o.source, o.output
                );
            }
        }
    }
    let sessions = time_sessions(&mut t, &args)?;
    if let Some(path) = &args.report {
        let report = serde_json::json!({"quality": rows, "sessions": sessions, "prefill": prefill});
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
