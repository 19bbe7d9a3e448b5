//! The public API of a running fleet, called as clients call it: whole-audio
//! Recognize (content and file:// locations), ListModels, and every validation
//! error with its status code and message.
//!
//! Needs the tiny.en and silero-vad weights, the LibriVox test speech and a
//! Redis on 127.0.0.1; `scripts/test.sh` provides all three.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use nexus_proto::speech::models_client::ModelsClient;
use nexus_proto::speech::recognize_request::AudioSource;
use nexus_proto::speech::{
    AudioEncoding, AudioFormat, Capability, ListModelsRequest, RecognitionConfig,
};
use nexus_tests::fleet::{
    MODEL, english_config, prefix, recognize, redis_url, speech, stage, text,
};
use tonic::Code;

/// The shared test speech as a 16 kHz WAV.
fn speech_wav() -> Vec<u8> {
    nexus_audio::wav::encode_pcm16(&[speech()], 16_000)
}

#[tokio::test]
#[ignore = "needs tiny.en + silero-vad weights, LibriVox test speech and Redis; scripts/test.sh"]
async fn recognize_returns_timed_segments_of_whole_files() {
    let dir = tempfile::tempdir().unwrap();
    let wav = speech_wav();
    std::fs::write(dir.path().join("speech.wav"), &wav).unwrap();
    let p = prefix("recognize");
    let root = dir.path().to_str().unwrap();
    let mut fleet = stage(
        "fleet",
        "all",
        &redis_url(),
        &p,
        &["--file-root", root, "--max-audio-mb", "1"],
    );
    fleet.wait_serving(Duration::from_secs(120)).await;

    let r = recognize(
        &fleet,
        english_config(),
        AudioSource::Content(wav.clone().into()),
    )
    .await
    .unwrap();
    assert!(!r.request_id.is_empty());
    assert_eq!(r.model, MODEL);
    assert_eq!(r.language, "en");
    let duration = (wav.len() as u64 - 44) / 2 * 1000 / 16_000;
    assert_eq!(r.audio_duration_ms, duration);
    // Every word of the offline transcript, up to Whisper hearing an utterance
    // alone a little differently from inside a longer window.
    let reference = nexus_tests::fleet::transcribe_file(&dir.path().join("speech.wav"), &[]);
    let got = text(&r);
    let wer = nexus_eval::wer(&reference, &got);
    assert!(
        wer.rate() <= 0.10,
        "WER {:.3} against offline\n{reference}\n{got}",
        wer.rate()
    );
    // Whisper's no-speech probability is reported for every segment.
    assert!(
        r.results.iter().all(|s| s
            .no_speech_probability
            .is_some_and(|p| (0.0..=1.0).contains(&p))),
        "{:#?}",
        r.results
    );
    // Segments are in time order, inside the audio, and their words inside them.
    assert!(r.results.len() >= 3, "{:#?}", r.results);
    let mut last_end = 0;
    for s in &r.results {
        let span = s.span.unwrap();
        assert!(span.start_ms + 200 >= last_end, "overlap at {span:?}");
        assert!(span.start_ms < span.end_ms && span.end_ms <= duration);
        last_end = span.end_ms;
        let words = &s.alternatives[0].words;
        assert!(!words.is_empty(), "no word times: {s:?}");
        for w in words {
            assert!(
                w.start_ms + 50 >= span.start_ms && w.end_ms <= span.end_ms + 50,
                "{w:?} outside {span:?}"
            );
        }
    }

    // The same file by location.
    let by_uri = recognize(
        &fleet,
        english_config(),
        AudioSource::Uri("file:///speech.wav".into()),
    )
    .await
    .unwrap();
    assert_eq!(text(&by_uri), got);

    // Silence holds no speech: no results, no error.
    let silence = nexus_audio::wav::encode_pcm16(&[vec![0.0; 48_000]], 16_000);
    let r = recognize(
        &fleet,
        english_config(),
        AudioSource::Content(silence.into()),
    )
    .await
    .unwrap();
    assert!(r.results.is_empty(), "{:?}", r.results);
    assert_eq!(r.audio_duration_ms, 3_000);

    // ListModels: what is served, English-only, and ready.
    let ch = nexus_tests::connect(fleet.addr).await.unwrap();
    let models = ModelsClient::new(ch.clone())
        .list_models(ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    let tiny = models.iter().find(|m| m.name == MODEL).unwrap();
    assert!(tiny.ready && tiny.is_default, "{tiny:?}");
    assert_eq!(tiny.languages, vec!["en".to_string()]);
    assert!(tiny.translation_targets.is_empty(), "{tiny:?}");
    let vad = ModelsClient::new(ch)
        .list_models(ListModelsRequest {
            capability: Capability::VoiceActivity as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(vad.len(), 1);
    assert_eq!(vad[0].name, "silero-vad");

    // Bad requests: INVALID_ARGUMENT saying what to change.
    let cases: Vec<(&str, RecognitionConfig, AudioSource, &str)> = vec![
        (
            "unknown model",
            RecognitionConfig {
                model: "whisper-huge".into(),
                ..english_config()
            },
            AudioSource::Content(wav.clone().into()),
            "is not served here; use one of",
        ),
        (
            "unknown language",
            RecognitionConfig {
                language: "xx".into(),
                ..english_config()
            },
            AudioSource::Content(wav.clone().into()),
            "is not one Whisper knows",
        ),
        (
            "empty audio",
            english_config(),
            AudioSource::Content(Vec::new().into()),
            "content is empty",
        ),
        (
            "not audio",
            english_config(),
            AudioSource::Content(b"this is not a sound file at all".to_vec().into()),
            "the audio could not be read",
        ),
        (
            "too large",
            english_config(),
            AudioSource::Content(vec![0u8; 1_500_000].into()),
            "the limit is 1048576 bytes",
        ),
        (
            "streaming format",
            RecognitionConfig {
                audio_format: Some(AudioFormat {
                    encoding: AudioEncoding::OpusPackets as i32,
                    sample_rate_hz: 48_000,
                    channels: 1,
                }),
                ..english_config()
            },
            AudioSource::Content(wav.clone().into()),
            "OPUS_PACKETS is a streaming format",
        ),
        (
            "location outside the root",
            english_config(),
            AudioSource::Uri("file:///../../etc/passwd".into()),
            "outside the readable root",
        ),
        (
            "unsupported scheme",
            english_config(),
            AudioSource::Uri("ftp://example/speech.wav".into()),
            "only file:// locations",
        ),
    ];
    for (what, cfg, source, message) in cases {
        let err = recognize(&fleet, cfg, source).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(
            err.message().contains(message),
            "{what}: {:?} lacks {message:?}",
            err.message()
        );
    }
    fleet.terminate();
}
