//! The generated contract through the real service (`nexus serve` with
//! tiny.en, a process like a user's): a StreamingRecognize exchange carries
//! every field a client relies on, consistently with the audio it sent;
//! stream-order errors come back as INVALID_ARGUMENT; reflection lists the
//! hosted services and serves the descriptors of every public service; and
//! health flips to NOT_SERVING on SIGTERM before the process drains and exits.

use std::time::Duration;

use futures::StreamExt;
use nexus_core::grpc::{HEALTH_SERVICE, REFLECTION_SERVICE};
use nexus_proto::speech::speech_recognition_client::SpeechRecognitionClient;
use nexus_proto::speech::streaming_recognize_request::StreamingRequest;
use nexus_proto::speech::*;
use nexus_tests::connect;
use nexus_tests::fleet::{MODEL, Proc, pcm16_config, speech, stream};
use prost::Message;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

const RECOGNITION: &str = "nexus.speech.v1.SpeechRecognition";

async fn serve() -> Proc {
    let admin = nexus_tests::fleet::free_addr().to_string();
    let mut p = Proc::serve(&admin, &[]);
    p.wait_serving(Duration::from_secs(120)).await;
    p
}

/// English PCM with interims, word times and a speaker label.
fn contract_config() -> StreamingRecognitionConfig {
    let mut cfg = pcm16_config(MODEL);
    cfg.speaker_label = "Ada".into();
    if let Some(rc) = cfg.config.as_mut() {
        rc.enable_word_time_offsets = true;
    }
    cfg
}

fn config_message() -> StreamingRecognizeRequest {
    StreamingRecognizeRequest {
        streaming_request: Some(StreamingRequest::StreamingConfig(contract_config())),
    }
}

fn audio_message(len: usize) -> StreamingRecognizeRequest {
    StreamingRecognizeRequest {
        streaming_request: Some(StreamingRequest::AudioContent(vec![0u8; len].into())),
    }
}

#[tokio::test]
#[ignore = "needs the tiny.en and silero-vad weights and the test data; scripts/test.sh"]
async fn the_real_service_keeps_the_streaming_contract() {
    let server = serve().await;
    let samples = speech();
    let sent_ms = samples.len() as u64 * 1000 / 16_000;

    let out = stream(server.addr, contract_config(), &samples, 4.0, |_| {})
        .await
        .expect("the session runs");
    assert!(out.status.is_none(), "{:?}", out.status);
    let r = &out.responses;
    // One session id, a UUID, on every response.
    let id = &r[0].session_id;
    let uuid_like = id.len() == 36
        && id.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    assert!(uuid_like, "{id:?}");
    assert!(r.iter().all(|x| &x.session_id == id));
    // Progress only grows and never passes the audio sent.
    let processed: Vec<u64> = r
        .iter()
        .flat_map(|x| &x.results)
        .map(|x| x.audio_processed_ms)
        .collect();
    assert!(processed.windows(2).all(|w| w[0] <= w[1]), "{processed:?}");
    assert!(
        processed.iter().all(|p| *p <= sent_ms),
        "{processed:?} past {sent_ms}"
    );
    // Interims say how stable they are; finals are stable, indexed in order,
    // timed inside the audio, with their words inside their span.
    let interims = out.interims();
    assert!(!interims.is_empty());
    assert!(
        interims
            .iter()
            .all(|x| !x.is_final && (0.0..=1.0).contains(&x.stability))
    );
    let finals = out.finals();
    assert!(finals.len() >= 3, "{finals:#?}");
    let indices: Vec<u64> = finals.iter().map(|f| f.result_index).collect();
    assert!(indices.windows(2).all(|w| w[0] < w[1]), "{indices:?}");
    for f in &finals {
        assert_eq!(f.stability, 1.0);
        assert_eq!(f.language, "en");
        assert_eq!(f.speaker, "Ada");
        let span = f.span.expect("a final has its span");
        assert!(
            span.start_ms < span.end_ms && span.end_ms <= sent_ms,
            "{span:?}"
        );
        let alt = &f.alternatives[0];
        assert!((0.0..=1.0).contains(&alt.confidence), "{alt:?}");
        assert!(!alt.words.is_empty(), "{alt:?}");
        for w in &alt.words {
            assert!(
                span.start_ms <= w.start_ms && w.start_ms <= w.end_ms && w.end_ms <= span.end_ms,
                "{w:?} outside {span:?}"
            );
        }
    }
    assert!(
        out.text().to_lowercase().contains("dashwood"),
        "{}",
        out.text()
    );
    // The last response ends the session at the end of the audio.
    let last = r.last().unwrap();
    assert_eq!(last.speech_event(), SpeechEvent::EndOfSession);
    assert!(
        last.speech_event_ms <= sent_ms && last.speech_event_ms + 500 >= sent_ms,
        "{last:?}"
    );

    // Stream order: audio first is refused, and so is a second config.
    let mut client = SpeechRecognitionClient::new(connect(server.addr).await.unwrap());
    let status = match client
        .streaming_recognize(tokio_stream::iter(vec![audio_message(320)]))
        .await
    {
        Err(s) => s,
        Ok(resp) => resp
            .into_inner()
            .next()
            .await
            .expect("an answer")
            .expect_err("audio first must be refused"),
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("the first message must carry streaming_config"),
        "{status:?}"
    );
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(config_message()).await.unwrap();
    tx.send(config_message()).await.unwrap();
    let mut responses = client
        .streaming_recognize(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("the first config opens the session")
        .into_inner();
    let status = loop {
        match responses.next().await.expect("an answer") {
            Ok(_) => continue,
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("first message only"),
        "{status:?}"
    );
    drop(tx);

    reflection_lists_services_and_describes_the_whole_api(&server)
        .await
        .expect("reflection");
}

async fn reflect(
    client: &mut ServerReflectionClient<tonic::transport::Channel>,
    request: MessageRequest,
) -> anyhow::Result<MessageResponse> {
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await?
        .into_inner();
    let resp = responses.message().await?.expect("one reflection response");
    Ok(resp.message_response.expect("a response body"))
}

async fn reflection_lists_services_and_describes_the_whole_api(
    server: &Proc,
) -> anyhow::Result<()> {
    let mut client = ServerReflectionClient::new(connect(server.addr).await?);

    let MessageResponse::ListServicesResponse(list) =
        reflect(&mut client, MessageRequest::ListServices(String::new())).await?
    else {
        panic!("expected a service list");
    };
    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    let mut expected: Vec<&str> = nexus_proto::PUBLIC_SERVICES.to_vec();
    expected.extend([HEALTH_SERVICE, REFLECTION_SERVICE]);
    expected.sort();
    assert_eq!(names, expected);

    // Every public service's descriptor is served, so clients can be generated from a live server.
    for service in nexus_proto::PUBLIC_SERVICES {
        let MessageResponse::FileDescriptorResponse(fd) = reflect(
            &mut client,
            MessageRequest::FileContainingSymbol((*service).into()),
        )
        .await?
        else {
            panic!("no descriptor for {service}");
        };
        let short = service.rsplit('.').next().unwrap_or(service);
        let files = fd
            .file_descriptor_proto
            .iter()
            .map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()))
            .collect::<Result<Vec<_>, _>>()?;
        let found = files
            .iter()
            .any(|f| f.service.iter().any(|s| s.name() == short));
        assert!(found, "{service} missing from its file descriptor");
    }
    let MessageResponse::FileDescriptorResponse(fd) = reflect(
        &mut client,
        MessageRequest::FileContainingSymbol(RECOGNITION.into()),
    )
    .await?
    else {
        panic!("no descriptor");
    };
    let files = fd
        .file_descriptor_proto
        .iter()
        .map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()))
        .collect::<Result<Vec<_>, _>>()?;
    let file = files
        .iter()
        .find(|f| f.name() == "nexus/speech/v1/recognition.proto")
        .expect("recognition.proto");
    let method = file.service[0]
        .method
        .iter()
        .find(|m| m.name() == "StreamingRecognize")
        .expect("StreamingRecognize");
    assert!(method.client_streaming() && method.server_streaming());
    Ok(())
}

#[tokio::test]
#[ignore = "needs the tiny.en and silero-vad weights; scripts/test.sh"]
async fn health_goes_not_serving_on_sigterm_before_the_drain() {
    let mut server = serve().await;
    let mut health = HealthClient::new(connect(server.addr).await.unwrap());
    for service in ["", RECOGNITION] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
    let mut watch = health
        .watch(HealthCheckRequest {
            service: RECOGNITION.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    let pid = server.pid();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("health answered within 10 s of SIGTERM")
        .unwrap();
    assert_eq!(next.unwrap().status(), ServingStatus::NotServing);
    // The open watch stream is an in-flight call; the process still ends within its grace.
    let status = server.wait();
    assert!(status.success(), "{status}");
}
