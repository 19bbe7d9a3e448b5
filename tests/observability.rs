//! Observability of the three stage processes during one StreamingRecognize
//! session: the session is one trace (spans exported over OTLP to a receiver
//! in this test, linked parent to child from the caller's `traceparent`
//! through ingest, encoder and decoder; the context travels in every stream
//! entry), and every stage's `/metrics` moves (and passes `promtool check
//! metrics` where Prometheus' promtool is installed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nexus_proto::speech::StreamingRecognizeRequest;
use nexus_proto::speech::speech_recognition_client::SpeechRecognitionClient;
use nexus_proto::speech::streaming_recognize_request::StreamingRequest;
use nexus_tests::fleet::{
    MODEL, Proc, free_addr, free_addrs, pcm16_chunks, pcm16_config, prefix, redis_url, testdata,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;

/// Spans received, with the `service.name` of the process that sent them.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(Any::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                got.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(Any::StringValue(s)) => Some(s.clone()),
            Some(Any::IntValue(i)) => Some(i.to_string()),
            Some(Any::BoolValue(b)) => Some(b.to_string()),
            _ => None,
        })
}

// Multi-threaded: the receiver must answer while the test waits on processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tiny.en + silero-vad weights, test speech and Redis; scripts/test.sh"]
async fn one_session_is_one_trace_and_moves_every_stages_metrics() {
    let receiver = Receiver::default();
    let (listener, otlp) = nexus_tests::bind_local().await.unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let endpoint = format!("http://{otlp}");
    let (redis, p) = (redis_url(), prefix("trace"));
    let common = [
        "--redis",
        redis.as_str(),
        "--model",
        MODEL,
        "--key-prefix",
        p.as_str(),
        "--otlp-endpoint",
        endpoint.as_str(),
    ];
    let admins: Vec<String> = free_addrs(3).iter().map(|a| a.to_string()).collect();
    let with_admin = |i: usize| [&common[..], &["--admin-listen", admins[i].as_str()]].concat();
    let mut enc = Proc::start("encoder", "nexus-encoder", &with_admin(0));
    let mut dec = Proc::start("decoder", "nexus-decoder", &with_admin(1));
    const ADMIN_TOKEN: &str = "observability-admin-token";
    let ingest_args = [
        &with_admin(2)[..],
        &["--http-listen", "none", "--admin-token", ADMIN_TOKEN],
    ]
    .concat();
    let mut ing = Proc::start("ingest", "nexus-ingest", &ingest_args);
    for p in [&mut enc, &mut dec, &mut ing] {
        p.wait_serving(Duration::from_secs(120)).await;
    }
    let before: Vec<Series> = futures::future::join_all(admins.iter().map(|a| scrape(a))).await;

    let samples = goforward();
    let mut msgs = vec![StreamingRecognizeRequest {
        streaming_request: Some(StreamingRequest::StreamingConfig(pcm16_config(MODEL))),
    }];
    msgs.extend(
        pcm16_chunks(&samples, 1_600)
            .into_iter()
            .map(|c| StreamingRecognizeRequest {
                streaming_request: Some(StreamingRequest::AudioContent(c.into())),
            }),
    );
    let paced =
        tokio_stream::StreamExt::throttle(tokio_stream::iter(msgs), Duration::from_millis(50));
    // The caller's own span: the session must become its child.
    let (trace_id, caller) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut request = tonic::Request::new(paced);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller}-01").parse().unwrap(),
    );
    let mut client = SpeechRecognitionClient::new(nexus_tests::connect(ing.addr).await.unwrap());
    let mut responses = client
        .streaming_recognize(request)
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    while let Some(r) = responses.message().await.unwrap() {
        for res in r.results.iter().filter(|r| r.is_final) {
            text.push_str(&res.alternatives[0].transcript);
        }
    }
    assert!(
        text.to_lowercase().contains("forward"),
        "transcript: {text:?}"
    );
    // Stream positions are sampled every 2 s; the session's end is counted
    // as it closes.
    let lag = |stream: &str, group: &str| {
        format!(r#"nexus_stream_lag{{stream="{stream}",group="{group}"}}"#)
    };
    let waits = [
        vec![lag("audio", "encoder")],
        vec![lag("encoded", "decoder")],
        vec![
            lag("audio", "encoder"),
            r#"nexus_ingest_sessions_ended_total{outcome="ok"}"#.to_owned(),
        ],
    ];
    let mut after = Vec::new();
    for (a, w) in admins.iter().zip(&waits) {
        let w: Vec<&str> = w.iter().map(String::as_str).collect();
        after.push(scrape_until(a, &w).await);
    }
    check_metrics(&before, &after);
    // The log filter changes at run time through the admin port, with its token.
    let admin = nexus_tests::http_client::Client::new(admins[2].parse().unwrap());
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let auth = [("authorization", bearer.as_str())];
    let (status, body) = admin.request("PUT", "/log", &[], b"trace").await;
    assert_eq!(status, 401, "{body}");
    let wrong = [("authorization", "Bearer observability-admin-tokeX")];
    let (status, body) = admin.request("PUT", "/log", &wrong, b"trace").await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = admin
        .request("PUT", "/log", &auth, b"info,nexus=loud")
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("nexus=loud"), "{body}");
    let (status, body) = admin
        .request("PUT", "/log", &auth, b"info,nexus_ingest=debug")
        .await;
    assert_eq!(status, 200, "{body}");
    // A process started without a token keeps its filter.
    let encoder_admin = nexus_tests::http_client::Client::new(admins[0].parse().unwrap());
    let (status, body) = encoder_admin.request("PUT", "/log", &auth, b"trace").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("--admin-token"), "{body}");
    // A whole-file Recognize call is a trace of its own, down to the stages.
    let (file_trace, file_caller) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let wav = wav_of(&samples);
    let mut call = tonic::Request::new(nexus_proto::speech::RecognizeRequest {
        config: Some(nexus_tests::fleet::english_config()),
        audio_source: Some(
            nexus_proto::speech::recognize_request::AudioSource::Content(wav.into()),
        ),
    });
    call.metadata_mut().insert(
        "traceparent",
        format!("00-{file_trace}-{file_caller}-01").parse().unwrap(),
    );
    let done = client_recognize(&ing, call).await;
    assert!(done.to_lowercase().contains("forward"), "{done:?}");
    let file_audio = scrape(&admins[2])
        .await
        .get(r#"nexus_ingest_audio_seconds_total{source="file"}"#);
    assert!(file_audio >= 2.0, "whole-file audio counted: {file_audio}");
    // A stopping process exports what it still holds.
    for p in [&mut ing, &mut enc, &mut dec] {
        p.terminate();
    }
    let logs = [&ing, &enc, &dec]
        .iter()
        .map(|p| p.log().join("\n"))
        .collect::<Vec<_>>()
        .join("\n----\n");

    let all: Vec<(String, String, String)> = receiver
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|(svc, s)| (svc.clone(), s.name.clone(), hex(&s.trace_id)))
        .collect();
    // The Recognize call: recognize → window → encode → decode.
    let file: Vec<(String, Span)> = receiver
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, s)| hex(&s.trace_id) == file_trace)
        .cloned()
        .collect();
    let named = |n: &str| -> Vec<&Span> {
        file.iter()
            .filter(|(_, s)| s.name == n)
            .map(|(_, s)| s)
            .collect()
    };
    let (rec, win, enc_s, dec_s) = (
        named("recognize"),
        named("window"),
        named("encode"),
        named("decode"),
    );
    assert_eq!(
        rec.len(),
        1,
        "recognize spans in {:?}",
        file.iter().map(|(_, s)| &s.name).collect::<Vec<_>>()
    );
    assert_eq!(hex(&rec[0].parent_span_id), file_caller);
    assert!(!win.is_empty() && win.iter().all(|w| w.parent_span_id == rec[0].span_id));
    assert!(
        !enc_s.is_empty()
            && enc_s
                .iter()
                .all(|e| win.iter().any(|w| w.span_id == e.parent_span_id))
    );
    assert!(
        !dec_s.is_empty()
            && dec_s
                .iter()
                .all(|d| enc_s.iter().any(|e| e.span_id == d.parent_span_id))
    );
    let spans: Vec<(String, Span)> = receiver
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, s)| hex(&s.trace_id) == trace_id)
        .cloned()
        .collect();
    let by_name = |name: &str| -> Vec<&(String, Span)> {
        spans.iter().filter(|(_, s)| s.name == name).collect()
    };
    let ids =
        |v: &[&(String, Span)]| -> Vec<String> { v.iter().map(|(_, s)| hex(&s.span_id)).collect() };
    let services: HashMap<&str, &str> = [
        ("session", "nexus-ingest"),
        ("segment", "nexus-ingest"),
        ("encode", "nexus-encoder"),
        ("decode", "nexus-decoder"),
    ]
    .into();
    for (name, service) in &services {
        let found = by_name(name);
        assert!(
            !found.is_empty(),
            "no {name} span in trace {trace_id}; all spans received: {all:?}\n{logs}"
        );
        for (svc, _) in &found {
            assert_eq!(svc, service, "{name}");
        }
    }
    let session = by_name("session");
    assert_eq!(session.len(), 1);
    let session_span = &session[0].1;
    assert_eq!(
        hex(&session_span.parent_span_id),
        caller,
        "the session is the caller's child"
    );
    let sid = attr(session_span, "session.id").expect("session.id");
    let segments = by_name("segment");
    let encodes = by_name("encode");
    let decodes = by_name("decode");
    for (_, s) in &segments {
        assert_eq!(
            hex(&s.parent_span_id),
            hex(&session_span.span_id),
            "segment under session"
        );
    }
    for (_, s) in &encodes {
        assert!(
            ids(&segments).contains(&hex(&s.parent_span_id)),
            "encode {:?} under a segment",
            s.name
        );
        for key in ["queue_ms", "batch_size", "inference_ms", "segment"] {
            assert!(attr(s, key).is_some(), "encode lacks {key}");
        }
    }
    for (_, s) in &decodes {
        assert!(
            ids(&encodes).contains(&hex(&s.parent_span_id)),
            "decode under an encode"
        );
        assert_eq!(attr(s, "session.id").as_deref(), Some(sid.as_str()));
        // An interim that a newer revision overtook before it was decoded
        // says so instead of carrying a batch and an inference time.
        let superseded = attr(s, "superseded").as_deref() == Some("true");
        let keys: &[&str] = if superseded {
            &["queue_ms", "revision"]
        } else {
            &["queue_ms", "batch_size", "inference_ms", "revision"]
        };
        for key in keys {
            assert!(attr(s, key).is_some(), "decode lacks {key}");
        }
        if superseded {
            assert_eq!(
                attr(s, "is_final").as_deref(),
                Some("false"),
                "only interims are superseded"
            );
        }
    }
    assert!(
        decodes
            .iter()
            .any(|(_, s)| attr(s, "is_final").as_deref() == Some("true")),
        "no final window was decoded in the trace"
    );
}

/// "go forward ten meters", then a second of silence so the endpointer closes it.
fn goforward() -> Vec<f32> {
    let raw = std::fs::read(testdata().join("goforward.raw")).unwrap();
    let mut samples: Vec<f32> = raw
        .chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
        .collect();
    samples.extend(std::iter::repeat_n(0.0, 16_000));
    samples
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Scrapes `addr` until every one of `series` is on the page (30 s at most).
async fn scrape_until(addr: &str, series: &[&str]) -> Series {
    let t0 = std::time::Instant::now();
    loop {
        let page = scrape(addr).await;
        let missing: Vec<&&str> = series
            .iter()
            .filter(|s| !page.values.contains_key(**s))
            .collect();
        if missing.is_empty() {
            return page;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{addr}: missing {missing:?}\n{}",
            page.text
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One scrape: the text, and each series (`name{labels}`) with its value.
struct Series {
    text: String,
    values: HashMap<String, f64>,
}

impl Series {
    fn get(&self, series: &str) -> f64 {
        *self.values.get(series).unwrap_or(&0.0)
    }
}

async fn scrape(addr: &str) -> Series {
    let (status, text) = nexus_tests::http_client::Client::new(addr.parse().unwrap())
        .get("/metrics", None)
        .await;
    assert_eq!(status, 200, "{text}");
    let values = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap_or(f64::NAN)))
        .collect();
    Series { text, values }
}

/// What a session must move on each stage (encoder, decoder, ingest).
fn check_metrics(before: &[Series], after: &[Series]) {
    let moved: [&[&str]; 3] = [
        &[
            r#"nexus_encoder_segments_total{kind="final",outcome="ok"}"#,
            "nexus_encoder_batch_size_count",
            "nexus_encoder_inference_seconds_count",
            "nexus_encoder_real_time_factor_count",
        ],
        &[
            r#"nexus_decoder_segments_total{kind="final",outcome="ok"}"#,
            "nexus_decoder_batch_size_count",
            "nexus_decoder_inference_seconds_count",
        ],
        &[
            "nexus_ingest_sessions_started_total",
            r#"nexus_ingest_sessions_ended_total{outcome="ok"}"#,
            r#"nexus_ingest_audio_seconds_total{source="live"}"#,
            r#"nexus_ingest_caption_latency_seconds_count{kind="final"}"#,
        ],
    ];
    let present: [&[&str]; 3] = [
        &[
            r#"nexus_model_load_seconds{model="tiny.en"}"#,
            r#"nexus_stream_lag{stream="audio",group="encoder"}"#,
            r#"nexus_stream_pending{stream="audio",group="encoder"}"#,
        ],
        &[
            r#"nexus_model_load_seconds{model="tiny.en"}"#,
            r#"nexus_stream_lag{stream="encoded",group="decoder"}"#,
            "nexus_decoder_slots",
            "nexus_decoder_slots_free",
            "nexus_decoder_slots_used",
        ],
        &[
            r#"nexus_stream_lag{stream="audio",group="encoder"}"#,
            "nexus_ingest_sessions_active",
        ],
    ];
    for (i, stage) in ["encoder", "decoder", "ingest"].iter().enumerate() {
        for s in moved[i] {
            assert!(
                after[i].get(s) > before[i].get(s),
                "{stage}: {s} did not move ({} → {})\n{}",
                before[i].get(s),
                after[i].get(s),
                after[i].text
            );
        }
        for s in present[i] {
            assert!(
                after[i].values.contains_key(*s),
                "{stage}: no {s}\n{}",
                after[i].text
            );
        }
        promtool(stage, &after[i].text);
    }
    assert!(after[2].get(r#"nexus_ingest_audio_seconds_total{source="live"}"#) >= 3.0);
    assert_eq!(after[1].get("nexus_decoder_slots"), 16.0);
    assert_eq!(after[2].get("nexus_ingest_sessions_active"), 0.0);
}

/// `promtool check metrics` on an exposition (scripts/setup.sh installs
/// promtool), and every series and every family's metadata once.
fn promtool(stage: &str, text: &str) {
    use std::io::Write;
    let mut seen = std::collections::HashSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        // A family's HELP or TYPE line by its name, a sample by its series.
        let key = if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            line.splitn(4, ' ').take(3).collect::<Vec<_>>().join(" ")
        } else if line.starts_with('#') {
            continue;
        } else {
            line.rsplit_once(' ').map_or(line, |(k, _)| k).to_owned()
        };
        assert!(
            seen.insert(key.clone()),
            "{stage}: {key:?} appears twice\n{text}"
        );
    }
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (scripts/setup.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{stage}: promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 16 kHz mono 16-bit WAV of `samples`.
fn wav_of(samples: &[f32]) -> Vec<u8> {
    let data: Vec<u8> = samples
        .iter()
        .flat_map(|s| ((s.clamp(-1.0, 1.0) * 32767.0) as i16).to_le_bytes())
        .collect();
    let mut w = Vec::with_capacity(44 + data.len());
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&16_000u32.to_le_bytes());
    w.extend_from_slice(&32_000u32.to_le_bytes());
    w.extend_from_slice(&2u16.to_le_bytes());
    w.extend_from_slice(&16u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&(data.len() as u32).to_le_bytes());
    w.extend_from_slice(&data);
    w
}

async fn client_recognize(
    ing: &Proc,
    call: tonic::Request<nexus_proto::speech::RecognizeRequest>,
) -> String {
    let mut client = SpeechRecognitionClient::new(nexus_tests::connect(ing.addr).await.unwrap());
    let r = client.recognize(call).await.unwrap().into_inner();
    r.results
        .iter()
        .filter_map(|r| r.alternatives.first())
        .map(|a| a.transcript.clone())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `nexus serve` runs every stage in one process: its one `/metrics` page is
/// the sum of the stages, each family and series once, and promtool reads
/// it; the admin port's log filter is the process's. A vocoder process's page
/// passes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tiny.en, silero-vad and the Piper voice, test speech and Redis; scripts/test.sh"]
async fn the_embedded_fleet_serves_one_prometheus_page() {
    const TOKEN: &str = "embedded-admin-token-0001";
    let admin = free_addr().to_string();
    let mut serve = Proc::serve(&admin, &["--admin-token", TOKEN]);
    serve.wait_serving(Duration::from_secs(120)).await;
    let samples = goforward();
    let out = nexus_tests::fleet::stream(serve.addr, pcm16_config(MODEL), &samples, 4.0, |_| {})
        .await
        .unwrap();
    assert!(out.status.is_none(), "{:?}", out.status);
    assert!(
        out.text().to_lowercase().contains("forward"),
        "{}",
        out.text()
    );
    // Every stage's families, and the streams each stage reads, sampled once.
    let wanted = [
        r#"nexus_ingest_sessions_ended_total{outcome="ok"}"#,
        r#"nexus_encoder_segments_total{kind="final",outcome="ok"}"#,
        r#"nexus_decoder_segments_total{kind="final",outcome="ok"}"#,
        "nexus_decoder_slots",
        r#"nexus_model_load_seconds{model="tiny.en"}"#,
        r#"nexus_stream_lag{stream="audio",group="encoder"}"#,
        r#"nexus_stream_lag{stream="encoded",group="decoder"}"#,
        r#"nexus_stream_dead_letters{stream="encoded"}"#,
        r#"nexus_stream_dead_letters{stream="jobs"}"#,
    ];
    let page = scrape_until(&admin, &wanted).await;
    promtool("nexus serve", &page.text);
    // The process's log filter, changed through its admin port.
    let client = nexus_tests::http_client::Client::new(admin.parse().unwrap());
    let bearer = format!("Bearer {TOKEN}");
    let (status, body) = client
        .request(
            "PUT",
            "/log",
            &[("authorization", bearer.as_str())],
            b"info,nexus_ingest=debug",
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // A vocoder of its own.
    let (redis, p) = (redis_url(), prefix("vocmetrics"));
    let vadmin = free_addr().to_string();
    let mut voc = Proc::start(
        "vocoder",
        "nexus-vocoder",
        &[
            "--redis",
            redis.as_str(),
            "--key-prefix",
            p.as_str(),
            "--admin-listen",
            vadmin.as_str(),
        ],
    );
    voc.wait_serving(Duration::from_secs(120)).await;
    let page = scrape_until(
        &vadmin,
        &[r#"nexus_stream_dead_letters{stream="synthesize"}"#],
    )
    .await;
    promtool("nexus-vocoder", &page.text);
    assert!(serve.terminate().success());
    assert!(voc.terminate().success());
}
