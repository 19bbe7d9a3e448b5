//! A NEXUS-O model served by the three-process fleet: ingest (VAD,
//! segmentation) → encoder (Whisper encoder + adapter) → decoder (Qwen2.5 LM
//! with the audio spliced into its prompt, in the continuous-batching pool)
//! → text, on the seeded checkpoint of `crates/models/tests/golden/nexus`.
//!
//! Every final must carry exactly the text the same model gives in-process
//! for the same window of audio, for transcription and for translation; with
//! speech output, the vocoder process (FireFly codec) speaks each final: the
//! decoder's audio decoder turns the LM states of its text into codes in the
//! delay pattern, and the spoken audio equals the in-process model's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use candle_core::Device;
use nexus_models::nexus::{NexusModel, NexusTask};
use nexus_models::vocoder::Firefly;
use nexus_proto::speech::{SpeechAudio, SpeechOutput, Task, TranslationConfig};
use nexus_tests::fleet::{Proc, SessionOutcome, pcm16_config, prefix, redis_url, speech, stream};

fn checkpoint() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crates/models/tests/golden/nexus/nexus-tiny")
}

fn codec() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/models/tests/golden/nexus/firefly-tiny")
}

/// The encoder, decoder and ingest processes serving `ckpt` under key prefix `p`.
fn fleet(redis: &str, p: &str, ckpt: &str) -> [Proc; 3] {
    let common = ["--redis", redis, "--model", ckpt, "--key-prefix", p];
    let enc = Proc::start("encoder", "nexus-encoder", &common);
    let dec = Proc::start("decoder", "nexus-decoder", &common);
    // The checks rebuild each final's window from its span: without the
    // finals' lead of quiet, the window is exactly the span.
    let ingest_args = [
        &common[..],
        &["--http-listen", "none", "--final-lead-ms", "0"],
    ]
    .concat();
    let ing = Proc::start("ingest", "nexus-ingest", &ingest_args);
    [enc, dec, ing]
}

/// What the ingest hears of `samples` sent as 16-bit PCM.
fn as_sent(samples: &[f32]) -> Vec<f32> {
    samples
        .iter()
        .map(|s| f32::from((s.clamp(-1.0, 1.0) * 32767.0) as i16) / 32768.0)
        .collect()
}

fn check_finals(
    out: &SessionOutcome,
    heard: &[f32],
    model: &NexusModel,
    task: &NexusTask,
    translated: bool,
) {
    assert!(out.status.is_none(), "session failed: {:?}", out.status);
    let finals: Vec<_> = out
        .responses
        .iter()
        .flat_map(|r| &r.results)
        .filter(|r| r.is_final)
        .collect();
    assert!(finals.len() >= 2, "finals: {finals:?}");
    let mut texts = 0;
    for f in finals {
        let span = f.span.expect("a final has its span");
        let (a, b) = (
            span.start_ms as usize * 16,
            (span.end_ms as usize * 16).min(heard.len()),
        );
        let audio = model.encode_audio(&heard[a..b]).unwrap();
        let want = model
            .generate(task, &audio, 160)
            .unwrap()
            .text
            .trim()
            .to_owned();
        let got = f
            .alternatives
            .first()
            .map(|a| a.transcript.clone())
            .unwrap_or_default();
        assert_eq!(got, want, "window {}–{} ms", span.start_ms, span.end_ms);
        if let Some(a) = f.alternatives.first() {
            assert!(
                a.confidence > 0.0 && a.confidence <= 1.0,
                "a NEXUS final's confidence is its tokens' mean probability: {}",
                a.confidence
            );
        }
        if translated && !want.is_empty() {
            let t = f.translation.as_ref().expect("a translated final");
            assert_eq!(
                (t.text.as_str(), t.target_language.as_str()),
                (want.as_str(), "de")
            );
        }
        texts += usize::from(!want.is_empty());
    }
    assert!(texts >= 2, "the model said nothing in most windows");
}

#[tokio::test]
#[ignore = "needs silero-vad weights, LibriVox test speech and Redis; scripts/test.sh"]
async fn a_nexus_session_runs_through_the_three_processes() {
    let redis = redis_url();
    let p = prefix("nexus");
    let ckpt = checkpoint();
    let ckpt = ckpt.to_str().unwrap();
    let [mut enc, mut dec, mut ing] = fleet(&redis, &p, ckpt);
    let codec_dir = codec();
    let voc_args = [
        "--redis",
        redis.as_str(),
        "--key-prefix",
        p.as_str(),
        "--voice",
        "",
        "--codec",
        codec_dir.to_str().unwrap(),
    ];
    let mut voc = Proc::start("vocoder", "nexus-vocoder", &voc_args);
    for p in [&mut enc, &mut dec, &mut ing, &mut voc] {
        p.wait_serving(Duration::from_secs(120)).await;
    }
    let model = NexusModel::load(&checkpoint(), &Device::Cpu).unwrap();
    let samples = speech();
    let heard = as_sent(&samples);

    let out = stream(ing.addr, pcm16_config(ckpt), &samples, 4.0, |_| {})
        .await
        .unwrap();
    let task = NexusTask::Transcribe {
        language: Some("en".into()),
    };
    check_finals(&out, &heard, &model, &task, false);
    assert!(
        out.responses
            .iter()
            .flat_map(|r| &r.results)
            .any(|r| !r.is_final),
        "interim results"
    );
    // A whole recording: the LM has no no-speech token, so its segments
    // leave that figure out rather than report a zero.
    let wav = nexus_audio::wav::encode_pcm16(std::slice::from_ref(&samples), 16_000);
    let mut rc = nexus_tests::fleet::english_config();
    rc.model = ckpt.into();
    let r = nexus_tests::fleet::recognize(
        &ing,
        rc,
        nexus_proto::speech::recognize_request::AudioSource::Content(wav.into()),
    )
    .await
    .unwrap();
    assert!(!r.results.is_empty());
    assert!(
        r.results.iter().all(|s| s.no_speech_probability.is_none()),
        "{:#?}",
        r.results
    );

    // Speech translation: the prompt asks for German; the text is the translation.
    let mut cfg = pcm16_config(ckpt);
    let rc = cfg.config.as_mut().unwrap();
    rc.task = Task::Translate as i32;
    rc.translation = Some(TranslationConfig {
        target_language: "de".into(),
        ..Default::default()
    });
    let out = stream(ing.addr, cfg, &samples, 4.0, |_| {}).await.unwrap();
    check_finals(
        &out,
        &heard,
        &model,
        &NexusTask::Translate {
            target: "de".into(),
        },
        true,
    );

    // Speech output: each final's text spoken by the audio decoder and FireFly.
    let mut cfg = pcm16_config(ckpt);
    cfg.config.as_mut().unwrap().speech_output = Some(SpeechOutput { enabled: true });
    let out = stream(ing.addr, cfg, &samples, 4.0, |_| {}).await.unwrap();
    assert!(
        out.ended(),
        "the session ends once every final is spoken: {:?}",
        out.status
    );
    let task = NexusTask::Transcribe {
        language: Some("en".into()),
    };
    check_finals(&out, &heard, &model, &task, false);
    let firefly = Firefly::load(&codec(), &Device::Cpu).unwrap();
    let mut spoken = 0;
    for f in out
        .responses
        .iter()
        .flat_map(|r| &r.results)
        .filter(|r| r.is_final && !r.alternatives.is_empty())
    {
        let span = f.span.unwrap();
        let (a, b) = (
            span.start_ms as usize * 16,
            (span.end_ms as usize * 16).min(heard.len()),
        );
        let g = model
            .generate(&task, &model.encode_audio(&heard[a..b]).unwrap(), 160)
            .unwrap();
        let codes = model
            .speak(&g.hidden, (g.tokens.len() * 12).max(24))
            .unwrap();
        let want: Vec<i32> = firefly
            .decode_frames(&codes.frames)
            .unwrap()
            .iter()
            .map(|x| i32::from((x.clamp(-1.0, 1.0) * 32767.0).round() as i16))
            .collect();
        let pieces: Vec<&SpeechAudio> = out
            .responses
            .iter()
            .filter_map(|r| r.speech_audio.as_ref())
            .filter(|s| s.segment_id == f.segment_id)
            .collect();
        assert!(
            pieces.last().is_some_and(|p| p.is_last),
            "segment {} spoken to its end",
            f.segment_id
        );
        assert!(
            pieces
                .iter()
                .all(|p| p.error.is_empty() && p.sample_rate_hz == firefly.sample_rate())
        );
        let got: Vec<i32> = pieces
            .iter()
            .flat_map(|p| {
                p.audio
                    .chunks_exact(2)
                    .map(|b| i32::from(i16::from_le_bytes([b[0], b[1]])))
            })
            .collect();
        assert_eq!(
            got.len(),
            codes.frames.len() * firefly.hop(),
            "segment {}",
            f.segment_id
        );
        let worst = got
            .iter()
            .zip(&want)
            .map(|(x, y)| (x - y).abs())
            .max()
            .unwrap_or(0);
        assert!(
            worst <= 2,
            "segment {}: samples differ by up to {worst}",
            f.segment_id
        );
        spoken += 1;
    }
    assert!(spoken >= 2, "spoken finals: {spoken}");
}

#[tokio::test]
#[ignore = "needs silero-vad weights, LibriVox test speech and Redis; scripts/test.sh"]
async fn a_text_only_checkpoint_transcribes_and_refuses_speech_output() {
    // nexus-tiny without its audio decoder, as NEXUS-mini is.
    let tmp = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(checkpoint().join(f), tmp.path().join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(checkpoint().join("config.json")).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("audio_decoder");
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let (_fleet, ing, samples) = transcribes_as_in_process(tmp.path(), "nexus-text").await;
    let ckpt = tmp.path().to_str().unwrap();
    let mut cfg = pcm16_config(ckpt);
    cfg.config.as_mut().unwrap().speech_output = Some(SpeechOutput { enabled: true });
    let status = match stream(ing.addr, cfg, &samples[..16_000], 4.0, |_| {}).await {
        Err(s) => s,
        Ok(out) => out.status.expect("the session is refused"),
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("speech_output"), "{status:?}");
}

#[tokio::test]
#[ignore = "needs nexus models pull nexus-mini, silero-vad, LibriVox test speech and Redis; scripts/test.sh"]
async fn nexus_mini_transcribes_librivox_through_the_three_processes_as_in_process() {
    // NEXUS-mini: this project's trained adapter between the pinned Whisper
    // base encoder and Qwen2.5-0.5B-Instruct, as `nexus models pull` assembles it.
    let dir = nexus_weights::resolve::resolve_model("nexus-mini", None)
        .expect("nexus models pull nexus-mini");
    transcribes_as_in_process(&dir, "nexus-mini").await;
}

/// Serves checkpoint `dir` with the three processes, streams the LibriVox
/// speech and checks every final against the in-process model; returns the
/// processes (the encoder and decoder, then the ingest) and the speech.
async fn transcribes_as_in_process(
    dir: &std::path::Path,
    name: &str,
) -> ([Proc; 2], Proc, Vec<f32>) {
    let redis = redis_url();
    let p = prefix(name);
    let ckpt = dir.to_str().unwrap();
    let [mut enc, mut dec, mut ing] = fleet(&redis, &p, ckpt);
    for p in [&mut enc, &mut dec, &mut ing] {
        p.wait_serving(Duration::from_secs(300)).await;
    }
    let samples = speech();
    let model = NexusModel::load(dir, &Device::Cpu).unwrap();
    let out = stream(ing.addr, pcm16_config(ckpt), &samples, 4.0, |_| {})
        .await
        .unwrap();
    let task = NexusTask::Transcribe {
        language: Some("en".into()),
    };
    check_finals(&out, &as_sent(&samples), &model, &task, false);
    ([enc, dec], ing, samples)
}
