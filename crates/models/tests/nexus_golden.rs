//! The NEXUS-O family against an independent PyTorch + transformers
//! reference (`scripts/nexus_reference.py`) on small seeded checkpoints in
//! `tests/golden/nexus`: encoder + adapter embeddings, LM logits for a prompt
//! with audio, multimodal RoPE, greedy tokens, audio-decoder logits and
//! delay-pattern codes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use nexus_models::nexus::transformer::Rotary;
use nexus_models::nexus::{NexusModel, NexusTask, delay, undelay};

mod common;
use common::max_abs_diff;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/nexus")
}

fn golden() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("golden.safetensors"), &Device::Cpu).unwrap()
}

fn model() -> NexusModel {
    NexusModel::load(&dir().join("nexus-tiny"), &Device::Cpu).unwrap()
}

fn ints(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

fn rows(t: &Tensor) -> Vec<Vec<u32>> {
    let (n, k) = t.dims2().unwrap();
    let flat = ints(t);
    (0..n).map(|i| flat[i * k..(i + 1) * k].to_vec()).collect()
}

const TOL: f32 = 1e-4;

#[test]
fn encoder_and_adapter_match_the_reference() {
    let g = golden();
    let m = model();
    let frames = m.encode_frames(&g["whisper.mel"]).unwrap();
    let d = max_abs_diff(&frames, &g["whisper.hidden"]);
    assert!(d < TOL, "encoder: max abs diff {d}");
    let emb = m.encode(&g["whisper.mel"]).unwrap();
    assert_eq!(emb.dims(), &[1, 300, 64], "1500 frames → 300");
    let d = max_abs_diff(&emb, &g["adapter.out"]);
    assert!(d < TOL, "adapter: max abs diff {d}");
}

/// nexus-tiny's adapter alone.
fn tiny_adapter() -> nexus_models::nexus::Adapter {
    nexus_models::nexus::Adapter::load(
        64,
        5,
        96,
        64,
        candle_nn::VarBuilder::from_buffered_safetensors(
            std::fs::read(dir().join("nexus-tiny/model.safetensors")).unwrap(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
        .pp("adapter"),
    )
    .unwrap()
}

#[test]
fn the_adapter_drops_an_incomplete_last_group() {
    let g = golden();
    let m = model();
    let frames = m.encode_frames(&g["whisper.mel"]).unwrap();
    let short = m.config().adapter.stack * 69 + 2;
    let emb = tiny_adapter()
        .forward(&frames.narrow(1, 0, short).unwrap())
        .unwrap();
    assert_eq!(emb.dims(), &[1, 69, 64]);
    let d = max_abs_diff(&emb, &g["adapter.short_out"]);
    assert!(d < TOL, "max abs diff {d}");
}

#[test]
fn lm_logits_for_a_prompt_with_audio_match() {
    let g = golden();
    let m = model();
    let audio = g["adapter.out"].i(0).unwrap();
    let task = NexusTask::Transcribe { language: None };
    let ids = m.prompt_ids(&task, 300).unwrap();
    assert_eq!(ids, ints(&g["lm.prompt_ids"]), "prompt token ids");
    let x = m.splice(&ids, &audio).unwrap();
    let mut cache = m.lm().new_cache();
    let positions: Vec<_> = (0..ids.len() as u32)
        .map(nexus_models::nexus::transformer::text_position)
        .collect();
    let (_, logits) = m.lm().forward(&x, &positions, &mut cache).unwrap();
    let d = max_abs_diff(&logits.i(0).unwrap(), &g["lm.logits"]);
    assert!(d < TOL, "logits: max abs diff {d}");
}

#[test]
fn the_differentiable_forward_matches_the_reference_and_carries_gradients() {
    // Training runs the same functions through operations candle
    // differentiates; the frozen weights get no gradient, the input does.
    let g = golden();
    let m = model();
    let audio = g["adapter.out"].i(0).unwrap();
    let task = NexusTask::Transcribe { language: None };
    let ids = m.prompt_ids(&task, 300).unwrap();
    let var = candle_core::Var::from_tensor(&audio).unwrap();
    let x = m.splice(&ids, var.as_tensor()).unwrap();
    let h = m.lm().forward_differentiable(&x).unwrap();
    let logits = m.lm().logits_differentiable(&h).unwrap();
    let d = max_abs_diff(&logits.i(0).unwrap(), &g["lm.logits"]);
    assert!(d < TOL, "logits: max abs diff {d}");
    let adapter = tiny_adapter();
    let adapted = adapter
        .forward_with(
            &g["whisper.hidden"],
            nexus_models::nexus::Kernels::Differentiable,
        )
        .unwrap();
    let d = max_abs_diff(&adapted, &g["adapter.out"]);
    assert!(d < TOL, "adapter: max abs diff {d}");
    let grads = logits.i((0, ids.len() - 1, 0)).unwrap().backward().unwrap();
    let ga = grads
        .get(var.as_tensor())
        .expect("a gradient for the audio");
    let norm: f32 = ga.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
    assert!(norm.is_finite() && norm > 0.0, "{norm}");
}

#[test]
fn greedy_tokens_and_their_hidden_states_match() {
    let g = golden();
    let m = model();
    let audio = g["adapter.out"].i(0).unwrap();
    let task = NexusTask::Transcribe { language: None };
    let out = m.generate(&task, &audio, 16).unwrap();
    assert_eq!(out.tokens, ints(&g["lm.greedy"]), "greedy tokens");
    let d = max_abs_diff(&out.hidden, &g["lm.greedy_hidden"]);
    assert!(d < TOL, "hidden: max abs diff {d}");
    let text: Vec<u8> = ints(&g["meta.greedy_text"])
        .into_iter()
        .map(|b| b as u8)
        .collect();
    assert_eq!(out.text, String::from_utf8(text).unwrap());
}

#[test]
fn batched_steps_equal_one_session_at_a_time() {
    let g = golden();
    let m = model();
    let audio = g["adapter.out"].i(0).unwrap();
    let short = audio.narrow(0, 0, 40).unwrap();
    let a_task = NexusTask::Transcribe { language: None };
    let b_task = NexusTask::Translate {
        target: "de".into(),
    };
    let solo_a = m.generate(&a_task, &audio, 6).unwrap();
    let solo_b = m.generate(&b_task, &short, 6).unwrap();
    // The same two sessions, stepped together though their lengths differ.
    let mut a = m.start(&a_task, &audio).unwrap();
    let mut b = m.start(&b_task, &short).unwrap();
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..6 {
        let (na, nb) = (a.greedy().unwrap(), b.greedy().unwrap());
        // The chosen token's log-probability is log-softmax of the logits.
        let (ga, lp) = a.greedy_with_logprob().unwrap();
        let want = candle_nn::ops::log_softmax(a.logits(), 0)
            .unwrap()
            .i(na as usize)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(ga, na);
        assert!(lp <= 0.0 && (lp - want).abs() < 1e-4, "{lp} vs {want}");
        ta.push(na);
        tb.push(nb);
        m.lm().step_batch(&[na, nb], &mut [&mut a, &mut b]).unwrap();
    }
    let n = solo_a.tokens.len();
    assert_eq!(ta[..n], solo_a.tokens[..], "session a");
    let n = solo_b.tokens.len();
    assert_eq!(tb[..n], solo_b.tokens[..], "session b");
}

#[test]
fn multimodal_rope_matches_qwen2_vl_and_reduces_to_1d() {
    let g = golden();
    let rot = Rotary::new(16, 1_000_000.0, [2, 3, 3]).unwrap();
    let pos = rows(&g["mrope.positions"]); // 3 × T
    let positions: Vec<[u32; 3]> = (0..pos[0].len())
        .map(|t| [pos[0][t], pos[1][t], pos[2][t]])
        .collect();
    let (cos, sin) = rot.cos_sin(&positions, &Device::Cpu).unwrap();
    for (x, want) in [("mrope.q", "mrope.q_rot"), ("mrope.k", "mrope.k_rot")] {
        let got = rot.apply(&g[x], &cos, &sin).unwrap();
        let d = max_abs_diff(&got, &g[want]);
        assert!(d < 1e-5, "{x}: max abs diff {d}");
    }
    // Equal positions on the three axes are plain 1-D RoPE.
    let plain = Rotary::new(16, 1_000_000.0, [8, 0, 0]).unwrap();
    let same: Vec<[u32; 3]> = (0..6).map(|p| [p * 3, p * 3, p * 3]).collect();
    let (c1, s1) = rot.cos_sin(&same, &Device::Cpu).unwrap();
    let (c2, s2) = plain.cos_sin(&same, &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&c1, &c2), 0.0);
    assert_eq!(max_abs_diff(&s1, &s2), 0.0);
}

#[test]
fn audio_decoder_logits_and_delay_pattern_codes_match() {
    let g = golden();
    let m = model();
    let ad = m.audio_decoder().expect("nexus-tiny has an audio decoder");
    let codes = g["audio.tf_codes"].to_dtype(DType::U32).unwrap();
    let logits = ad.forward(&codes, &g["audio.tf_h"]).unwrap();
    let d = max_abs_diff(&logits, &g["audio.tf_logits"]);
    assert!(d < TOL, "teacher-forced logits: max abs diff {d}");

    let out = m.speak(&g["lm.greedy_hidden"], 40).unwrap();
    assert_eq!(out.delayed, rows(&g["audio.delayed"]), "delayed codes");
    assert_eq!(out.frames, rows(&g["audio.codes"]), "frames");
    // The generated layout is exactly the delay pattern of its frames.
    assert_eq!(delay(&out.frames, 8, ad.pad(), ad.eos()), out.delayed);
    assert_eq!(undelay(&out.delayed, 8, ad.eos()), out.frames);
}

#[test]
fn log_mel_pads_to_whole_adapter_frames() {
    let m = model();
    // 1.234 s: 123 mel frames → 130 (13 adapter frames).
    let samples: Vec<f32> = (0..19744).map(|i| (i as f32 * 0.05).sin() * 0.1).collect();
    let mel = m.log_mel(&samples).unwrap();
    assert_eq!(mel.dims(), &[1, 80, 130]);
    assert_eq!(m.encode(&mel).unwrap().dims(), &[1, 13, 64]);
}

#[test]
fn a_checkpoint_with_a_wrong_model_type_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = std::fs::read_to_string(dir().join("nexus-tiny/config.json")).unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        cfg.replace("\"nexus-o\"", "\"whisper\""),
    )
    .unwrap();
    let e = NexusModel::load(tmp.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model_type") && e.contains("whisper"), "{e}");
}

#[test]
fn a_checkpoint_without_an_audio_decoder_writes_text_only() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(dir().join("nexus-tiny").join(f), tmp.path().join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir().join("nexus-tiny/config.json")).unwrap())
            .unwrap();
    cfg.as_object_mut().unwrap().remove("audio_decoder");
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let m = NexusModel::load(tmp.path(), &Device::Cpu).unwrap();
    assert!(m.audio_decoder().is_none());
    let audio = g["adapter.out"].i(0).unwrap();
    let out = m
        .generate(&NexusTask::Transcribe { language: None }, &audio, 16)
        .unwrap();
    assert_eq!(out.tokens, ints(&g["lm.greedy"]), "the text is the same");
    let err = m.speak(&out.hidden, 10).unwrap_err().to_string();
    assert!(err.contains("no audio decoder"), "{err}");
    let summary = nexus_weights::nexus::check_folder(tmp.path()).unwrap();
    assert!(
        summary.description.contains("no audio decoder"),
        "{}",
        summary.description
    );
}
