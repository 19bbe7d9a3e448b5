//! SpeechSynthesis through the fleet: ingest (the public API) → the
//! `synthesize` stream → the vocoder process (Piper en_US-joe-medium in
//! candle) → the request's result log → the client.
//!
//! The Seed-TTS style check: twenty everyday sentences synthesised over gRPC
//! and read back by whisper base stay within 5 % WER. Streaming delivers the
//! same audio sentence by sentence; bad requests are refused by name.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use candle_core::Device;
use nexus_eval::sentences::EVERYDAY;
use nexus_proto::speech::speech_synthesis_client::SpeechSynthesisClient;
use nexus_proto::speech::{AudioEncoding, SynthesizeRequest};
use nexus_tests::fleet::{Proc, prefix, redis_url};
use tonic::Code;

struct Fleet {
    _vocoder: Proc,
    ingest: Proc,
}

async fn fleet(name: &str) -> Fleet {
    let redis = redis_url();
    let p = prefix(name);
    let common = ["--redis", redis.as_str(), "--key-prefix", p.as_str()];
    let mut vocoder = Proc::start("vocoder", "nexus-vocoder", &common);
    let ingest_args = [
        &common[..],
        &["--http-listen", "none", "--model", "tiny.en"],
    ]
    .concat();
    let mut ingest = Proc::start("ingest", "nexus-ingest", &ingest_args);
    vocoder.wait_serving(Duration::from_secs(120)).await;
    ingest.wait_serving(Duration::from_secs(120)).await;
    Fleet {
        _vocoder: vocoder,
        ingest,
    }
}

async fn client(f: &Fleet) -> SpeechSynthesisClient<tonic::transport::Channel> {
    SpeechSynthesisClient::new(nexus_tests::connect(f.ingest.addr).await.unwrap())
}

fn s16(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
        .collect()
}

#[tokio::test]
#[ignore = "needs the piper-en-us-joe-medium voice, whisper base, silero-vad and Redis; scripts/test.sh"]
async fn twenty_sentences_synthesized_over_grpc_read_back_within_5_percent_wer() {
    let f = fleet("tts-wer").await;
    let mut c = client(&f).await;
    let dir =
        nexus_weights::Store::new(nexus_weights::Store::default_root()).model_dir("whisper-base");
    let asr = nexus_models::whisper::WhisperEngine::load(&dir, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{e}: run `nexus models pull base` first"));
    let opts = nexus_models::whisper::TranscribeOptions {
        language: Some("en".into()),
        ..Default::default()
    };
    let (mut errors, mut words, mut audio_s, mut wall_s) = (0, 0, 0.0, 0.0);
    for text in EVERYDAY {
        let t0 = Instant::now();
        let r = c
            .synthesize(SynthesizeRequest {
                text: text.into(),
                encoding: AudioEncoding::Container as i32,
                sample_rate_hz: 16_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        wall_s += t0.elapsed().as_secs_f64();
        assert_eq!((r.sample_rate_hz, r.is_last), (16_000, true));
        let wav =
            nexus_audio::decode_bytes(r.audio.to_vec(), Some("wav"), &Default::default()).unwrap();
        assert_eq!(wav.sample_rate, 16_000);
        let samples = wav.channels[0].clone();
        audio_s += samples.len() as f64 / 16_000.0;
        assert!((r.duration_ms as f64 - samples.len() as f64 / 16.0).abs() < 2.0);
        let heard = asr.transcribe(&samples, &opts, &mut |_| {}).unwrap().text();
        let e = nexus_eval::wer(text, &heard);
        eprintln!("{:>2} errors  {text:?} → {heard:?}", e.errors);
        errors += e.errors;
        words += e.reference_len;
    }
    let wer = errors as f64 / words as f64;
    eprintln!(
        "WER {:.2} % ({errors}/{words} words); {audio_s:.1} s of speech in {wall_s:.1} s through the fleet",
        100.0 * wer
    );
    assert!(wer <= 0.05, "WER {wer}");
}

#[tokio::test]
#[ignore = "needs the piper-en-us-joe-medium voice, silero-vad and Redis; scripts/test.sh"]
async fn streaming_delivers_sentence_by_sentence_the_same_audio_and_bad_requests_are_named() {
    let f = fleet("tts-stream").await;
    let mut c = client(&f).await;
    let text =
        "The first sentence is short. The second one follows it. And a third closes the test.";
    let req = SynthesizeRequest {
        text: text.into(),
        ..Default::default()
    };
    let whole = c.synthesize(req.clone()).await.unwrap().into_inner();
    assert_eq!(
        whole.sample_rate_hz, 22_050,
        "the voice's own rate by default"
    );
    let t0 = Instant::now();
    let mut stream = c.synthesize_streaming(req).await.unwrap().into_inner();
    let mut chunks = Vec::new();
    let mut first_at = None;
    while let Some(m) = stream.message().await.unwrap() {
        first_at.get_or_insert(t0.elapsed());
        chunks.push(m);
    }
    let total = t0.elapsed();
    assert_eq!(chunks.len(), 3, "one chunk per sentence");
    assert!(chunks.last().unwrap().is_last && chunks.iter().filter(|c| c.is_last).count() == 1);
    let first_at = first_at.unwrap();
    assert!(first_at < total, "first audio at {first_at:?} of {total:?}");
    eprintln!("first audio after {first_at:?}, all after {total:?}");
    let streamed: Vec<u8> = chunks.iter().flat_map(|c| c.audio.to_vec()).collect();
    assert_eq!(
        streamed,
        whole.audio.to_vec(),
        "streamed and whole audio are the same"
    );

    // Speaking faster makes it shorter.
    let fast = c
        .synthesize(SynthesizeRequest {
            text: text.into(),
            speaking_rate: 1.5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (n_fast, n) = (s16(&fast.audio).len(), s16(&whole.audio).len());
    assert!((n_fast as f64) < 0.8 * n as f64, "{n_fast} vs {n} samples");

    for (req, code, needle) in [
        (
            SynthesizeRequest::default(),
            Code::InvalidArgument,
            "text is empty",
        ),
        (
            SynthesizeRequest {
                text: "hi".into(),
                voice: "nobody".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "\"nobody\"",
        ),
        (
            SynthesizeRequest {
                text: "hi".into(),
                encoding: AudioEncoding::OggOpus as i32,
                ..Default::default()
            },
            Code::InvalidArgument,
            "OGG_OPUS",
        ),
        (
            SynthesizeRequest {
                text: "hi".into(),
                speaking_rate: 9.0,
                ..Default::default()
            },
            Code::InvalidArgument,
            "speaking_rate",
        ),
        (
            SynthesizeRequest {
                text: "hola".into(),
                language: "es".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "\"es\"",
        ),
        (
            SynthesizeRequest {
                text: "x".repeat(5_001),
                ..Default::default()
            },
            Code::InvalidArgument,
            "5001 characters",
        ),
    ] {
        let e = c.synthesize(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{}", e.message());
        assert!(e.message().contains(needle), "{}", e.message());
    }
    let e = c
        .synthesize_streaming(SynthesizeRequest {
            text: "hi".into(),
            encoding: AudioEncoding::Container as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("CONTAINER"), "{}", e.message());
}
