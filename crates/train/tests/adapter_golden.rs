//! One step of adapter training against an independent PyTorch reference
//! (scripts/adapter_step_reference.py: transformers' Qwen2ForCausalLM frozen,
//! the adapter, cross-entropy of the reply, torch.optim.AdamW): the loss,
//! the adapter's gradients and its weights after the step.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use nexus_models::nexus::config::{AdapterConfig, EncoderConfig, LmConfig};
use nexus_train::adapter::{AdapterTrainer, Frozen, Schedule, TrainConfig};

fn golden() -> HashMap<String, Tensor> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/adapter_step.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

/// A word-level tokenizer whose special tokens sit where the reference put them.
fn tokenizer() -> tokenizers::Tokenizer {
    let mut vocab: Vec<(String, u32)> = (0..250).map(|i| (format!("t{i}"), i)).collect();
    let special = [
        "<|image_pad|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    ];
    for (i, s) in special.iter().enumerate() {
        vocab.push(((*s).to_string(), 250 + i as u32));
    }
    let added: Vec<serde_json::Value> = special
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": 250 + i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let vocab: serde_json::Map<String, serde_json::Value> =
        vocab.into_iter().map(|(k, v)| (k, v.into())).collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    json.to_string().parse().unwrap()
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

#[test]
fn one_step_matches_pytorch() {
    let g = golden();
    let lm: HashMap<String, Tensor> = g
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("lm.").map(|k| (k.to_string(), v.clone())))
        .collect();
    let cfg = LmConfig {
        vocab_size: 256,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 512,
        rope_theta: 1_000_000.0,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: true,
        mrope_section: None,
    };
    let frozen = Frozen::new(
        cfg,
        lm,
        tokenizer(),
        EncoderConfig {
            num_mel_bins: 80,
            d_model: 16,
            encoder_layers: 1,
            encoder_attention_heads: 2,
            encoder_ffn_dim: 32,
            max_source_positions: 1500,
        },
        AdapterConfig {
            stack: 5,
            hidden_size: 24,
            activation: "gelu".into(),
        },
    )
    .unwrap();
    let config = TrainConfig {
        objective: Default::default(),
        seed: 0,
        batch: 1,
        micro_batch: 1,
        schedule: Schedule {
            lr: 1e-3,
            min_lr: 1e-3,
            warmup: 0,
            steps: 100,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        clip_norm: 1e6,
        checkpoint_every: 1,
        validate_every: 1,
        validation_samples: 0,
        max_reply_tokens: 64,
    };
    let init: HashMap<&str, Tensor> = [
        "linear1.weight",
        "linear1.bias",
        "linear2.weight",
        "linear2.bias",
    ]
    .into_iter()
    .map(|n| (n, g[&format!("adapter.{n}")].clone()))
    .collect();
    let mut t = AdapterTrainer::from_weights(&frozen, config, &init).unwrap();
    let audio = t.adapt(&g["frames"]).unwrap();
    let loss = t
        .reply_loss(
            &frozen,
            &audio,
            &ids(&g["prompt_ids"]),
            &ids(&g["reply_ids"]),
        )
        .unwrap();
    let want: Vec<f32> = g["loss"].to_vec1().unwrap();
    let got = loss.to_scalar::<f32>().unwrap();
    assert!(
        (got - want[0]).abs() < 1e-4 * want[0].abs(),
        "loss {got} vs {}",
        want[0]
    );

    let grads = loss.backward().unwrap();
    let mut gs = Vec::new();
    for (name, var) in t.params() {
        let gr = grads.get(var.as_tensor()).unwrap().clone();
        let d = max_rel_diff(&gr, &g[&format!("grad.{name}")]);
        assert!(
            d < 1e-3,
            "gradient of {name}: max difference {d} of its largest value"
        );
        gs.push(gr);
    }
    t.apply(gs).unwrap();
    for (name, var) in t.params() {
        let d = max_rel_diff(var.as_tensor(), &g[&format!("after.{name}")]);
        assert!(d < 1e-5, "{name} after the step: max difference {d}");
    }
}
