//! Who spoke when, through the fleet's real interfaces (`nexus serve` on
//! Redis): gRPC Recognize with `diarization`, the OpenAI HTTP API with the
//! `diarize` extension field from OpenAI's own Python client, WebVTT voices
//! read by webvtt-py, and the errors for bad counts and for live streams.
//!
//! Needs the tiny.en, silero-vad and ge2e weights, the test data, Redis and
//! `.venv`; `scripts/test.sh` provides them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use nexus_eval::der::{Segment, der};
use nexus_eval::meetings::{self, MEETINGS};
use nexus_proto::speech::recognize_request::AudioSource;
use nexus_proto::speech::{RecognitionConfig, SpeakerDiarizationConfig};
use nexus_tests::fleet::{
    MODEL, english_config, free_addr, pcm16_config, prefix, python, recognize, redis_url, stage,
    stream, testdata,
};
use tonic::Code;

fn load16k(rel: &str) -> Vec<f32> {
    let path = testdata().join(rel);
    let bytes = std::fs::read(&path).expect("run scripts/fetch-testdata.sh");
    let ext = path.extension().and_then(|e| e.to_str());
    nexus_audio::decode_to_model_rate(
        bytes,
        ext,
        &nexus_audio::AudioLimits::default(),
        nexus_audio::Layout::Mono,
    )
    .unwrap()
    .remove(0)
}

fn wav(samples: &[f32]) -> Vec<u8> {
    let data = (samples.len() * 2) as u32;
    let mut b = Vec::new();
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00");
    b.extend_from_slice(&16_000u32.to_le_bytes());
    b.extend_from_slice(&32_000u32.to_le_bytes());
    b.extend_from_slice(b"\x02\x00\x10\x00data");
    b.extend_from_slice(&data.to_le_bytes());
    for s in samples {
        b.extend_from_slice(&((s.clamp(-1.0, 1.0) * 32767.0) as i16).to_le_bytes());
    }
    b
}

fn diarized(min: u32, max: u32) -> RecognitionConfig {
    RecognitionConfig {
        diarization: Some(SpeakerDiarizationConfig {
            enable: true,
            min_speakers: min,
            max_speakers: max,
        }),
        ..english_config()
    }
}

#[tokio::test]
#[ignore = "needs tiny.en, silero-vad, ge2e, the test data, Redis and .venv; scripts/test.sh"]
async fn recordings_are_diarized_over_grpc_and_http() {
    let meeting = MEETINGS.iter().find(|m| m.name == "three-readers").unwrap();
    let built = meetings::build(meeting, |c| Ok::<_, ()>(load16k(c.path))).unwrap();
    let audio = wav(&built.samples);
    let http = free_addr();
    let p = prefix("diarize");
    let mut fleet = stage(
        "fleet",
        "all",
        &redis_url(),
        &p,
        &["--http-listen", &http.to_string()],
    );
    fleet
        .wait_serving(std::time::Duration::from_secs(120))
        .await;

    // gRPC: words and results carry speakers; DER from the words' speakers.
    let r = recognize(
        &fleet,
        diarized(0, 0),
        AudioSource::Content(audio.clone().into()),
    )
    .await
    .unwrap();
    let mut hyp = Vec::new();
    for res in &r.results {
        let alt = &res.alternatives[0];
        assert!(!res.speaker.is_empty(), "{res:?}");
        for w in &alt.words {
            assert_eq!(w.speaker, res.speaker, "a result has one speaker");
            hyp.push(Segment {
                start: w.start_ms as f64 / 1000.0,
                end: w.end_ms as f64 / 1000.0,
                speaker: w.speaker.clone(),
            });
        }
    }
    let mut found: Vec<&str> = r.results.iter().map(|r| r.speaker.as_str()).collect();
    found.sort_unstable();
    found.dedup();
    assert_eq!(found, ["Speaker 1", "Speaker 2", "Speaker 3"]);
    // Words leave gaps between them, so score confusion only: of the speech
    // both sides have, almost none may go to the wrong reader.
    let (d, _) = der(&built.reference, &hyp, 0.25);
    assert!(d.confusion < 0.05 * d.total, "{d:?}");

    // Counts given are held; bad ones are refused naming the field.
    let one = recognize(
        &fleet,
        diarized(0, 1),
        AudioSource::Content(audio.clone().into()),
    )
    .await
    .unwrap();
    assert!(one.results.iter().all(|r| r.speaker == "Speaker 1"));
    for (min, max, field) in [(3, 2, "above max_speakers"), (0, 33, "max_speakers is 33")] {
        let e = recognize(
            &fleet,
            diarized(min, max),
            AudioSource::Content(audio.clone().into()),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message().contains(field) && e.message().contains("diarization."),
            "{e}"
        );
    }
    // Without enable, counts are an error, not ignored.
    let mut half = diarized(2, 2);
    half.diarization.as_mut().unwrap().enable = false;
    let e = recognize(&fleet, half, AudioSource::Content(audio.clone().into()))
        .await
        .unwrap_err();
    assert!(e.message().contains("diarization.enable is false"), "{e}");
    // Live streams do not take it (yet): said, not ignored.
    let mut cfg = pcm16_config(MODEL);
    cfg.config.as_mut().unwrap().diarization = diarized(0, 0).diarization;
    let e = stream(fleet.addr, cfg, &[0.0; 1_600], 100.0, |_| {})
        .await
        .expect_err("diarization on a live stream is refused");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("live streams do not take it yet"),
        "{e}"
    );

    // HTTP through OpenAI's client.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &audio).unwrap();
    let base = format!("http://{http}/v1");
    let path = file.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python())
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/diarize_client.py"))
            .arg(&base)
            .arg(&path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut speakers: Vec<String> = v["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[2].as_str().unwrap().to_owned())
        .collect();
    speakers.dedup();
    // Turn order of the meeting: austen, spk2, lj, austen, spk2, austen.
    assert_eq!(
        speakers,
        [
            "Speaker 1",
            "Speaker 2",
            "Speaker 3",
            "Speaker 1",
            "Speaker 2",
            "Speaker 1"
        ],
        "{v}"
    );
    assert_eq!(v["words"], v["words_with_speaker"]);
    let mut voices: Vec<String> = v["vtt_voices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    voices.dedup();
    assert_eq!(voices, speakers, "{v}");
    assert_eq!(v["one"], serde_json::json!(["Speaker 1"]));
    fleet.terminate();
}
