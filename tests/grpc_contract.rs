//! The generated contract through a real tonic server on port 0: a
//! StreamingRecognize exchange round-trips every field a client relies on,
//! stream-order errors come back as INVALID_ARGUMENT, reflection lists the
//! hosted services and serves the descriptors of every public service, and
//! health flips to NOT_SERVING on shutdown before the server drains.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use nexus_core::CancellationToken;
use nexus_core::grpc::{DrainOptions, GrpcServer, HEALTH_SERVICE, REFLECTION_SERVICE};
use nexus_proto::speech::speech_recognition_client::SpeechRecognitionClient;
use nexus_proto::speech::speech_recognition_server::{SpeechRecognition, SpeechRecognitionServer};
use nexus_proto::speech::streaming_recognize_request::StreamingRequest;
use nexus_proto::speech::*;
use nexus_tests::{bind_local, connect};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

const RECOGNITION: &str = "nexus.speech.v1.SpeechRecognition";

/// A test double that reports how much audio it received, so every field of the
/// exchange is checked against values the client can compute.
struct CountingRecognizer;

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<StreamingRecognizeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SpeechRecognition for CountingRecognizer {
    async fn recognize(
        &self,
        _: Request<RecognizeRequest>,
    ) -> Result<Response<RecognizeResponse>, Status> {
        Err(Status::unimplemented("not exercised by this test"))
    }

    type StreamingRecognizeStream = ResponseStream;

    async fn streaming_recognize(
        &self,
        request: Request<Streaming<StreamingRecognizeRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty stream"))?;
        let Some(StreamingRequest::StreamingConfig(cfg)) = first.streaming_request else {
            return Err(Status::invalid_argument(
                "the first message must carry streaming_config",
            ));
        };
        let rc = cfg.config.clone().unwrap_or_default();
        let fmt = rc.audio_format.unwrap_or_default();
        let bytes_per_ms =
            u64::from(fmt.sample_rate_hz) * u64::from(fmt.channels.max(1)) * 2 / 1000;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut received = 0u64;
            let mut revision = 0u32;
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                match msg.streaming_request {
                    Some(StreamingRequest::AudioContent(chunk)) => {
                        received += chunk.len() as u64;
                        revision += 1;
                        let result = StreamingRecognitionResult {
                            alternatives: vec![SpeechRecognitionAlternative {
                                transcript: format!("{received} bytes"),
                                ..Default::default()
                            }],
                            stability: 0.5,
                            revision,
                            audio_processed_ms: received / bytes_per_ms,
                            speaker: cfg.speaker_label.clone(),
                            result_index: u64::from(revision),
                            ..Default::default()
                        };
                        let resp = StreamingRecognizeResponse {
                            session_id: "session-1".into(),
                            results: vec![result],
                            ..Default::default()
                        };
                        if tx.send(Ok(resp)).await.is_err() {
                            return;
                        }
                    }
                    _ => {
                        let _ = tx
                            .send(Err(Status::invalid_argument(
                                "streaming_config may only be sent first",
                            )))
                            .await;
                        return;
                    }
                }
            }
            let final_result = StreamingRecognitionResult {
                alternatives: vec![SpeechRecognitionAlternative {
                    transcript: "go forward ten meters".into(),
                    confidence: 0.9,
                    words: vec![WordInfo {
                        word: "go".into(),
                        start_ms: 120,
                        end_ms: 300,
                        confidence: 0.95,
                        speaker: String::new(),
                    }],
                }],
                is_final: true,
                stability: 1.0,
                revision: revision + 1,
                span: Some(TimeSpan {
                    start_ms: 0,
                    end_ms: received / bytes_per_ms,
                }),
                audio_processed_ms: received / bytes_per_ms,
                translation: rc.translation.map(|t| TranslationResult {
                    source_language: rc.language.clone(),
                    target_language: t.target_language,
                    text: "向前走十米".into(),
                    model: "test".into(),
                    ..Default::default()
                }),
                language: rc.language,
                speaker: cfg.speaker_label,
                result_index: u64::from(revision + 1),
                ..Default::default()
            };
            let _ = tx
                .send(Ok(StreamingRecognizeResponse {
                    session_id: "session-1".into(),
                    results: vec![final_result],
                    speech_event: SpeechEvent::EndOfSession as i32,
                    speech_event_ms: received / bytes_per_ms,
                    speech_audio: None,
                    speech_event_segment_id: 0,
                }))
                .await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn start() -> anyhow::Result<(
    std::net::SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    let (listener, addr) = bind_local().await?;
    let shutdown = CancellationToken::new();
    let server = GrpcServer::new(
        &[RECOGNITION],
        DrainOptions {
            announce: Duration::from_millis(300),
            grace: Duration::from_secs(5),
        },
    )
    .await;
    server.set_serving(true).await;
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(SpeechRecognitionServer::new(CountingRecognizer));
    let stop = shutdown.clone();
    let task = tokio::spawn(async move { Ok(server.serve(routes, listener, stop).await?) });
    Ok((addr, shutdown, task))
}

fn config_message() -> StreamingRecognizeRequest {
    StreamingRecognizeRequest {
        streaming_request: Some(StreamingRequest::StreamingConfig(
            StreamingRecognitionConfig {
                config: Some(RecognitionConfig {
                    language: "en".into(),
                    task: Task::Translate as i32,
                    translation: Some(TranslationConfig {
                        target_language: "zh".into(),
                        model: String::new(),
                    }),
                    audio_format: Some(AudioFormat {
                        encoding: AudioEncoding::LinearPcmS16le as i32,
                        sample_rate_hz: 16_000,
                        channels: 1,
                    }),
                    enable_word_time_offsets: true,
                    ..Default::default()
                }),
                interim_results: true,
                speaker_label: "Ada".into(),
                ..Default::default()
            },
        )),
    }
}

fn audio_message(len: usize) -> StreamingRecognizeRequest {
    StreamingRecognizeRequest {
        streaming_request: Some(StreamingRequest::AudioContent(vec![0u8; len].into())),
    }
}

#[tokio::test]
async fn streaming_recognize_round_trips() -> anyhow::Result<()> {
    let (addr, shutdown, task) = start().await?;
    let mut client = SpeechRecognitionClient::new(connect(addr).await?);
    // 100 ms of 16 kHz s16 mono per chunk.
    let outbound = tokio_stream::iter(vec![
        config_message(),
        audio_message(3200),
        audio_message(3200),
        audio_message(3200),
    ]);
    let responses: Vec<_> = client
        .streaming_recognize(outbound)
        .await?
        .into_inner()
        .collect()
        .await;
    let responses = responses.into_iter().collect::<Result<Vec<_>, _>>()?;
    assert_eq!(responses.len(), 4);
    for (i, r) in responses[..3].iter().enumerate() {
        let res = &r.results[0];
        assert_eq!(r.session_id, "session-1");
        assert!(!res.is_final);
        assert_eq!(res.audio_processed_ms, 100 * (i as u64 + 1));
        assert_eq!(
            res.alternatives[0].transcript,
            format!("{} bytes", 3200 * (i + 1))
        );
        assert_eq!(res.stability, 0.5);
        assert_eq!(res.speaker, "Ada");
    }
    let last = &responses[3];
    assert_eq!(last.speech_event(), SpeechEvent::EndOfSession);
    assert_eq!(last.speech_event_ms, 300);
    let fin = &last.results[0];
    assert!(fin.is_final);
    assert_eq!(fin.result_index, 4);
    assert_eq!(
        fin.span,
        Some(TimeSpan {
            start_ms: 0,
            end_ms: 300
        })
    );
    assert_eq!(fin.language, "en");
    let words = &fin.alternatives[0].words;
    assert_eq!(
        (words[0].word.as_str(), words[0].start_ms, words[0].end_ms),
        ("go", 120, 300)
    );
    let tr = fin.translation.as_ref().expect("translation on the stream");
    assert_eq!(
        (tr.target_language.as_str(), tr.text.as_str()),
        ("zh", "向前走十米")
    );

    shutdown.cancel();
    task.await??;
    Ok(())
}

#[tokio::test]
async fn audio_before_config_is_invalid_argument() -> anyhow::Result<()> {
    let (addr, shutdown, task) = start().await?;
    let mut client = SpeechRecognitionClient::new(connect(addr).await?);
    let status = client
        .streaming_recognize(tokio_stream::iter(vec![audio_message(320)]))
        .await
        .expect_err("audio first must be refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "the first message must carry streaming_config"
    );

    let mut stream = client
        .streaming_recognize(tokio_stream::iter(vec![config_message(), config_message()]))
        .await?
        .into_inner();
    let status = stream
        .next()
        .await
        .expect("an answer")
        .expect_err("second config refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    shutdown.cancel();
    task.await??;
    Ok(())
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

#[tokio::test]
async fn reflection_lists_services_and_describes_the_whole_api() -> anyhow::Result<()> {
    let (addr, shutdown, task) = start().await?;
    let mut client = ServerReflectionClient::new(connect(addr).await?);

    let MessageResponse::ListServicesResponse(list) =
        reflect(&mut client, MessageRequest::ListServices(String::new())).await?
    else {
        panic!("expected a service list");
    };
    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    let mut expected = vec![RECOGNITION, HEALTH_SERVICE, REFLECTION_SERVICE];
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
        let short = service.rsplit('.').next().unwrap();
        let found = fd
            .file_descriptor_proto
            .iter()
            .map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()).unwrap())
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
    let file = fd
        .file_descriptor_proto
        .iter()
        .map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()).unwrap())
        .find(|f| f.name() == "nexus/speech/v1/recognition.proto")
        .expect("recognition.proto");
    let method = file.service[0]
        .method
        .iter()
        .find(|m| m.name() == "StreamingRecognize")
        .expect("StreamingRecognize");
    assert!(method.client_streaming() && method.server_streaming());

    shutdown.cancel();
    task.await??;
    Ok(())
}

#[tokio::test]
async fn health_goes_not_serving_before_the_drain() -> anyhow::Result<()> {
    let (addr, shutdown, task) = start().await?;
    let mut health = HealthClient::new(connect(addr).await?);
    for service in ["", RECOGNITION] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
    let mut watch = health
        .watch(HealthCheckRequest {
            service: RECOGNITION.into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        watch.message().await?.unwrap().status(),
        ServingStatus::Serving
    );
    shutdown.cancel();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message()).await??;
    assert_eq!(next.unwrap().status(), ServingStatus::NotServing);
    // The open watch stream is an in-flight call; the server still ends within its grace.
    tokio::time::timeout(Duration::from_secs(10), task).await???;
    Ok(())
}
