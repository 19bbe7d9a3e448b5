//! `nexus train adapter`'s training on tiny data: a small random language
//! model with Qwen2.5's real tokenizer and random encoder frames. The
//! backward pass against finite differences, the loss falling, and a
//! resumed run equal to an uninterrupted one bit for bit.
#![allow(clippy::unwrap_used)]

// The max-difference helper of the model tests.
#[path = "../../models/tests/common/mod.rs"]
mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use nexus_models::nexus::config::{AdapterConfig, EncoderConfig, LmConfig};
use nexus_train::adapter::{
    AdapterTrainer, Example, Frozen, Objective, Schedule, TrainConfig, checkpoint_dir,
    latest_checkpoint,
};
use nexus_train::rng::Rng;
use nexus_train::synth::SampleTask;

const D_ENC: usize = 16;
const STACK: usize = 5;

fn tokenizer() -> tokenizers::Tokenizer {
    let path = nexus_weights::resolve::resolve_gguf("qwen2.5-0.5b-instruct", None)
        .expect("nexus models pull qwen2.5-0.5b-instruct");
    let mut f = std::fs::File::open(path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    nexus_models::qwen::tokenizer_from_gguf(&ct).unwrap()
}

fn frozen() -> Frozen {
    let tok = tokenizer();
    let (h, layers, ffn, vocab) = (32usize, 2usize, 64usize, 151_936usize);
    let cfg = LmConfig {
        vocab_size: vocab,
        hidden_size: h,
        intermediate_size: ffn,
        num_hidden_layers: layers,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 4096,
        rope_theta: 1_000_000.0,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: true,
        mrope_section: None,
    };
    let mut rng = Rng::new(99);
    let mut t = |shape: &[usize], scale: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() * scale).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let mut w: HashMap<String, Tensor> = HashMap::new();
    w.insert("model.embed_tokens.weight".into(), t(&[vocab, h], 0.5));
    w.insert(
        "model.norm.weight".into(),
        Tensor::ones(h, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let kv = 2 * h / 4;
    for l in 0..layers {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        for (n, o, i) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
        ] {
            w.insert(p(&format!("{n}.weight")), t(&[o, i], 0.2));
            w.insert(p(&format!("{n}.bias")), t(&[o], 0.02));
        }
        w.insert(p("self_attn.o_proj.weight"), t(&[h, h], 0.2));
        w.insert(p("mlp.gate_proj.weight"), t(&[ffn, h], 0.2));
        w.insert(p("mlp.up_proj.weight"), t(&[ffn, h], 0.2));
        w.insert(p("mlp.down_proj.weight"), t(&[h, ffn], 0.2));
        for n in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
            w.insert(
                p(n),
                Tensor::ones(h, candle_core::DType::F32, &Device::Cpu).unwrap(),
            );
        }
    }
    Frozen::new(
        cfg,
        w,
        tok,
        EncoderConfig {
            num_mel_bins: 80,
            d_model: D_ENC,
            encoder_layers: 1,
            encoder_attention_heads: 2,
            encoder_ffn_dim: 32,
            max_source_positions: 1500,
        },
        AdapterConfig {
            stack: STACK,
            hidden_size: 24,
            activation: "gelu".into(),
        },
    )
    .unwrap()
}

fn examples(n: usize) -> Vec<Example> {
    let texts = [
        "In the beginning God created the heaven and the earth.",
        "And the earth was without form, and void.",
        "Let there be light.",
        "What is seven plus five?",
        "The birch canoe slid on the smooth planks.",
        "Rice is often served in round bowls.",
    ];
    let mut rng = Rng::new(5);
    (0..n)
        .map(|i| {
            let groups = 2 + i % 3;
            let v: Vec<f32> = (0..groups * STACK * D_ENC).map(|_| rng.normal()).collect();
            Example {
                id: i as u64,
                task: SampleTask::Transcribe,
                text: texts[i % texts.len()].into(),
                answer: None,
                seconds: 1.5,
                frames: Tensor::from_vec(v, (groups * STACK, D_ENC), &Device::Cpu).unwrap(),
            }
        })
        .collect()
}

fn config(steps: u64, lr: f64) -> TrainConfig {
    TrainConfig {
        objective: Default::default(),
        seed: 3,
        batch: 2,
        micro_batch: 1,
        schedule: Schedule {
            lr,
            min_lr: lr / 10.0,
            warmup: 2,
            steps,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        clip_norm: 5.0,
        checkpoint_every: 3,
        validate_every: 3,
        validation_samples: 2,
        max_reply_tokens: 64,
    }
}

#[test]
#[ignore = "needs the Qwen2.5 GGUF for its tokenizer (nexus models pull qwen2.5-0.5b-instruct)"]
fn backward_matches_finite_differences() {
    let frozen = frozen();
    let t = AdapterTrainer::new(&frozen, config(10, 1e-3)).unwrap();
    let ex = &examples(1)[0];
    let (grads, _) = t.gradients(&frozen, &[ex]).unwrap();
    check_gradients(&t, &grads, || {
        f64::from(t.loss(&frozen, ex).unwrap().to_scalar::<f32>().unwrap())
    });
}

/// `grads` against central finite differences of `loss` on the three
/// largest components of each of the adapter's four parameters.
fn check_gradients(t: &AdapterTrainer, grads: &[Tensor], loss: impl Fn() -> f64) {
    let mut checked = 0;
    for (k, (name, var)) in t.params().iter().enumerate() {
        let g: Vec<f32> = grads[k].flatten_all().unwrap().to_vec1().unwrap();
        let w0 = var.as_tensor().copy().unwrap();
        let flat: Vec<f32> = w0.flatten_all().unwrap().to_vec1().unwrap();
        let mut idx: Vec<usize> = (0..g.len()).collect();
        idx.sort_by(|a, b| g[*b].abs().total_cmp(&g[*a].abs()));
        for &i in idx.iter().take(3) {
            let eps = 1e-2f32;
            let at = |d: f32| {
                let mut v = flat.clone();
                v[i] += d;
                var.set(&Tensor::from_vec(v, w0.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                loss()
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * f64::from(eps));
            var.set(&w0).unwrap();
            let analytic = f64::from(g[i]);
            let rel = (numeric - analytic).abs() / analytic.abs().max(1e-3);
            assert!(
                rel < 0.03,
                "{name}[{i}]: analytic {analytic}, numeric {numeric}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 12);
}

#[test]
#[ignore = "needs the Qwen2.5 GGUF for its tokenizer (nexus models pull qwen2.5-0.5b-instruct)"]
fn loss_falls_and_a_resumed_run_equals_an_uninterrupted_one() {
    let frozen = frozen();
    let data = examples(6);
    let steps = 20;
    let mean_loss = |t: &AdapterTrainer| {
        data.iter()
            .map(|e| f64::from(t.loss(&frozen, e).unwrap().to_scalar::<f32>().unwrap()))
            .sum::<f64>()
            / data.len() as f64
    };
    let mut whole = AdapterTrainer::new(&frozen, config(steps, 5e-2)).unwrap();
    let before = mean_loss(&whole);
    let mut losses = Vec::new();
    for _ in 0..steps {
        losses.push(whole.step(&frozen, &data).unwrap().loss);
    }
    let after = mean_loss(&whole);
    eprintln!("mean loss {before:.3} -> {after:.3}; steps {losses:?}");
    assert!(
        after < before - 0.5,
        "mean loss {before} -> {after}; steps {losses:?}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let mut part = AdapterTrainer::new(&frozen, config(steps, 5e-2)).unwrap();
    for _ in 0..3 {
        part.step(&frozen, &data).unwrap();
    }
    part.save(&checkpoint_dir(tmp.path(), 3)).unwrap();
    drop(part);
    let (at, dir) = latest_checkpoint(tmp.path()).unwrap();
    assert_eq!(at, 3);
    let mut resumed = AdapterTrainer::load(&frozen, config(steps, 5e-2), &dir).unwrap();
    assert_eq!(resumed.step_count(), 3);
    let mut tail = Vec::new();
    for _ in 3..steps {
        tail.push(resumed.step(&frozen, &data).unwrap().loss);
    }
    assert_eq!(tail, losses[3..], "the resumed losses");
    for ((n, a), (_, b)) in whole.params().iter().zip(resumed.params()) {
        let a: Vec<f32> = a.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{n} differs"
        );
    }
    // Other settings are refused.
    let err = AdapterTrainer::load(&frozen, config(steps + 1, 5e-2), &dir).unwrap_err();
    assert!(err.to_string().contains("other settings"), "{err}");
    // Greedy decoding runs and its WER is a number.
    let (wer, hyps) = whole.validate(&frozen, &data[..2]).unwrap();
    assert!(wer.is_finite() && hyps.len() == 2);
}

#[test]
#[ignore = "needs the Qwen2.5 GGUF for its tokenizer (nexus models pull qwen2.5-0.5b-instruct)"]
fn a_padded_batch_gives_the_gradients_of_one_example_at_a_time() {
    let frozen = frozen();
    let data = examples(4);
    let batch: Vec<&Example> = data.iter().collect();
    let mut one = config(10, 1e-3);
    one.batch = 4;
    let mut all = one.clone();
    all.micro_batch = 4;
    let (g1, l1) = AdapterTrainer::new(&frozen, one)
        .unwrap()
        .gradients(&frozen, &batch)
        .unwrap();
    let (g4, l4) = AdapterTrainer::new(&frozen, all)
        .unwrap()
        .gradients(&frozen, &batch)
        .unwrap();
    assert!((l1 - l4).abs() < 1e-4 * l1.abs(), "{l1} vs {l4}");
    for (a, b) in g1.iter().zip(&g4) {
        let d = common::max_abs_diff(a, b);
        let m: f32 = a.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(d < 1e-3 * m, "gradient differs by {d} of {m}");
    }
}

#[test]
#[ignore = "needs the Qwen2.5 GGUF for its tokenizer (nexus models pull qwen2.5-0.5b-instruct)"]
fn each_epoch_sees_every_example_once() {
    let frozen = frozen();
    let data = examples(5);
    let mut cfg = config(10, 1e-3);
    cfg.batch = 1;
    let t = AdapterTrainer::new(&frozen, cfg).unwrap();
    for epoch in 0..3u64 {
        let mut ids: Vec<u64> = (1..=5)
            .map(|s| t.batch_of(&data, epoch * 5 + s)[0].id)
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, [0, 1, 2, 3, 4]);
    }
    let e0: Vec<u64> = (1..=5).map(|s| t.batch_of(&data, s)[0].id).collect();
    let e1: Vec<u64> = (6..=10).map(|s| t.batch_of(&data, s)[0].id).collect();
    assert_ne!(e0, e1, "each epoch has its own order");
}

#[test]
fn settings_out_of_bounds_name_their_field() {
    let ok = config(10, 1e-3);
    assert!(ok.check().is_ok());
    let mut c = ok.clone();
    c.batch = 0;
    assert!(c.check().unwrap_err().to_string().starts_with("batch"));
    let mut c = ok.clone();
    c.schedule.warmup = 11;
    assert!(c.check().unwrap_err().to_string().starts_with("warmup"));
    let mut c = ok.clone();
    c.schedule.lr = f64::NAN;
    assert!(c.check().unwrap_err().to_string().starts_with("lr"));
    let mut c = ok.clone();
    c.objective = Objective::Ctc { temperature: 0.0 };
    assert!(
        c.check()
            .unwrap_err()
            .to_string()
            .starts_with("ctc_temperature")
    );
    let mut c = ok;
    c.max_reply_tokens = 100_000;
    assert!(
        c.check()
            .unwrap_err()
            .to_string()
            .starts_with("max_reply_tokens")
    );
}

/// Examples with room for CTC: more adapted positions than tokens.
fn long_examples(n: usize) -> Vec<Example> {
    examples(n)
        .into_iter()
        .enumerate()
        .map(|(i, mut e)| {
            let groups = 30 + i % 4;
            let mut rng = Rng::new(50 + i as u64);
            let v: Vec<f32> = (0..groups * STACK * D_ENC).map(|_| rng.normal()).collect();
            e.frames = Tensor::from_vec(v, (groups * STACK, D_ENC), &Device::Cpu).unwrap();
            e
        })
        .collect()
}

fn ctc_config(steps: u64, lr: f64) -> TrainConfig {
    TrainConfig {
        objective: Objective::Ctc { temperature: 1.0 },
        ..config(steps, lr)
    }
}

#[test]
#[ignore = "needs the Qwen2.5 GGUF for its tokenizer (nexus models pull qwen2.5-0.5b-instruct)"]
fn ctc_backward_matches_finite_differences() {
    let frozen = frozen();
    let t = AdapterTrainer::new(&frozen, ctc_config(10, 1e-3)).unwrap();
    let ex = &long_examples(1)[0];
    let (grads, loss) = t.gradients(&frozen, &[ex]).unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{loss}");
    check_gradients(&t, &grads, || t.gradients(&frozen, &[ex]).unwrap().1);
}

#[test]
#[ignore = "needs the Qwen2.5 GGUF for its tokenizer (nexus models pull qwen2.5-0.5b-instruct)"]
fn ctc_loss_falls_and_its_best_paths_learn_the_words() {
    let frozen = frozen();
    let data = long_examples(3);
    let steps = 40;
    let mut t = AdapterTrainer::new(&frozen, ctc_config(steps, 2e-2)).unwrap();
    let all: Vec<&Example> = data.iter().collect();
    let before = t.gradients(&frozen, &all).unwrap().1;
    let (wer0, _) = t.validate_ctc(&frozen, &data).unwrap().unwrap();
    let mut losses = Vec::new();
    for _ in 0..steps {
        losses.push(t.step(&frozen, &data).unwrap().loss);
    }
    let (wer1, hyps) = t.validate_ctc(&frozen, &data).unwrap().unwrap();
    let after = t.gradients(&frozen, &all).unwrap().1;
    eprintln!("CTC loss {before:.2} -> {after:.2}, WER {wer0:.3} -> {wer1:.3}; {hyps:?}");
    assert!(
        after < before / 2.0,
        "loss {before} -> {after}; steps {losses:?}"
    );
    assert!(
        wer1 < 0.5 && wer1 < wer0,
        "CTC WER {wer0} -> {wer1}: {hyps:?}"
    );
    // The reply objective has no CTC head.
    let reply = AdapterTrainer::new(&frozen, config(10, 1e-3)).unwrap();
    assert!(reply.validate_ctc(&frozen, &data).unwrap().is_none());
    // Transcripts that cannot fit their positions leave the batch.
    let short = examples(1);
    let err = t.gradients(&frozen, &[&short[0]]).unwrap_err();
    assert!(err.to_string().contains("fit its positions"), "{err}");
}
