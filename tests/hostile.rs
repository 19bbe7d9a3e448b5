//! Hostile requests against a running fleet (`nexus serve`, every stage in one
//! process, on Redis), each written as the attacker or the careless client
//! would send it: the clear error or the bounded effect, and a normal request
//! right after it served in normal time.
//!
//! Needs the tiny.en and silero-vad weights, the LibriVox test speech, Redis
//! on 127.0.0.1 and the `flac` encoder; `scripts/test.sh` provides them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use nexus_proto::speech::recognize_request::AudioSource;
use nexus_proto::speech::speech_recognition_client::SpeechRecognitionClient;
use nexus_proto::speech::streaming_recognize_request::StreamingRequest;
use nexus_proto::speech::{
    AudioEncoding, AudioFormat, DecodingOptions, RecognitionConfig, RecognizeRequest,
    RecognizeResponse, SpeechContext, SpeechEvent, StreamingRecognizeRequest,
};
use nexus_tests::fleet::{
    MODEL, Proc, SessionOutcome, english_config, pcm16_config, prefix, redis_url, speech, stage,
    stream, text,
};
use tonic::{Code, Status};

async fn recognize(
    fleet: &Proc,
    config: RecognitionConfig,
    audio: Vec<u8>,
) -> Result<RecognizeResponse, Status> {
    nexus_tests::fleet::recognize(fleet, config, AudioSource::Content(audio.into())).await
}

/// One LibriVox utterance (about 5 s) as a 16 kHz WAV.
fn utterance_wav() -> Vec<u8> {
    let s = speech();
    nexus_audio::wav::encode_pcm16(&[s[..16_000 * 6].to_vec()], 16_000)
}

/// A normal request, served in normal time: the fleet is still well.
async fn still_serves(fleet: &Proc) {
    let t0 = Instant::now();
    let r = recognize(fleet, english_config(), utterance_wav())
        .await
        .expect("a normal request after the hostile one is served");
    let t = text(&r).to_lowercase();
    assert!(t.contains("dashwood"), "{t}");
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "a 6 s file took {:?}",
        t0.elapsed()
    );
}

fn expect_invalid(r: Result<RecognizeResponse, Status>, want: &str) {
    let e = r.expect_err(want);
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains(want),
        "{:?} lacks {want:?}",
        e.message()
    );
}

#[tokio::test]
#[ignore = "needs tiny.en + silero-vad weights, LibriVox test speech and Redis; scripts/test.sh"]
async fn oversized_decoding_fields_are_refused_by_name() {
    let p = prefix("hostile-fields");
    let mut fleet = stage("fleet", "all", &redis_url(), &p, &[]);
    fleet.wait_serving(Duration::from_secs(120)).await;
    for beam in [60_000, 100_000, u32::MAX] {
        let cfg = RecognitionConfig {
            decoding: Some(DecodingOptions {
                beam_size: beam,
                ..Default::default()
            }),
            ..english_config()
        };
        expect_invalid(
            recognize(&fleet, cfg, utterance_wav()).await,
            &format!("decoding.beam_size is {beam}; the limit is 16"),
        );
    }
    let ctx = |c: SpeechContext| RecognitionConfig {
        speech_context: Some(c),
        ..english_config()
    };
    let cases = [
        (
            ctx(SpeechContext {
                prompt: "word ".repeat(100_000),
                ..Default::default()
            }),
            "speech_context.prompt is 500000 characters; the limit is 2000",
        ),
        (
            ctx(SpeechContext {
                hotwords: vec!["Kubernetes".into(); 10_000],
                ..Default::default()
            }),
            "speech_context.hotwords has 10000 entries; the limit is 100",
        ),
        (
            ctx(SpeechContext {
                hotword_boost: 1e30,
                ..Default::default()
            }),
            "speech_context.hotword_boost",
        ),
        (
            RecognitionConfig {
                decoding: Some(DecodingOptions {
                    temperature: f32::INFINITY,
                    ..Default::default()
                }),
                ..english_config()
            },
            "decoding.temperature is inf",
        ),
        (
            RecognitionConfig {
                max_alternatives: 1_000_000,
                ..english_config()
            },
            "max_alternatives is 1000000",
        ),
    ];
    for (cfg, want) in cases {
        expect_invalid(recognize(&fleet, cfg, utterance_wav()).await, want);
    }
    // The same bounds hold on live streams, with the speaker label.
    let mut cfg = pcm16_config(MODEL);
    cfg.speaker_label = "x".repeat(10_000);
    let e = stream(fleet.addr, cfg, &[0.0; 1_600], 100.0, |_| {})
        .await
        .expect_err("a 10000-character speaker label is refused");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("speaker_label is 10000 characters; the limit is 128")
    );
    // The largest beam allowed decodes.
    let cfg = RecognitionConfig {
        decoding: Some(DecodingOptions {
            beam_size: 16,
            temperature: 0.0,
            ..Default::default()
        }),
        ..english_config()
    };
    let r = recognize(&fleet, cfg, utterance_wav()).await.unwrap();
    assert!(text(&r).to_lowercase().contains("dashwood"), "{}", text(&r));
    still_serves(&fleet).await;
}

/// `samples` (16 kHz) as 48 kHz mono f32le, the format WebRTC audio takes
/// inside ingest, in 100 ms chunks.
fn f32_48k_chunks(samples: &[f32]) -> Vec<Vec<u8>> {
    let up = nexus_audio::resample(&[samples.to_vec()], 16_000, 48_000)
        .unwrap()
        .pop()
        .unwrap();
    up.chunks(4_800)
        .map(|c| c.iter().flat_map(|s| s.to_le_bytes()).collect())
        .collect()
}

/// Streams raw chunks after `cfg` as fast as flow control lets them through,
/// then either half-closes or keeps the stream open without sending.
/// `admitted` hears when the session has its slot (its first response).
async fn stream_raw(
    fleet: &Proc,
    cfg: nexus_proto::speech::StreamingRecognitionConfig,
    chunks: Vec<Vec<u8>>,
    half_close: bool,
    admitted: Option<tokio::sync::oneshot::Sender<()>>,
) -> SessionOutcome {
    let ch = nexus_tests::connect(fleet.addr).await.unwrap();
    let mut client = SpeechRecognitionClient::new(ch);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(StreamingRecognizeRequest {
        streaming_request: Some(StreamingRequest::StreamingConfig(cfg)),
    })
    .await
    .unwrap();
    let mut inbound = client
        .streaming_recognize(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let sender = async move {
        for c in chunks {
            let msg = StreamingRecognizeRequest {
                streaming_request: Some(StreamingRequest::AudioContent(c.into())),
            };
            if tx.send(msg).await.is_err() {
                return None;
            }
        }
        if half_close { None } else { Some(tx) }
    };
    let receiver = async {
        let mut out = SessionOutcome::default();
        let mut admitted = admitted;
        loop {
            match inbound.message().await {
                Ok(Some(r)) => {
                    if let Some(tx) = admitted.take() {
                        let _ = tx.send(());
                    }
                    out.responses.push(r)
                }
                Ok(None) => break,
                Err(s) => {
                    out.status = Some(s);
                    break;
                }
            }
        }
        out
    };
    let (_open, out) = tokio::join!(sender, receiver);
    out
}

#[tokio::test]
#[ignore = "needs tiny.en + silero-vad weights, LibriVox test speech and Redis; scripts/test.sh"]
async fn live_streams_are_bounded_by_duration_not_by_bytes() {
    let p = prefix("hostile-long");
    // A 1 MiB upload cap: 48 kHz f32 crosses it after 5.5 s of audio.
    let mut fleet = stage(
        "fleet",
        "all",
        &redis_url(),
        &p,
        &["--max-audio-mb", "1", "--max-session-minutes", "1"],
    );
    fleet.wait_serving(Duration::from_secs(120)).await;
    let s = speech();
    let mut audio = Vec::new();
    while audio.len() < 16_000 * 70 {
        audio.extend_from_slice(&s);
    }
    audio.truncate(16_000 * 70);
    let mut cfg = pcm16_config(MODEL);
    cfg.interim_results = false;
    let rc = cfg.config.as_mut().unwrap();
    rc.audio_format = Some(AudioFormat {
        encoding: AudioEncoding::LinearPcmF32le as i32,
        sample_rate_hz: 48_000,
        channels: 1,
    });
    let out = stream_raw(&fleet, cfg, f32_48k_chunks(&audio), true, None).await;
    let status = out.status.clone().expect("the session ends with a status");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("maximum length of 1 min"),
        "{status:?}"
    );
    let finals = out.finals();
    // 60 s hold three full passes of the three utterances and part of a fourth.
    assert!(
        finals.len() >= 10,
        "{} finals: {}",
        finals.len(),
        out.text()
    );
    let last_end = finals
        .iter()
        .filter_map(|f| f.span.as_ref())
        .map(|s| s.end_ms)
        .max()
        .unwrap();
    assert!(
        (55_000..=60_000).contains(&last_end),
        "the utterance cut by the limit has its final: last ends at {last_end} ms"
    );
    still_serves(&fleet).await;
}

#[tokio::test]
#[ignore = "needs tiny.en + silero-vad weights, LibriVox test speech and Redis; scripts/test.sh"]
async fn silent_sessions_end_at_the_idle_timeout_and_free_their_slots() {
    let p = prefix("hostile-idle");
    let mut fleet = stage(
        "fleet",
        "all",
        &redis_url(),
        &p,
        &["--decoder-sessions", "2", "--idle-timeout-ms", "2000"],
    );
    fleet.wait_serving(Duration::from_secs(120)).await;
    let s = speech();
    // One sends its config and nothing; one stops in the middle of a sentence
    // without closing its stream.
    let (tx1, rx1) = tokio::sync::oneshot::channel();
    let (tx2, rx2) = tokio::sync::oneshot::channel();
    let silent = stream_raw(&fleet, pcm16_config(MODEL), Vec::new(), false, Some(tx1));
    let mid_sentence = stream_raw(
        &fleet,
        pcm16_config(MODEL),
        nexus_tests::fleet::pcm16_chunks(&s[..16_000 * 3], 1_600),
        false,
        Some(tx2),
    );
    let third = async {
        rx1.await.unwrap();
        rx2.await.unwrap();
        // Both slots are held: a third caller is refused until one frees.
        let t0 = Instant::now();
        let mut refused = false;
        loop {
            let r = stream(
                fleet.addr,
                pcm16_config(MODEL),
                &s[..16_000 * 6],
                20.0,
                |_| {},
            )
            .await;
            match r {
                Err(e) if e.code() == Code::ResourceExhausted => refused = true,
                Ok(out)
                    if out
                        .status
                        .as_ref()
                        .is_some_and(|s| s.code() == Code::ResourceExhausted) =>
                {
                    refused = true
                }
                Ok(out) => return (refused, out, t0.elapsed()),
                Err(e) => panic!("{e:?}"),
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "no slot ever freed");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let (silent, mid, (refused, third, waited)) = tokio::join!(silent, mid_sentence, third);
    for out in [&silent, &mid] {
        let st = out
            .status
            .as_ref()
            .expect("an idle session ends with a status");
        assert_eq!(st.code(), Code::DeadlineExceeded, "{st:?}");
        assert!(st.message().contains("idle timeout"), "{st:?}");
    }
    assert!(silent.finals().is_empty());
    // The sentence it stopped in was finalised and delivered before the end.
    let t = mid.text().to_lowercase();
    assert!(t.contains("john"), "{t}");
    assert!(refused, "a third session got a slot while two were held");
    assert!(
        third.ended() && third.status.is_none(),
        "{:?}",
        third.status
    );
    assert!(waited < Duration::from_secs(30), "{waited:?}");
}

#[tokio::test]
#[ignore = "needs tiny.en + silero-vad weights, LibriVox test speech, Redis and flac; scripts/test.sh"]
async fn a_small_file_of_long_high_rate_audio_decodes_in_bounded_memory() {
    // 5 minutes of 192 kHz stereo silence: 0.9 GB as native f32, 19 MB at 16 kHz mono.
    let mut enc = std::process::Command::new("flac")
        .args([
            "--silent",
            "--force-raw-format",
            "--endian=little",
            "--sign=signed",
            "--channels=2",
            "--bps=16",
            "--sample-rate=192000",
            "--stdout",
            "-",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("flac runs");
    let mut stdin = enc.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        use std::io::Write;
        let zeros = vec![0u8; 192_000 * 4];
        for _ in 0..300 {
            stdin.write_all(&zeros).unwrap();
        }
    });
    let out = enc.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert!(out.status.success());
    let bytes = out.stdout;
    let kb = bytes.len() >> 10;
    assert!(bytes.len() < 2 << 20, "{kb} kB");

    let p = prefix("hostile-flac");
    let mut fleet = stage("fleet", "all", &redis_url(), &p, &[]);
    fleet.wait_serving(Duration::from_secs(120)).await;
    still_serves(&fleet).await;
    let before = fleet.peak_rss();
    let r = recognize(&fleet, english_config(), bytes).await.unwrap();
    assert_eq!(r.audio_duration_ms, 300_000);
    assert!(r.results.is_empty(), "silence has no words: {}", text(&r));
    let grew = fleet.peak_rss().saturating_sub(before);
    eprintln!(
        "5 min of 192 kHz stereo FLAC ({kb} kB): peak RSS {} MB before, grew by {} MB",
        before >> 20,
        grew >> 20
    );
    assert!(
        grew < 300 << 20,
        "peak memory grew by {} MB for a {kb} kB file",
        grew >> 20,
    );
    still_serves(&fleet).await;
}

/// A real WAV whose RIFF length is a few bytes off the file's size, and one
/// whose lengths a streaming writer left as 0xFFFFFFFF, read as ffmpeg reads them.
#[tokio::test]
#[ignore = "needs tiny.en + silero-vad weights, LibriVox test speech and Redis; scripts/test.sh"]
async fn wavs_whose_header_lengths_disagree_with_the_file_are_read() {
    let p = prefix("hostile-riff");
    let mut fleet = stage("fleet", "all", &redis_url(), &p, &[]);
    fleet.wait_serving(Duration::from_secs(120)).await;
    let good = utterance_wav();
    let want = text(
        &recognize(&fleet, english_config(), good.clone())
            .await
            .unwrap(),
    );
    let mut off = good.clone();
    let riff = (off.len() - 8 - 5) as u32;
    off[4..8].copy_from_slice(&riff.to_le_bytes());
    let mut streaming = good.clone();
    streaming[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    streaming[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
    for (name, f) in [("riff off by 5", off), ("0xFFFFFFFF lengths", streaming)] {
        let r = recognize(&fleet, english_config(), f)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(text(&r), want, "{name}");
    }
    still_serves(&fleet).await;
}

mod jobs {
    use super::*;
    use nexus_proto::speech::submit_job_request::Source;
    use nexus_proto::speech::transcription_jobs_client::TranscriptionJobsClient;
    use nexus_proto::speech::{GetJobRequest, JobState, SubmitJobRequest};
    use tonic::transport::Channel;

    async fn client(p: &Proc) -> TranscriptionJobsClient<Channel> {
        TranscriptionJobsClient::new(nexus_tests::connect(p.addr).await.unwrap())
            .max_encoding_message_size(64 << 20)
    }

    fn job(key: &str) -> SubmitJobRequest {
        SubmitJobRequest {
            config: Some(english_config()),
            source: Some(Source::Content(utterance_wav().into())),
            idempotency_key: key.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    #[ignore = "needs tiny.en + silero-vad weights, LibriVox test speech and Redis; scripts/test.sh"]
    async fn a_failed_submit_frees_its_idempotency_key_and_fields_are_bounded() {
        let p = prefix("hostile-jobs");
        // A replica that queues but runs nothing, on a queue of one.
        let mut front = stage(
            "front",
            "all",
            &redis_url(),
            &p,
            &["--job-workers", "0", "--job-queue", "1"],
        );
        front.wait_serving(Duration::from_secs(120)).await;
        let mut c = client(&front).await;
        for (req, want) in [
            (
                SubmitJobRequest {
                    priority: 100,
                    ..job("")
                },
                "priority is 100; use 0 (normal) or 1",
            ),
            (
                job(&"k".repeat(10_000)),
                "idempotency_key is 10000 bytes; the limit is 256",
            ),
            (
                SubmitJobRequest {
                    labels: (0..1_000).map(|i| (format!("l{i}"), "v".into())).collect(),
                    ..job("")
                },
                "labels has 1000 entries; the limit is 32",
            ),
        ] {
            let e = c.submit_job(req).await.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
            assert!(
                e.message().contains(want),
                "{:?} lacks {want:?}",
                e.message()
            );
        }
        let first = c.submit_job(job("")).await.unwrap().into_inner();
        // The queue is full: a keyed submit is refused...
        let e = c.submit_job(job("retry-me")).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        // ...and once a runner drained it, the same key submits afresh rather
        // than naming a job that never was.
        let mut runner = stage("runner", "all", &redis_url(), &p, &["--job-workers", "1"]);
        runner.wait_serving(Duration::from_secs(120)).await;
        let t0 = Instant::now();
        loop {
            let j = c
                .get_job(GetJobRequest {
                    job_id: first.job_id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            if j.state == JobState::Succeeded as i32 {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "{j:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let again = c.submit_job(job("retry-me")).await.unwrap().into_inner();
        assert_ne!(again.job_id, first.job_id);
        let same = c.submit_job(job("retry-me")).await.unwrap().into_inner();
        assert_eq!(same.job_id, again.job_id, "the key now names the new job");

        // Queued, the key and the job's records are kept for the job's full
        // time (they start out pending, lasting a minute).
        let mut redis = redis::Client::open(redis_url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{p}:jobkey:*:retry-me"))
            .query_async(&mut redis)
            .await
            .unwrap();
        assert_eq!(keys.len(), 1, "{keys:?}");
        let key = &keys[0];
        let spec = format!("{p}:{{j.{}}}:spec", again.job_id);
        for k in [key, &spec] {
            let ttl: i64 = redis::cmd("PTTL")
                .arg(k)
                .query_async(&mut redis)
                .await
                .unwrap();
            assert!(ttl > 3_600_000, "{k} is kept {ttl} ms");
        }
        // A submitter that died before queueing leaves a key naming a job
        // with no records, pending: a submit with that key is told to retry
        // (not NOT_FOUND), and once the key lapses the key submits afresh.
        let dead_key = key.replace(":retry-me", ":dead-submitter");
        let ghost = "00000000-0000-4000-8000-00000000dead";
        let _: () = redis::cmd("SET")
            .arg(&dead_key)
            .arg(ghost)
            .arg("PX")
            .arg(1_500)
            .query_async(&mut redis)
            .await
            .unwrap();
        let e = c.submit_job(job("dead-submitter")).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(
            e.message().contains("in progress or was abandoned; retry"),
            "{e:?}"
        );
        let t0 = Instant::now();
        while c
            .get_job(GetJobRequest {
                job_id: again.job_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .state
            != JobState::Succeeded as i32
        {
            // The queue holds one job: room once the runner finished it.
            assert!(t0.elapsed() < Duration::from_secs(120), "the job never ran");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let fresh = loop {
            match c.submit_job(job("dead-submitter")).await {
                Ok(j) => break j.into_inner(),
                Err(e) if e.code() == Code::Unavailable => {
                    assert!(
                        t0.elapsed() < Duration::from_secs(30),
                        "the key never lapsed"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("{e:?}"),
            }
        };
        assert_ne!(fresh.job_id, ghost);
        let named: String = redis::cmd("GET")
            .arg(&dead_key)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert_eq!(named, fresh.job_id);
        let same = c
            .submit_job(job("dead-submitter"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(same.job_id, fresh.job_id);
    }
}

mod bodies {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Sends a request head that announces `len` body bytes, sends none of
    /// them, and reads the answer: the server must answer from the head alone.
    async fn head_only(addr: std::net::SocketAddr, head: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("the server answered without waiting for the body")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    #[ignore = "needs tiny.en + silero-vad weights, LibriVox test speech and Redis; scripts/test.sh"]
    async fn bodies_are_refused_by_their_head_before_they_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let keys = nexus_tests::fleet::keys_file(dir.path(), &[("t", "body-test-key")]);
        let http = nexus_tests::fleet::free_addr();
        let p = prefix("hostile-bodies");
        let mut fleet = stage(
            "fleet",
            "all",
            &redis_url(),
            &p,
            &[
                "--http-listen",
                &http.to_string(),
                "--api-keys",
                keys.to_str().unwrap(),
            ],
        );
        fleet.wait_serving(Duration::from_secs(120)).await;
        // 200 MB announced, no key: 401 at once.
        let r = head_only(
            http,
            "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 209715200\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
        // With a key, an upload over the limit is refused by its declared size.
        let r = head_only(
            http,
            "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer body-test-key\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 209715200\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 413"), "{r}");
        assert!(
            r.contains(
                "the upload is 209715200 bytes, larger than this server's audio limit of 100 MiB"
            ),
            "{r}"
        );
        // An SDP offer of 1 MB is no offer.
        let r = head_only(
            http,
            "POST /v1/webrtc/sessions?room=r&name=n HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer body-test-key\r\nContent-Type: application/sdp\r\nContent-Length: 1048576\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 413"), "{r}");
        assert!(
            r.contains("the SDP offer is 1048576 bytes; the limit is 65536 bytes"),
            "{r}"
        );
        // gRPC: a 50 MB Recognize without a key is refused by its metadata.
        let ch = nexus_tests::connect(fleet.addr).await.unwrap();
        let e = SpeechRecognitionClient::new(ch)
            .max_encoding_message_size(256 << 20)
            .recognize(RecognizeRequest {
                config: Some(english_config()),
                audio_source: Some(AudioSource::Content(vec![0u8; 50 << 20].into())),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        // A normal, keyed request right after.
        let ch = nexus_tests::connect(fleet.addr).await.unwrap();
        let mut req = tonic::Request::new(RecognizeRequest {
            config: Some(english_config()),
            audio_source: Some(AudioSource::Content(utterance_wav().into())),
        });
        req.metadata_mut()
            .insert("authorization", "Bearer body-test-key".parse().unwrap());
        let r = SpeechRecognitionClient::new(ch)
            .recognize(req)
            .await
            .unwrap()
            .into_inner();
        assert!(text(&r).to_lowercase().contains("dashwood"), "{}", text(&r));
    }
}

#[tokio::test]
#[ignore = "needs tiny.en + silero-vad weights, LibriVox test speech and redis-server; scripts/test.sh"]
async fn a_full_redis_is_reported_and_survived() {
    use nexus_tests::fleet::RedisServer;
    let port = nexus_tests::fleet::free_addr().port();
    let _redis = RedisServer::start_with(
        port,
        tempfile::tempdir().unwrap(),
        &["--maxmemory", "40mb", "--maxmemory-policy", "noeviction"],
    );
    let url = format!("redis://127.0.0.1:{port}");
    let p = prefix("hostile-oom");
    let mut fleet = stage(
        "fleet",
        "all",
        &url,
        &p,
        &["--bus-retry-ms", "2000", "--final-timeout-ms", "5000"],
    );
    fleet.wait_serving(Duration::from_secs(120)).await;
    still_serves(&fleet).await;
    // Something else fills the server to its limit.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let junk = vec![7u8; 1 << 20];
    let mut filled = 0;
    loop {
        let r: redis::RedisResult<()> = redis::cmd("SET")
            .arg(format!("junk:{filled}"))
            .arg(&junk)
            .query_async(&mut c)
            .await;
        match r {
            Ok(()) => filled += 1,
            Err(e) => {
                assert!(e.to_string().contains("OOM"), "{e}");
                break;
            }
        }
        assert!(filled < 200, "maxmemory never answered OOM");
    }
    // Full it stays, whatever the fleet's own keys free meanwhile (trimmed
    // streams, expired leases): the junk alone is now twice the limit.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("20mb")
        .query_async(&mut c)
        .await
        .unwrap();
    // A request now gets a retryable error in bounded time (refused at ingest,
    // or its window held by a stage that cannot write its output yet), and the
    // process lives on.
    let t0 = Instant::now();
    let e = recognize(&fleet, english_config(), utterance_wav())
        .await
        .expect_err("no room on the bus");
    assert!(
        matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{e:?}"
    );
    assert!(e.message().contains("retry"), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    // Room again: served as usual.
    for i in 0..filled {
        let _: () = redis::cmd("DEL")
            .arg(format!("junk:{i}"))
            .query_async(&mut c)
            .await
            .unwrap();
    }
    still_serves(&fleet).await;
}

/// A live session longer than the whole-file byte cap ever allowed: 48 kHz
/// f32 crosses 100 MiB at 546 s. Mostly silence, with speech at the start and
/// at the very end, whose final must come. `NEXUS_LONG_SESSION_S` sets the
/// length (600 here). Speech throughout, at the live pace, for hours:
/// `a_live_session_runs_for_hours_at_48_khz_f32` (BENCHMARKS.md).
#[tokio::test]
#[ignore = "needs tiny.en + silero-vad weights, LibriVox test speech and Redis; scripts/test.sh"]
async fn a_live_session_outlives_the_upload_cap_with_default_limits() {
    let seconds: usize = std::env::var("NEXUS_LONG_SESSION_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let p = prefix("hostile-long-default");
    // Default limits, except the pace a sender may keep: this test sends faster than real time.
    let mut fleet = stage(
        "fleet",
        "all",
        &redis_url(),
        &p,
        &["--live-max-speed", "100000"],
    );
    fleet.wait_serving(Duration::from_secs(120)).await;
    let s = speech();
    let first = &s[..16_000 * 6];
    let mut cfg = pcm16_config(MODEL);
    cfg.interim_results = false;
    cfg.config.as_mut().unwrap().audio_format = Some(AudioFormat {
        encoding: AudioEncoding::LinearPcmF32le as i32,
        sample_rate_hz: 48_000,
        channels: 1,
    });
    // Chunks made as they are sent: the whole stream never sits in memory.
    let silence = vec![0u8; 4_800 * 4];
    let head = f32_48k_chunks(first);
    let tail = f32_48k_chunks(first);
    let silent_chunks = (seconds - 12) * 10;
    let chunks = head
        .into_iter()
        .chain(std::iter::repeat_n(silence, silent_chunks))
        .chain(tail);
    let t0 = Instant::now();
    let ch = nexus_tests::connect(fleet.addr).await.unwrap();
    let mut client = SpeechRecognitionClient::new(ch);
    let first_msg = StreamingRecognizeRequest {
        streaming_request: Some(StreamingRequest::StreamingConfig(cfg)),
    };
    let requests = futures::stream::iter(std::iter::once(first_msg).chain(chunks.map(|c| {
        StreamingRecognizeRequest {
            streaming_request: Some(StreamingRequest::AudioContent(c.into())),
        }
    })));
    let mut inbound = client
        .streaming_recognize(requests)
        .await
        .unwrap()
        .into_inner();
    let mut finals = Vec::new();
    loop {
        match inbound.message().await {
            Ok(Some(r)) => finals.extend(r.results.into_iter().filter(|r| r.is_final)),
            Ok(None) => break,
            Err(e) => panic!("the session failed after {:?}: {e:?}", t0.elapsed()),
        }
    }
    let last = finals.last().expect("finals");
    let end = last.span.as_ref().unwrap().end_ms;
    assert!(
        end > (seconds as u64 - 7) * 1000,
        "the last utterance's final ends at {end} ms of {seconds} s"
    );
    assert!(finals.len() >= 2, "{finals:?}");
    eprintln!(
        "{seconds} s of 48 kHz f32 ({} MB) streamed in {:?}: {} finals, the last at {end} ms",
        (seconds * 48_000 * 4) >> 20,
        t0.elapsed(),
        finals.len()
    );
}

/// Opens a live session as the holder of `key` and waits for its first
/// response; the session stays open while the returned sender lives.
async fn open_live(
    fleet: &Proc,
    key: &str,
) -> Result<
    (
        tokio::sync::mpsc::Sender<StreamingRecognizeRequest>,
        tonic::Streaming<nexus_proto::speech::StreamingRecognizeResponse>,
    ),
    Status,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(StreamingRecognizeRequest {
        streaming_request: Some(StreamingRequest::StreamingConfig(pcm16_config(MODEL))),
    })
    .await
    .unwrap();
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let ch = nexus_tests::connect(fleet.addr).await.unwrap();
    let mut inbound = SpeechRecognitionClient::new(ch)
        .streaming_recognize(req)
        .await?
        .into_inner();
    inbound
        .message()
        .await?
        .ok_or_else(|| Status::internal("the session ended before its first response"))?;
    Ok((tx, inbound))
}

/// Where keys name several tenants, one of them cannot take the decoder
/// pool's reserve once it holds its share: another tenant still gets in.
#[tokio::test]
#[ignore = "needs tiny.en + silero-vad weights, LibriVox test speech and Redis; scripts/test.sh"]
async fn one_tenant_cannot_take_the_slots_kept_for_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let keys = nexus_tests::fleet::keys_file(dir.path(), &[("acme", "k-acme"), ("beta", "k-beta")]);
    let p = prefix("hostile-share");
    let mut fleet = stage(
        "fleet",
        "all",
        &redis_url(),
        &p,
        &[
            "--api-keys",
            keys.to_str().unwrap(),
            "--decoder-sessions",
            "4",
            "--pool-reserve",
            "0.25",
        ],
    );
    fleet.wait_serving(Duration::from_secs(120)).await;
    // acme takes 3 of 4; the last is the reserve, and acme holds its share.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(open_live(&fleet, "k-acme").await.unwrap());
    }
    let e = open_live(&fleet, "k-acme").await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message()
            .contains("tenant \"acme\" holds 3 of the decoder pool's 4 live-session slots"),
        "{}",
        e.message()
    );
    // beta, holding none, gets the reserve; then the pool is full for all.
    held.push(open_live(&fleet, "k-beta").await.unwrap());
    let e = open_live(&fleet, "k-beta").await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("all 4 live-session slots"),
        "{}",
        e.message()
    );
    // acme ends a session: the freed slot is the reserve again, and still not acme's.
    drop(held.remove(0));
    let t0 = Instant::now();
    let e = loop {
        match open_live(&fleet, "k-acme").await {
            Err(e) if e.message().contains("all 4") => {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "the slot was never freed"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => break e,
            Ok(_) => panic!("acme took the reserve back"),
        }
    };
    assert!(e.message().contains("holds 2 of"), "{}", e.message());
    held.push(open_live(&fleet, "k-beta").await.unwrap());
    drop(held);
}

/// A live session of `NEXUS_SOAK_MINUTES` of speech (default 12: past the
/// nine minutes at which 48 kHz f32 streams were once cut by a byte cap) in
/// the format WebRTC audio takes inside ingest, 48 kHz f32, sent as fast as
/// the server reads it (--live-max-speed). Every utterance comes back as a
/// final, the session ends normally after the last one, and the server's
/// memory does not grow with the session's length. The hours-long run is
/// this test with NEXUS_SOAK_MINUTES=180 (BENCHMARKS.md).
#[tokio::test]
#[ignore = "needs tiny.en + silero-vad weights and LibriVox test speech; scripts/test.sh"]
async fn a_live_session_runs_for_hours_at_48_khz_f32() {
    let minutes: u64 = std::env::var("NEXUS_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(12);
    let speed = std::env::var("NEXUS_SOAK_SPEED").unwrap_or_else(|_| "4".into());
    let admin = nexus_tests::fleet::free_addr().to_string();
    let mut serve = Proc::serve(
        &admin,
        &["--live-max-speed", &speed, "--max-session-minutes", "240"],
    );
    serve.wait_serving(Duration::from_secs(120)).await;
    let clip = speech();
    let clip_ms = clip.len() as u64 * 1000 / 16_000;
    let rounds = (minutes * 60_000).div_ceil(clip_ms);
    let chunk = f32_48k_chunks(&clip);
    let mut cfg = pcm16_config(MODEL);
    if let Some(f) = cfg.config.as_mut().and_then(|c| c.audio_format.as_mut()) {
        f.encoding = AudioEncoding::LinearPcmF32le as i32;
        f.sample_rate_hz = 48_000;
    }
    cfg.interim_results = false;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(StreamingRecognizeRequest {
        streaming_request: Some(StreamingRequest::StreamingConfig(cfg)),
    })
    .await
    .unwrap();
    let ch = nexus_tests::connect(serve.addr).await.unwrap();
    let mut inbound = SpeechRecognitionClient::new(ch)
        .streaming_recognize(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let sender = tokio::spawn(async move {
        for _ in 0..rounds {
            for c in &chunk {
                let msg = StreamingRecognizeRequest {
                    streaming_request: Some(StreamingRequest::AudioContent(c.clone().into())),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        }
    });
    let t0 = Instant::now();
    let (mut finals, mut last_end, mut rss_early, mut ended) = (0u64, 0u64, None, false);
    let total_ms = rounds * clip_ms;
    while let Some(r) = inbound.message().await.unwrap() {
        for f in r.results.iter().filter(|f| f.is_final) {
            finals += 1;
            last_end = f.span.map_or(last_end, |s| s.end_ms);
            // The server's memory once the session is well under way.
            if rss_early.is_none() && last_end > total_ms / 10 {
                rss_early = Some(serve.peak_rss());
            }
        }
        ended |= r.speech_event == SpeechEvent::EndOfSession as i32;
    }
    sender.await.unwrap();
    let rss_end = serve.peak_rss();
    let rss_early = rss_early.expect("finals through the first tenth");
    println!(
        "soak: {minutes} min of 48 kHz f32 speech in {:.0} s, {finals} finals, last ending at {last_end} ms of {total_ms}; peak RSS {} MB at a tenth, {} MB at the end",
        t0.elapsed().as_secs_f64(),
        rss_early >> 20,
        rss_end >> 20
    );
    assert!(ended, "the session did not report its end");
    // Three utterances a round, each a final; the last one ends the audio.
    assert!(finals >= rounds * 3, "{finals} finals for {rounds} rounds");
    assert!(
        last_end + 3_000 >= total_ms,
        "the last final ends at {last_end} of {total_ms} ms"
    );
    assert!(
        rss_end < rss_early + (150 << 20),
        "memory grew from {} to {} MB",
        rss_early >> 20,
        rss_end >> 20
    );
}
