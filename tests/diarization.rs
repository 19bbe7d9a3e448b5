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
use nexus_proto::speech::submit_job_request::Source;
use nexus_proto::speech::transcription_jobs_client::TranscriptionJobsClient;
use nexus_proto::speech::{
    GetJobRequest, GetJobResultRequest, JobState, OutputFormat, RecognitionConfig,
    SpeakerDiarizationConfig, SubmitJobRequest,
};
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
    nexus_audio::wav::encode_pcm16(&[samples.to_vec()], 16_000)
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

    // Silence asked to be diarized: no speech, no results, no error.
    let silent = recognize(
        &fleet,
        diarized(0, 0),
        AudioSource::Content(wav(&vec![0.0; 16_000 * 20]).into()),
    )
    .await
    .unwrap();
    assert!(silent.results.is_empty(), "{silent:?}");
    // Counts given are held; bad ones are refused naming the field.
    let one = recognize(
        &fleet,
        diarized(0, 1),
        AudioSource::Content(audio.clone().into()),
    )
    .await
    .unwrap();
    assert!(one.results.iter().all(|r| r.speaker == "Speaker 1"));
    for (min, max, field) in [
        (3, 2, "above max_speakers"),
        (0, 33, "max_speakers is 33"),
        (
            u32::MAX,
            0,
            "min_speakers is 4294967295; it must be 1 to 32",
        ),
    ] {
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
    // Live: each final's words are labelled as they arrive, consistently
    // across the session; only the most speakers may be given.
    let mut cfg = pcm16_config(MODEL);
    cfg.config.as_mut().unwrap().diarization = diarized(0, 0).diarization;
    let out = stream(fleet.addr, cfg.clone(), &built.samples, 4.0, |_| {})
        .await
        .unwrap();
    let mut live = Vec::new();
    for f in out.finals() {
        assert!(f.speaker.starts_with("Speaker "), "{f:?}");
        for w in &f.alternatives[0].words {
            live.push(Segment {
                start: w.start_ms as f64 / 1000.0,
                end: w.end_ms as f64 / 1000.0,
                speaker: w.speaker.clone(),
            });
        }
    }
    let (d, _) = der(&built.reference, &live, 0.25);
    assert!(d.confusion < 0.1 * d.total, "live: {d:?}");
    let mut live_speakers: Vec<&str> = live.iter().map(|s| s.speaker.as_str()).collect();
    live_speakers.sort_unstable();
    live_speakers.dedup();
    assert!(live_speakers.len() >= 3, "{live_speakers:?}");
    cfg.config.as_mut().unwrap().diarization = diarized(2, 0).diarization;
    let e = stream(fleet.addr, cfg, &[0.0; 1_600], 100.0, |_| {})
        .await
        .expect_err("min_speakers on a live stream is refused");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("min_speakers applies to whole recordings"),
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

    // A batch job: the WebVTT output has the same voices in the same order.
    let mut jobs = TranscriptionJobsClient::new(nexus_tests::connect(fleet.addr).await.unwrap())
        .max_encoding_message_size(64 << 20);
    let job = jobs
        .submit_job(SubmitJobRequest {
            config: Some(diarized(0, 0)),
            source: Some(Source::Content(audio.into())),
            output_formats: vec![OutputFormat::Vtt as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut watch = jobs
        .watch_job(GetJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut state = job.state;
    while let Some(j) = watch.message().await.unwrap() {
        state = j.state;
        if state >= JobState::Succeeded as i32 {
            break;
        }
    }
    assert_eq!(state, JobState::Succeeded as i32);
    let vtt = jobs
        .get_job_result(GetJobResultRequest {
            job_id: job.job_id,
            format: OutputFormat::Vtt as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let vtt = String::from_utf8(vtt.content.to_vec()).unwrap();
    let mut job_voices: Vec<&str> = vtt
        .lines()
        .filter_map(|l| l.strip_prefix("<v ").and_then(|l| l.split('>').next()))
        .collect();
    job_voices.dedup();
    assert_eq!(job_voices, speakers, "{vtt}");
    fleet.terminate();
}
