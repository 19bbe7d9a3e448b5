//! Live captions over WebSocket: `GET /v1/realtime?intent=transcription`
//! speaks the OpenAI Realtime transcription protocol (see [`protocol`]) on
//! top of the same live session as StreamingRecognize: admission against
//! the decoder pool, tenants and keys, limits, pacing, the idle timeout,
//! resume within the grace period, traces and metrics.
//!
//! A connection is two tasks. The reader takes client events and feeds the
//! session's input (it may wait on the session's pacing); the writer turns
//! the session's responses and the reader's replies into server events.
//! The writer never waits on the reader, and a client that leaves events
//! unread longer than `--client-write-timeout-ms` is disconnected, so a slow
//! or stuck client holds a bounded amount of memory and its session parks
//! for resuming like a dropped gRPC stream. A close frame ends the session;
//! a connection that breaks without one leaves it resumable with
//! `?resume=<session id>&after=<result_index>`.

pub(crate) mod protocol;

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use nexus_bus::{Bus, SessionId};
use nexus_proto::pipeline::TraceContext;
use nexus_proto::speech::streaming_recognize_request::StreamingRequest;
use nexus_proto::speech::turn_control::Action;
use nexus_proto::speech::{
    ResumeSession, StreamingRecognizeRequest, StreamingRecognizeResponse, TurnControl,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::Ingest;
use crate::auth::Grant;
use crate::http::ApiError;
use protocol::{ClientEvent, ProtocolError, Render, Settings};

/// Largest client message (an append's base64 audio, or a binary frame).
pub(crate) const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// The subprotocol prefix browsers use to carry an API key.
const KEY_PROTOCOL: &str = "openai-insecure-api-key.";

type Responses = mpsc::Receiver<Result<StreamingRecognizeResponse, Status>>;
type Input = mpsc::Sender<Result<StreamingRecognizeRequest, Status>>;

/// What the reader hands the writer.
enum ToWriter {
    /// A server event of a type with its fields.
    Event(&'static str, Value),
    Error(ProtocolError),
    /// The session started (or was resumed): render its responses.
    Attach(Responses, bool),
    /// The client closed: let the session finish without writing.
    Drain,
    /// Close the connection with a code and reason.
    Close(u16, String),
}

fn bad(message: impl Into<String>, param: &'static str) -> ApiError {
    ApiError::bad(message, param)
}

/// The API key a browser sent as a subprotocol, if any.
fn key_from_protocols(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(KEY_PROTOCOL).map(str::to_owned))
}

/// `GET /v1/realtime`: authenticates and checks the request before the
/// upgrade (401, 429, 400 and 404 come as HTTP statuses), then speaks the
/// protocol on the socket.
pub(crate) async fn upgrade<B: Bus>(
    State(ingest): State<Ingest<B>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let inner = ingest.inner.clone();
    if inner.shutdown.is_cancelled() {
        return Err(
            Status::unavailable("this ingest replica is draining; retry on another").into(),
        );
    }
    let get = |k: &str| headers.get(k).and_then(|v| v.to_str().ok());
    let bearer = key_from_protocols(&headers).map(|k| format!("Bearer {k}"));
    let tenant = inner
        .access
        .authenticate(
            get("authorization").or(bearer.as_deref()),
            get("x-api-key"),
            get("x-tenant"),
        )
        .map_err(|d| ApiError::from(Status::from(d)))?;
    const KNOWN: &[&str] = &["intent", "model", "resume", "after"];
    if let Some(k) = q.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("query parameter {k:?} is unknown; this endpoint takes {KNOWN:?}"),
        ));
    }
    if q.get("intent").map(String::as_str) != Some("transcription") {
        return Err(bad(
            "this server serves transcription sessions only; connect to /v1/realtime?intent=transcription",
            "intent",
        ));
    }
    let mut settings = Settings::default();
    if let Some(m) = q.get("model") {
        settings.model = protocol::model_of(m, &inner.cfg.models).map_err(|e| bad(e, "model"))?;
        settings.model_name = m.clone();
    }
    let Ok(ws) = ws else {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "this endpoint speaks WebSocket: send an Upgrade: websocket request",
        ));
    };
    let ws = ws
        .protocols(["realtime"])
        .max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        .max_write_buffer_size(1 << 20);
    let traceparent = TraceContext {
        traceparent: get("traceparent").unwrap_or_default().to_owned(),
        tracestate: get("tracestate").unwrap_or_default().to_owned(),
    };
    if let Some(resume) = q.get("resume") {
        let after = match q.get("after") {
            None => 0,
            Some(a) => a.parse::<u64>().map_err(|_| {
                bad(
                    format!("after {a:?} must be a result_index (a whole number)"),
                    "after",
                )
            })?,
        };
        let (in_tx, in_rx) = mpsc::channel(16);
        let out = ingest
            .resume_session(
                ResumeSession {
                    session_id: resume.clone(),
                    after_result_index: after,
                },
                tenant,
                Box::pin(ReceiverStream::new(in_rx)),
            )
            .await?;
        let id = resume.clone();
        return Ok(ws.on_upgrade(move |socket| async move {
            connection(
                socket,
                ingest,
                Start::Resumed {
                    id,
                    out,
                    input: in_tx,
                },
            )
            .await;
        }));
    }
    if q.contains_key("after") {
        return Err(bad("after belongs with resume=<session id>", "after"));
    }
    let grant = inner
        .access
        .limit(tenant)
        .map_err(|d| ApiError::from(Status::from(d)))?;
    let id = SessionId::parse(&uuid::Uuid::new_v4().to_string())
        .map_err(|e| ApiError::from(Status::internal(e.to_string())))?;
    Ok(ws.on_upgrade(move |socket| async move {
        connection(
            socket,
            ingest,
            Start::New {
                id,
                settings: Box::new(settings),
                grant,
                traceparent,
            },
        )
        .await;
    }))
}

enum Start {
    New {
        id: SessionId,
        settings: Box<Settings>,
        grant: Grant,
        traceparent: TraceContext,
    },
    Resumed {
        id: String,
        out: Responses,
        input: Input,
    },
}

/// How a reader's loop ended.
enum Ended {
    /// The client sent a close frame.
    Closed,
    /// The connection broke, or the writer gave up on the client.
    Lost,
    /// The server ended it (a refusal or the idle timeout); the writer closes.
    Server,
}

async fn connection<B: Bus>(socket: WebSocket, ingest: Ingest<B>, start: Start) {
    let (sink, mut stream) = socket.split();
    let (ctl, ctl_rx) = mpsc::channel::<ToWriter>(16);
    let gone = CancellationToken::new();
    let timeout = ingest.inner.cfg.client_write_timeout;
    let writer = tokio::spawn(write(sink, ctl_rx, timeout, gone.clone()));
    let served = ingest.inner.cfg.models.clone();
    let idle = ingest.inner.cfg.idle_timeout;
    // The session, once it runs: its input.
    let mut input: Option<Input> = None;
    let mut waiting: Option<(SessionId, Grant, TraceContext)> = None;
    let mut settings = Settings::default();
    match start {
        Start::New {
            id,
            settings: s,
            grant,
            traceparent,
        } => {
            let _ = ctl
                .send(ToWriter::Event(
                    "transcription_session.created",
                    json!({"session": s.to_json(id.as_str())}),
                ))
                .await;
            settings = *s;
            waiting = Some((id, grant, traceparent));
        }
        Start::Resumed { id, out, input: i } => {
            tracing::info!(session = %id, "realtime session resumed");
            let _ = ctl
                .send(ToWriter::Event(
                    "transcription_session.created",
                    json!({"session": {"id": id, "object": "realtime.transcription_session", "resumed": true}}),
                ))
                .await;
            let _ = ctl.send(ToWriter::Attach(out, false)).await;
            input = Some(i);
        }
    }
    // Before its first audio a connection holds no decoder slot, but it may
    // not linger past the idle timeout either, whatever else it sends.
    let audio_due = tokio::time::Instant::now() + idle;
    let ended = loop {
        let read = async {
            match (&waiting, idle.is_zero()) {
                (Some(_), false) => tokio::time::timeout_at(audio_due, stream.next()).await.ok(),
                _ => Some(stream.next().await),
            }
        };
        let draining = async {
            if waiting.is_some() {
                ingest.inner.shutdown.cancelled().await;
            } else {
                // A running session finishes its utterance and ends itself.
                std::future::pending::<()>().await;
            }
        };
        let msg = tokio::select! {
            _ = gone.cancelled() => break Ended::Lost,
            () = draining => {
                let e = ProtocolError {
                    kind: "server_error",
                    code: "service_unavailable",
                    message: "this ingest replica is draining; reconnect to another".into(),
                    param: None,
                    event_id: None,
                };
                let _ = ctl.send(ToWriter::Error(e)).await;
                let _ = ctl.send(ToWriter::Close(1012, "draining".into())).await;
                break Ended::Server;
            }
            m = read => m,
        };
        let Some(msg) = msg else {
            let e = ProtocolError::invalid(
                "session_expired",
                format!(
                    "no audio within {} ms of connecting (the idle timeout, --idle-timeout-ms)",
                    idle.as_millis()
                ),
            );
            let _ = ctl.send(ToWriter::Error(e)).await;
            let _ = ctl.send(ToWriter::Close(1000, "idle timeout".into())).await;
            break Ended::Server;
        };
        let event = match msg {
            None => break Ended::Lost,
            Some(Err(e)) => {
                // Too large a message, or a broken connection.
                tracing::info!(error = %e, "realtime connection read failed");
                let err = ProtocolError::invalid(
                    "invalid_message",
                    format!("{e} (a message may carry at most {MAX_MESSAGE_BYTES} bytes)"),
                );
                let _ = ctl.send(ToWriter::Error(err)).await;
                let _ = ctl
                    .send(ToWriter::Close(
                        1009,
                        "message too large or unreadable".into(),
                    ))
                    .await;
                break Ended::Lost;
            }
            Some(Ok(Message::Close(_))) => break Ended::Closed,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Binary(b))) => Ok(ClientEvent::Append(b.to_vec())),
            Some(Ok(Message::Text(t))) => protocol::parse(t.as_str(), &settings, &served),
        };
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                let _ = ctl.send(ToWriter::Error(e)).await;
                continue;
            }
        };
        match event {
            ClientEvent::Update { settings: s, ga } => {
                let kind = if ga {
                    "session.updated"
                } else {
                    "transcription_session.updated"
                };
                if let Some((id, _, _)) = &waiting {
                    // Checked now, so a bad setting is answered here and not at the first audio.
                    if let Err(status) = ingest.check_stream(&s.streaming()).await {
                        let mut e = ProtocolError::of_status(&status);
                        e.param = Some("session".into());
                        let _ = ctl.send(ToWriter::Error(e)).await;
                        continue;
                    }
                    let _ = ctl
                        .send(ToWriter::Event(
                            kind,
                            json!({"session": s.to_json(id.as_str())}),
                        ))
                        .await;
                    settings = *s;
                } else if *s == settings {
                    let _ = ctl
                        .send(ToWriter::Event(kind, json!({"session": s.to_json("")})))
                        .await;
                } else {
                    let e = ProtocolError::invalid(
                        "session_already_started",
                        "the session's settings cannot change once audio has been appended; open a new session for new settings",
                    );
                    let _ = ctl.send(ToWriter::Error(e)).await;
                }
            }
            ClientEvent::Append(audio) => {
                if let Some((id, grant, traceparent)) = waiting.take() {
                    let manual = settings.turn.is_none();
                    match ingest.open_as(id, settings.streaming(), grant).await {
                        Ok((session, audio_in)) => {
                            nexus_core::trace::follow(&session.span, Some(&traceparent));
                            tracing::info!(session = %session.id, "realtime session started");
                            let (out_tx, out_rx) = mpsc::channel(64);
                            let (in_tx, in_rx) = mpsc::channel(16);
                            tokio::spawn(session.run(
                                audio_in,
                                Box::pin(ReceiverStream::new(in_rx)),
                                out_tx,
                            ));
                            let _ = ctl.send(ToWriter::Attach(out_rx, manual)).await;
                            input = Some(in_tx);
                        }
                        Err(status) => {
                            let _ = ctl
                                .send(ToWriter::Error(ProtocolError::of_status(&status)))
                                .await;
                            let code = if status.code() == tonic::Code::ResourceExhausted
                                || status.code() == tonic::Code::Unavailable
                            {
                                1013
                            } else {
                                1008
                            };
                            let _ = ctl
                                .send(ToWriter::Close(code, "session refused".into()))
                                .await;
                            break Ended::Server;
                        }
                    }
                }
                if let Some(i) = &input {
                    let m = StreamingRecognizeRequest {
                        streaming_request: Some(StreamingRequest::AudioContent(audio.into())),
                    };
                    // Waits while the session paces a sender that is ahead of real time.
                    tokio::select! {
                        _ = gone.cancelled() => break Ended::Lost,
                        r = i.send(Ok(m)) => if r.is_err() { input = None },
                    }
                }
            }
            ClientEvent::Commit | ClientEvent::Clear => {
                let action = if event == ClientEvent::Commit {
                    Action::Commit
                } else {
                    Action::Clear
                };
                match &input {
                    Some(i) => {
                        let m = StreamingRecognizeRequest {
                            streaming_request: Some(StreamingRequest::Control(TurnControl {
                                action: action as i32,
                            })),
                        };
                        if i.send(Ok(m)).await.is_err() {
                            input = None;
                        }
                    }
                    None if action == Action::Clear => {
                        let _ = ctl
                            .send(ToWriter::Event("input_audio_buffer.cleared", json!({})))
                            .await;
                    }
                    None => {
                        let e = ProtocolError::invalid(
                            "input_audio_buffer_commit_empty",
                            "nothing to commit: no audio was appended",
                        );
                        let _ = ctl.send(ToWriter::Error(e)).await;
                    }
                }
            }
        }
    };
    match ended {
        Ended::Closed => {
            // The client said goodbye: the utterance in progress is dropped,
            // the input ends, and the session finishes with nobody reading.
            if let Some(i) = input.take() {
                let clear = StreamingRecognizeRequest {
                    streaming_request: Some(StreamingRequest::Control(TurnControl {
                        action: Action::Clear as i32,
                    })),
                };
                let _ = i.send(Ok(clear)).await;
            }
            let _ = ctl.send(ToWriter::Drain).await;
        }
        Ended::Lost => {
            // The session parks for the resume grace.
            if let Some(i) = input.take() {
                // Queued behind audio the session reads at its pace; once it
                // arrives the session parks instead of ending its input.
                let lost = Err(Status::cancelled("the WebSocket connection was lost"));
                let _ = tokio::time::timeout(Duration::from_secs(10), i.send(lost)).await;
            }
            gone.cancel();
        }
        Ended::Server => {}
    }
    drop(ctl);
    let _ = writer.await;
}

/// How writing one message went.
#[derive(Debug, PartialEq, Eq)]
enum Sent {
    Ok,
    /// The connection is closed or broken: the reader learns how from the socket.
    Failed,
    /// The client left the message unread past the write timeout.
    Stuck,
}

/// Sends one message, giving up on a client that does not read it in time.
async fn send<S>(sink: &mut S, m: Message, timeout: Duration) -> Sent
where
    S: futures::Sink<Message> + Unpin,
{
    match tokio::time::timeout(timeout, sink.send(m)).await {
        Ok(Ok(())) => Sent::Ok,
        Ok(Err(_)) => Sent::Failed,
        Err(_) => Sent::Stuck,
    }
}

fn close_code(s: &Status) -> u16 {
    use tonic::Code;
    match s.code() {
        Code::ResourceExhausted | Code::Unavailable => 1013,
        Code::Internal | Code::Unknown | Code::DataLoss => 1011,
        Code::InvalidArgument | Code::OutOfRange => 1007,
        _ => 1000,
    }
}

/// The writer: server events from the reader and the session, in order.
/// When a write fails the writer stops writing but keeps the session's
/// responses flowing (discarded; results stay in the session's history)
/// until the reader has told a close frame (drain: the session finishes)
/// from a broken connection (the responses are dropped: the session parks).
/// A client stuck past the write timeout is treated as gone at once.
async fn write<S>(
    mut sink: S,
    mut ctl: mpsc::Receiver<ToWriter>,
    timeout: Duration,
    gone: CancellationToken,
) where
    S: futures::Sink<Message> + Unpin,
{
    // However the writer ends, the reader stops too.
    let _stop_reader = gone.clone().drop_guard();
    let mut out: Option<Responses> = None;
    let mut render = Render::new(false);
    let mut ctl_open = true;
    let mut draining = false;
    let mut broken = false;
    let text = |v: Value| Message::Text(v.to_string().into());
    let close = |code: u16, reason: &str| {
        let reason: String = reason.chars().take(100).collect();
        Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }))
    };
    loop {
        let next_out = async {
            match out.as_mut() {
                Some(o) => o.recv().await,
                None => std::future::pending().await,
            }
        };
        let mut batch = Vec::new();
        let mut close_with = None;
        tokio::select! {
            c = ctl.recv(), if ctl_open => match c {
                None => {
                    // The reader is done: a close frame would have said Drain.
                    ctl_open = false;
                    if out.is_none() || !draining {
                        return;
                    }
                }
                Some(ToWriter::Event(kind, fields)) => batch.push(render.event(kind, fields)),
                Some(ToWriter::Error(e)) => batch.push(render.error(&e)),
                Some(ToWriter::Attach(o, manual)) => {
                    out = Some(o);
                    render.manual = manual;
                }
                Some(ToWriter::Drain) => draining = true,
                Some(ToWriter::Close(code, reason)) => close_with = Some((code, reason)),
            },
            r = next_out => match r {
                None => {
                    out = None;
                    close_with = Some((1000, "session ended".to_owned()));
                }
                Some(Err(status)) => {
                    out = None;
                    batch.push(render.error(&ProtocolError::of_status(&status)));
                    close_with = Some((close_code(&status), status.message().to_owned()));
                }
                Some(Ok(r)) => {
                    let (events, ended) = render.response(&r);
                    batch = events;
                    if ended {
                        close_with = Some((1000, "session ended".to_owned()));
                    }
                }
            },
        }
        if broken || draining {
            if close_with.is_some() && out.is_none() {
                return;
            }
            continue;
        }
        let mut msgs: Vec<Message> = batch.into_iter().map(text).collect();
        let closing = close_with.is_some();
        if let Some((code, reason)) = close_with {
            msgs.push(close(code, &reason));
        }
        for m in msgs {
            match send(&mut sink, m, timeout).await {
                Sent::Ok => {}
                Sent::Failed => {
                    broken = true;
                    break;
                }
                Sent::Stuck => {
                    // The client does not read: its session parks for resuming.
                    tracing::info!(
                        ?timeout,
                        "realtime client left events unread; disconnecting"
                    );
                    return;
                }
            }
        }
        if closing && !broken {
            return;
        }
    }
}
