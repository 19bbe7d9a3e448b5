//! Batch jobs and resumed live sessions on a fleet over Redis.
//!
//! Jobs: submit, watch progress, results in every format, idempotency,
//! cancel, validation, and a job that survives SIGKILL of the ingest running it.
//! Resume: a live session whose client drops is resumed with the results it
//! missed and more audio; an ended session hands over its finals; an unknown
//! session is NOT_FOUND.
//!
//! Needs the tiny.en and silero-vad weights, the LibriVox test speech and a
//! Redis on 127.0.0.1; `scripts/test.sh` provides all three.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use nexus_proto::speech::speech_recognition_client::SpeechRecognitionClient;
use nexus_proto::speech::streaming_recognize_request::StreamingRequest;
use nexus_proto::speech::submit_job_request::Source;
use nexus_proto::speech::transcription_jobs_client::TranscriptionJobsClient;
use nexus_proto::speech::{
    CancelJobRequest, GetJobRequest, GetJobResultRequest, Job, JobState, OutputFormat,
    ResumeSession, SpeechEvent, StreamingRecognizeRequest, StreamingRecognizeResponse,
    SubmitJobRequest,
};
use nexus_tests::fleet::{
    MODEL, Proc, english_config, pcm16_config, prefix, redis_url, speech, stage,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

fn submit(content: Vec<u8>, key: &str) -> SubmitJobRequest {
    SubmitJobRequest {
        config: Some(english_config()),
        source: Some(Source::Content(content.into())),
        output_formats: vec![
            OutputFormat::Srt as i32,
            OutputFormat::Vtt as i32,
            OutputFormat::Text as i32,
            OutputFormat::Json as i32,
        ],
        idempotency_key: key.into(),
        ..Default::default()
    }
}

async fn jobs(p: &Proc) -> TranscriptionJobsClient<Channel> {
    TranscriptionJobsClient::new(nexus_tests::connect(p.addr).await.unwrap())
        .max_encoding_message_size(64 << 20)
}

async fn wait_for(ingest: &Proc, id: &str, timeout: Duration, done: impl Fn(&Job) -> bool) -> Job {
    let t0 = Instant::now();
    loop {
        let j = jobs(ingest)
            .await
            .get_job(GetJobRequest { job_id: id.into() })
            .await
            .unwrap()
            .into_inner();
        if done(&j) {
            return j;
        }
        assert!(
            t0.elapsed() < timeout,
            "job {id} still {j:?} after {timeout:?}:\n{}",
            ingest.log().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ingest(p: &str, name: &str) -> Proc {
    stage(
        name,
        "ingest",
        &redis_url(),
        p,
        &["--job-lease-ms", "2000", "--resume-grace-ms", "20000"],
    )
}

#[tokio::test]
#[ignore = "needs tiny.en + silero-vad weights, LibriVox test speech and Redis; scripts/test.sh"]
async fn jobs_report_progress_survive_a_killed_runner_and_cancel() {
    let p = prefix("jobs");
    let redis = redis_url();
    let mut enc = stage("encoder", "encoder", &redis, &p, &[]);
    let mut dec = stage("decoder", "decoder", &redis, &p, &[]);
    let mut ing = ingest(&p, "ingest");
    for s in [&mut enc, &mut dec, &mut ing] {
        s.wait_serving(Duration::from_secs(120)).await;
    }
    // Four copies of the test speech: about 70 s, several windows.
    let one = speech();
    let long: Vec<f32> = (0..4).flat_map(|_| one.iter().copied()).collect();
    let wav = nexus_audio::wav::encode_pcm16(&[long], 16_000);

    let job = jobs(&ing)
        .await
        .submit_job(submit(wav.clone(), "first"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state, JobState::Queued as i32);
    // The same idempotency key names the same job.
    let again = jobs(&ing)
        .await
        .submit_job(submit(wav.clone(), "first"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.job_id, job.job_id);

    // Kill the ingest that runs it as soon as it runs; a new one takes over.
    wait_for(&ing, &job.job_id, Duration::from_secs(60), |j| {
        j.state == JobState::Running as i32
    })
    .await;
    ing.kill9();
    let mut ing = ingest(&p, "ingest-2");
    ing.wait_serving(Duration::from_secs(60)).await;
    let mut watch = jobs(&ing)
        .await
        .watch_job(GetJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    let t0 = Instant::now();
    while let Some(j) = watch.message().await.unwrap() {
        seen.push(j);
        assert!(t0.elapsed() < Duration::from_secs(300), "{seen:#?}");
    }
    let last = seen.last().unwrap().clone();
    assert_eq!(
        last.state,
        JobState::Succeeded as i32,
        "{last:?}\n{}",
        ing.log().join("\n")
    );
    assert_eq!(last.attempts, 2, "{last:?}");
    assert_eq!(last.progress, 1.0);
    assert_eq!(last.processed_ms, last.audio_duration_ms);
    assert!(last.audio_duration_ms > 60_000, "{last:?}");
    assert_eq!(last.outputs.len(), 4);
    // Progress was reported in between, and never went backwards in one attempt.
    let partial: Vec<f32> = seen
        .iter()
        .filter(|j| j.state == JobState::Running as i32)
        .map(|j| j.progress)
        .collect();
    assert!(
        partial.iter().any(|p| *p > 0.0 && *p < 1.0),
        "no partial progress: {partial:?}"
    );
    assert!(partial.windows(2).all(|w| w[0] <= w[1]), "{partial:?}");

    // Results in every format.
    let mut client = jobs(&ing).await;
    let get = |format: OutputFormat| GetJobResultRequest {
        job_id: job.job_id.clone(),
        format: format as i32,
    };
    let json = client
        .get_job_result(get(OutputFormat::Json))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(json.content_type, "application/json");
    let v: serde_json::Value = serde_json::from_slice(&json.content).unwrap();
    let segments = v["segments"].as_array().unwrap().len();
    let text = v["text"].as_str().unwrap().to_owned();
    assert!(text.split_whitespace().count() > 100, "{text}");
    let srt = client
        .get_job_result(get(OutputFormat::Srt))
        .await
        .unwrap()
        .into_inner();
    let srt = String::from_utf8(srt.content.to_vec()).unwrap();
    assert_eq!(srt.matches(" --> ").count(), segments, "{srt}");
    let vtt = client
        .get_job_result(get(OutputFormat::Vtt))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vtt.content_type, "text/vtt; charset=utf-8");
    let vtt = String::from_utf8(vtt.content.to_vec()).unwrap();
    assert!(vtt.starts_with("WEBVTT\n\n"), "{vtt}");
    assert_eq!(vtt.matches(" --> ").count(), segments);
    let txt = client
        .get_job_result(get(OutputFormat::Text))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        String::from_utf8(txt.content.to_vec())
            .unwrap()
            .lines()
            .count(),
        segments
    );
    // The transcript reads like offline transcription of the same file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.wav");
    std::fs::write(&path, &wav).unwrap();
    // Off the runtime: a blocked runtime cannot answer the server's HTTP/2
    // pings, and the server then closes this test's connections.
    let offline =
        tokio::task::spawn_blocking(move || nexus_tests::fleet::transcribe_file(&path, &[]))
            .await
            .unwrap();
    let wer = nexus_eval::wer(&offline, &text);
    assert!(
        wer.rate() <= 0.15,
        "WER {:.3} against offline\n{offline}\n{text}",
        wer.rate()
    );

    // Cancel a queued or running job; its result is then refused.
    let second = client
        .submit_job(submit(wav.clone(), ""))
        .await
        .unwrap()
        .into_inner();
    let cancelled = client
        .cancel_job(CancelJobRequest {
            job_id: second.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, JobState::Cancelled as i32);
    let settled = wait_for(&ing, &second.job_id, Duration::from_secs(30), |j| {
        j.state == JobState::Cancelled as i32 && j.error == "cancelled by request"
    })
    .await;
    assert_eq!(settled.state, JobState::Cancelled as i32);
    let e = client
        .get_job_result(GetJobResultRequest {
            job_id: second.job_id.clone(),
            format: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("CANCELLED"), "{e:?}");
    let e = client
        .cancel_job(CancelJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("SUCCEEDED already"), "{e:?}");

    // Validation.
    for (req, code, msg) in [
        (
            SubmitJobRequest {
                source: Some(Source::Content(wav[..1000].to_vec().into())),
                ..Default::default()
            },
            Code::InvalidArgument,
            "config is required",
        ),
        (
            SubmitJobRequest {
                config: Some(english_config()),
                ..Default::default()
            },
            Code::InvalidArgument,
            "no audio",
        ),
        (
            SubmitJobRequest {
                deadline_unix_ms: 1,
                ..submit(wav[..1000].to_vec(), "")
            },
            Code::InvalidArgument,
            "has passed",
        ),
        (
            SubmitJobRequest {
                output_formats: vec![42],
                ..submit(wav[..1000].to_vec(), "")
            },
            Code::InvalidArgument,
            "not a format",
        ),
        (
            SubmitJobRequest {
                source: Some(Source::Uri("file:///etc/passwd".into())),
                ..submit(Vec::new(), "")
            },
            Code::InvalidArgument,
            "reads no locations",
        ),
    ] {
        let e = client.submit_job(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains(msg), "{msg}: {e:?}");
    }
    let e = client
        .get_job(GetJobRequest {
            job_id: "not an id!".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = client
        .get_job(GetJobRequest {
            job_id: uuid_like(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

/// A TCP proxy to `to`; aborting the task drops both sockets at once.
async fn cuttable_proxy(
    to: std::net::SocketAddr,
) -> (tokio::task::JoinHandle<()>, std::net::SocketAddr) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut pipes = tokio::task::JoinSet::new();
        loop {
            let Ok((mut client, _)) = l.accept().await else {
                return;
            };
            pipes.spawn(async move {
                let mut server = tokio::net::TcpStream::connect(to).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    (task, addr)
}

fn uuid_like() -> String {
    "00000000-0000-4000-8000-000000000000".into()
}

fn audio(c: Vec<u8>) -> StreamingRecognizeRequest {
    StreamingRecognizeRequest {
        streaming_request: Some(StreamingRequest::AudioContent(c.into())),
    }
}

#[tokio::test]
#[ignore = "needs tiny.en + silero-vad weights, LibriVox test speech and Redis; scripts/test.sh"]
async fn a_dropped_live_session_is_resumed_with_the_results_it_missed() {
    let p = prefix("resume");
    let redis = redis_url();
    let mut fleet = stage("fleet", "all", &redis, &p, &["--resume-grace-ms", "20000"]);
    fleet.wait_serving(Duration::from_secs(120)).await;
    let ch = nexus_tests::connect(fleet.addr).await.unwrap();
    let samples = speech();
    let chunks = nexus_tests::fleet::pcm16_chunks(&samples, 1600);
    let half = chunks.len() / 2;

    // First connection, through a proxy that the test cuts like a network
    // failure: the first half at 4x real time, then the connection drops.
    let (proxy, via) = cuttable_proxy(fleet.addr).await;
    let mut client = SpeechRecognitionClient::new(nexus_tests::connect(via).await.unwrap());
    let (tx, rx) = mpsc::channel(16);
    tx.send(StreamingRecognizeRequest {
        streaming_request: Some(StreamingRequest::StreamingConfig(pcm16_config(MODEL))),
    })
    .await
    .unwrap();
    let mut inbound = client
        .streaming_recognize(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let hello = inbound.message().await.unwrap().unwrap();
    let session = hello.session_id.clone();
    for c in &chunks[..half] {
        tx.send(audio(c.clone())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Read what has arrived so far, then cut the connection (no half-close).
    let mut before: Vec<StreamingRecognizeResponse> = Vec::new();
    while let Ok(Ok(Some(r))) =
        tokio::time::timeout(Duration::from_millis(1500), inbound.message()).await
    {
        before.push(r);
    }
    let after = before
        .iter()
        .flat_map(|r| &r.results)
        .map(|r| r.result_index)
        .max()
        .unwrap_or(0);
    proxy.abort();
    let _ = proxy.await;
    drop(inbound);
    drop(tx);
    // The session notices the client is gone and parks for resuming; its
    // results keep being decoded meanwhile.
    let t0 = Instant::now();
    while !fleet
        .log()
        .iter()
        .any(|l| l.contains("session parked for resuming") && l.contains(&session))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the session never parked:\n{}",
            fleet.log().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Second connection: resume, get what was missed, send the rest, half-close.
    let (tx, rx) = mpsc::channel(16);
    tx.send(StreamingRecognizeRequest {
        streaming_request: Some(StreamingRequest::Resume(ResumeSession {
            session_id: session.clone(),
            after_result_index: after,
        })),
    })
    .await
    .unwrap();
    let mut inbound = SpeechRecognitionClient::new(ch.clone())
        .streaming_recognize(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let sender = tokio::spawn(async move {
        for c in chunks[half..].iter().cloned() {
            if tx.send(audio(c)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    let mut resumed = Vec::new();
    while let Some(r) = inbound.message().await.unwrap() {
        assert_eq!(r.session_id, session);
        resumed.push(r);
    }
    sender.await.unwrap();
    assert!(
        resumed
            .iter()
            .any(|r| r.speech_event == SpeechEvent::EndOfSession as i32),
        "{resumed:#?}"
    );
    let finals = |rs: &[StreamingRecognizeResponse]| {
        let mut f: Vec<_> = rs
            .iter()
            .flat_map(|r| r.results.clone())
            .filter(|r| r.is_final)
            .collect();
        f.sort_by_key(|r| r.segment_id);
        f.dedup_by_key(|r| r.segment_id);
        f
    };
    let resumed_finals = finals(&resumed);
    assert!(
        resumed_finals.iter().all(|r| r.result_index > after),
        "a result at or before {after} was delivered again"
    );
    // Together the two connections hold every utterance once, and read like
    // the whole speech.
    let mut all = finals(&before);
    all.extend(resumed_finals.iter().cloned());
    all.sort_by_key(|r| r.segment_id);
    let text: Vec<&str> = all
        .iter()
        .map(|r| r.alternatives[0].transcript.as_str())
        .collect();
    let ids: Vec<u64> = all.iter().map(|r| r.segment_id).collect();
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(ids, unique, "an utterance came twice");
    let whole = nexus_tests::fleet::stream(fleet.addr, pcm16_config(MODEL), &samples, 8.0, |_| {})
        .await
        .unwrap();
    let wer = nexus_eval::wer(&whole.text(), &text.join(" "));
    assert!(
        wer.rate() <= 0.15,
        "WER {:.3}\n{}\n{}",
        wer.rate(),
        whole.text(),
        text.join(" ")
    );

    // The session has ended: resuming it hands over its finals from the log.
    let (tx, rx) = mpsc::channel(1);
    tx.send(StreamingRecognizeRequest {
        streaming_request: Some(StreamingRequest::Resume(ResumeSession {
            session_id: session.clone(),
            after_result_index: 0,
        })),
    })
    .await
    .unwrap();
    drop(tx);
    let mut replay = Vec::new();
    let mut s = SpeechRecognitionClient::new(ch.clone())
        .streaming_recognize(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    while let Some(r) = s.message().await.unwrap() {
        replay.push(r);
    }
    let replayed: Vec<u64> = finals(&replay).iter().map(|r| r.segment_id).collect();
    assert_eq!(replayed, ids, "{replay:#?}");

    // An unknown session, and a malformed id.
    for (id, code) in [
        (uuid_like(), Code::NotFound),
        ("x y".to_owned(), Code::InvalidArgument),
    ] {
        let (tx, rx) = mpsc::channel(1);
        tx.send(StreamingRecognizeRequest {
            streaming_request: Some(StreamingRequest::Resume(ResumeSession {
                session_id: id,
                after_result_index: 0,
            })),
        })
        .await
        .unwrap();
        let e = SpeechRecognitionClient::new(ch.clone())
            .streaming_recognize(ReceiverStream::new(rx))
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
    }
}

#[tokio::test]
#[ignore = "needs tiny.en + silero-vad weights, LibriVox test speech and Redis; scripts/test.sh"]
async fn jobs_wait_for_a_slot_while_live_sessions_fill_the_pool() {
    let p = prefix("jobwait");
    let mut fleet = stage(
        "fleet",
        "all",
        &redis_url(),
        &p,
        &["--decoder-sessions", "1"],
    );
    fleet.wait_serving(Duration::from_secs(120)).await;
    // A live session takes the pool's only slot.
    let (tx, rx) = mpsc::channel(4);
    tx.send(StreamingRecognizeRequest {
        streaming_request: Some(StreamingRequest::StreamingConfig(pcm16_config(MODEL))),
    })
    .await
    .unwrap();
    let mut live = SpeechRecognitionClient::new(nexus_tests::connect(fleet.addr).await.unwrap())
        .streaming_recognize(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    live.message().await.unwrap().unwrap();
    let wav = nexus_audio::wav::encode_pcm16(&[speech()], 16_000);
    let job = jobs(&fleet)
        .await
        .submit_job(submit(wav, ""))
        .await
        .unwrap()
        .into_inner();
    // The job waits, without spending its attempts ...
    let waiting = wait_for(&fleet, &job.job_id, Duration::from_secs(30), |j| {
        j.error.contains("waiting for decoder capacity")
    })
    .await;
    assert_eq!(waiting.state, JobState::Queued as i32, "{waiting:?}");
    // Three more tries for a slot (each rewrites the job), none of them an attempt.
    let mut seen = waiting.updated_unix_ms;
    for _ in 0..3 {
        let still = wait_for(&fleet, &job.job_id, Duration::from_secs(30), |j| {
            j.updated_unix_ms > seen
        })
        .await;
        assert_eq!(still.state, JobState::Queued as i32, "{still:?}");
        assert_eq!(still.attempts, 0, "{still:?}");
        assert!(
            still.error.contains("waiting for decoder capacity"),
            "{still:?}"
        );
        seen = still.updated_unix_ms;
    }
    // ... and runs once the live session ends.
    drop(tx);
    while let Ok(Some(_)) = live.message().await {}
    let done = wait_for(&fleet, &job.job_id, Duration::from_secs(120), |j| {
        j.state == JobState::Succeeded as i32
    })
    .await;
    assert_eq!(done.attempts, 1, "{done:?}");
}
