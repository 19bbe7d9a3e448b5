//! `nexus bench whisper`: what the Whisper network itself costs on this
//! machine, per precision: the encoder per window length, a decoder sequence's
//! start (cross-attention keys and values, the prompt), and one batched
//! decoder step at growing batch sizes: the figures the live path's capacity
//! is made of.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::{Device, IndexOp};
use clap::Args;
use nexus_models::Precision;
use nexus_models::i8mm::{I8Matrix, Kernel};
use nexus_models::whisper::{DecodeOptions, GreedySequence, WhisperEngine, step_batch};

use crate::transcribe::{load_audio, resolve_model};

/// Arguments of `nexus bench whisper`.
#[derive(Debug, Args)]
pub struct WhisperBenchArgs {
    /// Model name or folder.
    #[arg(long, default_value = "tiny.en")]
    model: String,
    /// Precisions to measure, side by side (int8, as served: Q8_0 weights
    /// for products of a few rows, 8-bit weights with a scale per output for
    /// the encoder's and other long products).
    #[arg(long, value_delimiter = ',', default_value = "f32,int8")]
    precision: Vec<Precision>,
    /// Speech to encode and decode (16 kHz after loading; at least 30 s is used when there).
    #[arg(
        long,
        default_value = ".cache/testdata/librivox/sense_and_sensibility_01_austen_64kb-0870.wav"
    )]
    speech: PathBuf,
    /// Encoder window lengths, in seconds (1..=30).
    #[arg(long, value_delimiter = ',', default_value = "5,10,30")]
    windows: Vec<u32>,
    /// Decoder batch sizes (1..=64).
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16,32")]
    batches: Vec<usize>,
    /// Token steps measured per batch size (1..=200).
    #[arg(long, default_value_t = 24)]
    steps: usize,
    /// Where weights are kept.
    #[arg(long, env = "NEXUS_HOME")]
    home: Option<PathBuf>,
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v.get(v.len() / 2).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// One linear product of the encoder's shapes over a 30 s window (1500
/// frames): candle's f32 product against the 8-bit one on every kernel
/// this CPU has (the int8 encoder takes the last). Random values of the
/// right shape: the timings do not depend on them.
fn products(d: usize) -> anyhow::Result<()> {
    let frames = 1500;
    println!(
        "{:<24} {:>10} {}",
        "product (1500 rows)",
        "f32 ms",
        Kernel::available()
            .iter()
            .map(|k| format!("{:>16}", format!("{k:?} ms")))
            .collect::<String>()
    );
    for (inp, out) in [(d, d), (d, 4 * d), (4 * d, d)] {
        let x = candle_core::Tensor::randn(0f32, 1.0, (frames, inp), &Device::Cpu)?;
        let wt = candle_core::Tensor::randn(0f32, 0.05, (inp, out), &Device::Cpu)?;
        let w: Vec<f32> = wt.t()?.contiguous()?.flatten_all()?.to_vec1()?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let q = I8Matrix::quantize(&w, out, inp);
        let time = |f: &dyn Fn()| {
            f();
            median(
                (0..5)
                    .map(|_| {
                        let t0 = Instant::now();
                        f();
                        t0.elapsed()
                    })
                    .collect(),
            )
        };
        let float = time(&|| {
            let _ = x.matmul(&wt);
        });
        let ints: String = Kernel::available()
            .into_iter()
            .map(|k| {
                let ms = time(&|| {
                    let _ = q.matmul_on(k, &xs, frames);
                });
                format!("{:>16}", format!("{ms:.2} ({:.2}x)", float / ms))
            })
            .collect();
        println!("{:<24} {float:>10.2} {ints}", format!("{inp} -> {out}"));
    }
    Ok(())
}

/// Runs the benchmark and prints its table.
pub fn run(args: WhisperBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.windows.iter().all(|w| (1..=30).contains(w)),
        "--windows: each must be 1..=30 seconds"
    );
    anyhow::ensure!(
        args.batches.iter().all(|b| (1..=64).contains(b)),
        "--batches: each must be 1..=64"
    );
    anyhow::ensure!((1..=200).contains(&args.steps), "--steps must be 1..=200");
    let precisions = args.precision.clone();
    let dir = resolve_model(&args.model, args.home.clone())?;
    let samples = load_audio(&args.speech, None)
        .with_context(|| format!("reading {}", args.speech.display()))?;
    println!(
        "model {}, {} threads, speech {}",
        args.model,
        candle_core::utils::get_num_threads(),
        args.speech.display()
    );
    for (i, precision) in precisions.into_iter().enumerate() {
        let engine = WhisperEngine::load_with(&dir, &Device::Cpu, precision)?;
        if i == 0 {
            // The products first, at the loaded model's width.
            products(engine.model.config.d_model)?;
            println!(
                "{:<6} {:<28} {:>10} {:>12}",
                "prec", "what", "ms", "per unit"
            );
        }
        let p = precision.as_str();
        // Encoder: one window of each length, the median of three.
        let mut features = None;
        for &w in &args.windows {
            // Speech, then silence where the clip is shorter than the window.
            let want = w as usize * 16_000;
            let n = want.min(samples.len());
            let mel = engine.mel.compute(&samples[..n], want - n)?;
            let frames = (w as usize * 100).min(mel.frames) & !1;
            let mel = mel
                .to_tensor(&Device::Cpu)?
                .i((.., .., ..frames))?
                .contiguous()?;
            let mut times = Vec::new();
            for _ in 0..3 {
                let t0 = Instant::now();
                let f = engine.model.encoder.forward(&mel)?;
                times.push(t0.elapsed());
                if w == 10 || features.is_none() {
                    features = Some(f);
                }
            }
            let ms = median(times);
            println!(
                "{p:<6} {:<28} {ms:>10.1} {:>9.1} ms/s",
                format!("encode {w} s window"),
                ms / f64::from(w)
            );
        }
        let audio = features.context("no encoder window measured")?;
        let opts = DecodeOptions {
            language: Some("en".into()),
            without_timestamps: true,
            beam_size: 1,
            ..DecodeOptions::default()
        };
        let mut starts = Vec::new();
        for _ in 0..5 {
            let t0 = Instant::now();
            let _ = GreedySequence::start(&engine.model, &engine.tokenizer, &audio, &opts)?;
            starts.push(t0.elapsed());
        }
        println!(
            "{p:<6} {:<28} {:>10.1}",
            format!("start a sequence ({} frames)", audio.dim(1)?),
            median(starts)
        );
        for &b in &args.batches {
            let mut seqs = (0..b)
                .map(|_| GreedySequence::start(&engine.model, &engine.tokenizer, &audio, &opts))
                .collect::<Result<Vec<_>, _>>()?;
            let (mut stepping, mut picking) = (Vec::new(), Duration::ZERO);
            for _ in 0..args.steps {
                let t0 = Instant::now();
                // Every sequence steps even past its end: the cost of a full batch.
                let tokens: Vec<u32> = seqs
                    .iter_mut()
                    .map(|s| s.advance().unwrap_or(220))
                    .collect();
                picking += t0.elapsed();
                let t0 = Instant::now();
                let mut refs: Vec<&mut GreedySequence> = seqs.iter_mut().collect();
                step_batch(&engine.model, &mut refs, &tokens)?;
                stepping.push(t0.elapsed());
            }
            let ms = median(stepping);
            println!(
                "{p:<6} {:<28} {ms:>10.2} {:>7.0} tok/s   (+{:.2} ms picking tokens)",
                format!("decoder step, batch {b}"),
                b as f64 * 1000.0 / ms,
                picking.as_secs_f64() * 1000.0 / args.steps as f64
            );
        }
    }
    Ok(())
}
