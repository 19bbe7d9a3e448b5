//! The OpenAI-compatible HTTP API of the ingest: `POST /v1/audio/transcriptions`,
//! `POST /v1/audio/translations` (multipart uploads, every response format,
//! `stream=true` as server-sent events) and `GET /v1/models`. Uploads run on
//! the fleet exactly like a gRPC Recognize call; errors use OpenAI's error
//! body so its clients raise the right exception.

use std::convert::Infallible;

use axum::Json;
use axum::extract::{DefaultBodyLimit, Multipart, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use nexus_bus::Bus;
use nexus_proto::speech::{
    DecodingOptions, RecognitionConfig, SpeakerDiarizationConfig, SpeechContext, Task,
    TranslationConfig,
};
use nexus_transcript::Format;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Code, Status};

use crate::Ingest;
use crate::auth::Grant;
use crate::transcript::transcript;

/// The model name OpenAI clients send; it maps to the fleet's default model.
pub const OPENAI_MODEL: &str = "whisper-1";

/// An error in OpenAI's shape, with the matching HTTP status.
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
        }
    }

    /// The error's message.
    #[cfg(test)]
    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn bad(message: impl Into<String>, param: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param),
        }
    }
}

impl From<Status> for ApiError {
    fn from(s: Status) -> Self {
        let status = match s.code() {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                StatusCode::BAD_REQUEST
            }
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self {
            status,
            message: s.message().to_owned(),
            param: None,
        }
    }
}

fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 404 | 413 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        503 => "service_unavailable",
        _ => "server_error",
    }
}

fn error_body(status: StatusCode, message: &str, param: Option<&str>) -> serde_json::Value {
    serde_json::json!({
        "error": {
            "message": message,
            "type": error_type(status),
            "param": param,
            "code": serde_json::Value::Null,
        }
    })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(error_body(self.status, &self.message, self.param)),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// Largest SDP offer: a browser's is a few kB; a hundred candidates fit.
pub(crate) const MAX_SDP_BYTES: usize = 64 << 10;

/// The routes, served on their own listener.
pub(crate) fn router<B: Bus>(ingest: Ingest<B>) -> axum::Router {
    // The upload may be the audio limit plus the form's other fields.
    let upload_limit = upload_limit(&ingest);
    // Requests with bodies are authenticated, and their declared size checked,
    // before a byte of the body is read.
    let with_bodies = axum::Router::new()
        .route("/v1/audio/transcriptions", post(transcriptions::<B>))
        .route("/v1/audio/translations", post(translations::<B>))
        .layer(DefaultBodyLimit::max(upload_limit))
        .merge(
            axum::Router::new()
                .route("/v1/webrtc/sessions", post(crate::webrtc::offer::<B>))
                .layer(DefaultBodyLimit::max(MAX_SDP_BYTES)),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            ingest.clone(),
            guard_body::<B>,
        ));
    axum::Router::new()
        .route("/v1/models", get(list_models::<B>))
        .route("/v1/models/{id}", get(get_model::<B>))
        .route("/v1/realtime", get(crate::realtime::upgrade::<B>))
        .route("/", get(crate::webrtc::page))
        .route("/captions", get(crate::webrtc::page))
        .route(
            "/v1/webrtc/sessions/{id}",
            axum::routing::delete(crate::webrtc::end::<B>),
        )
        .route("/v1/rooms/{room}", get(crate::webrtc::room_info))
        .route("/v1/rooms/{room}/events", get(crate::webrtc::events::<B>))
        .route("/v1/rooms/{room}/captions.vtt", get(crate::webrtc::vtt))
        .route("/v1/rooms/{room}/captions.srt", get(crate::webrtc::srt))
        .merge(with_bodies)
        .with_state(ingest)
}

fn upload_limit<B: Bus>(ingest: &Ingest<B>) -> usize {
    usize::try_from(ingest.inner.limits.max_bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(1 << 20)
}

/// Refuses a request with a body before reading it: when keys are required, a
/// caller without a valid key (401); a declared length over the route's limit
/// (413, naming the limit). Bodies without a declared length are cut at the
/// same limit while they are read.
async fn guard_body<B: Bus>(
    State(ingest): State<Ingest<B>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let sdp = req.uri().path().starts_with("/v1/webrtc/");
    let limit = if sdp {
        MAX_SDP_BYTES
    } else {
        upload_limit(&ingest)
    };
    if ingest.inner.access.requires_keys() {
        let get = |k: &str| req.headers().get(k).and_then(|v| v.to_str().ok());
        if let Err(d) =
            ingest
                .inner
                .access
                .authenticate(get("authorization"), get("x-api-key"), None)
        {
            return ApiError::from(Status::from(d)).into_response();
        }
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared
        && len > limit as u64
    {
        let message = if sdp {
            format!("the SDP offer is {len} bytes; the limit is {limit} bytes")
        } else {
            format!(
                "the upload is {len} bytes, larger than this server's audio limit of {} MiB (a form of at most {limit} bytes); send a shorter or compressed file",
                ingest.inner.limits.max_bytes >> 20
            )
        };
        return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, message).into_response();
    }
    next.run(req).await
}

fn admit<B: Bus>(ingest: &Ingest<B>, headers: &HeaderMap) -> Result<Grant, ApiError> {
    let get = |k: &str| headers.get(k).and_then(|v| v.to_str().ok());
    ingest
        .inner
        .access
        .admit(get("authorization"), get("x-api-key"), get("x-tenant"))
        .map_err(|d| ApiError::from(Status::from(d)))
}

/// The fields of an upload form.
#[derive(Default)]
struct Form {
    file: Option<(String, Vec<u8>)>,
    model: Option<String>,
    language: Option<String>,
    prompt: Option<String>,
    response_format: Option<String>,
    temperature: Option<String>,
    granularities: Vec<String>,
    stream: Option<String>,
    target_language: Option<String>,
    diarize: Option<String>,
    min_speakers: Option<String>,
    max_speakers: Option<String>,
}

async fn read_form(mut mp: Multipart, limit: u64) -> Result<Form, ApiError> {
    let too_large = || ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!(
            "the upload is larger than this server's audio limit of {} MiB; send a shorter or compressed file",
            limit >> 20
        ),
        param: Some("file"),
    };
    let form_error = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::bad(
                format!("the request is not a readable multipart form: {e}"),
                "file",
            )
        }
    };
    let mut f = Form::default();
    while let Some(field) = mp.next_field().await.map_err(form_error)? {
        let name = field.name().unwrap_or_default().to_owned();
        if name == "file" {
            let filename = field.file_name().unwrap_or("audio").to_owned();
            let bytes = field.bytes().await.map_err(form_error)?;
            f.file = Some((filename, bytes.to_vec()));
            continue;
        }
        let value = field.text().await.map_err(form_error)?;
        match name.as_str() {
            "model" => f.model = Some(value),
            "language" => f.language = Some(value),
            "prompt" => f.prompt = Some(value),
            "response_format" => f.response_format = Some(value),
            "temperature" => f.temperature = Some(value),
            "timestamp_granularities[]" | "timestamp_granularities" => f.granularities.push(value),
            "stream" => f.stream = Some(value),
            "target_language" => f.target_language = Some(value),
            "diarize" => f.diarize = Some(value),
            "min_speakers" => f.min_speakers = Some(value),
            "max_speakers" => f.max_speakers = Some(value),
            other => tracing::debug!(field = other, "unused form field ignored"),
        }
    }
    Ok(f)
}

async fn transcriptions<B: Bus>(
    State(ingest): State<Ingest<B>>,
    headers: HeaderMap,
    mp: Multipart,
) -> Response {
    audio(ingest, headers, mp, Task::Transcribe)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn translations<B: Bus>(
    State(ingest): State<Ingest<B>>,
    headers: HeaderMap,
    mp: Multipart,
) -> Response {
    audio(ingest, headers, mp, Task::Translate)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn audio<B: Bus>(
    ingest: Ingest<B>,
    headers: HeaderMap,
    mp: Multipart,
    task: Task,
) -> Result<Response, ApiError> {
    if ingest.inner.shutdown.is_cancelled() {
        return Err(
            Status::unavailable("this ingest replica is draining; retry on another").into(),
        );
    }
    let grant = admit(&ingest, &headers)?;
    let form = read_form(mp, ingest.inner.limits.max_bytes).await?;
    let Some((_, bytes)) = form.file else {
        return Err(ApiError::bad(
            "the form has no `file` field; upload the audio file as `file`",
            "file",
        ));
    };
    let format = match form.response_format.as_deref().map(str::trim) {
        None | Some("") => Format::Json,
        Some(f) => f
            .parse::<Format>()
            .map_err(|e| ApiError::bad(format!("response_format {f:?}: {e}"), "response_format"))?,
    };
    let mut words = false;
    let mut segments = false;
    for g in &form.granularities {
        match g.as_str() {
            "word" => words = true,
            "segment" => segments = true,
            other => {
                return Err(ApiError::bad(
                    format!("timestamp_granularities {other:?} is unknown; use segment or word"),
                    "timestamp_granularities",
                ));
            }
        }
    }
    if !form.granularities.is_empty() && format != Format::VerboseJson {
        return Err(ApiError::bad(
            "timestamp_granularities needs response_format verbose_json",
            "timestamp_granularities",
        ));
    }
    if form.granularities.is_empty() {
        segments = true;
    }
    let temperature = match form.temperature.as_deref().map(str::trim) {
        None | Some("") => 0.0,
        Some(t) => match t.parse::<f32>() {
            Ok(v) if (0.0..=1.0).contains(&v) => v,
            _ => {
                return Err(ApiError::bad(
                    format!("temperature {t:?} must be a number from 0 to 1"),
                    "temperature",
                ));
            }
        },
    };
    let stream = match form.stream.as_deref().map(str::trim) {
        None | Some("" | "false" | "False" | "0") => false,
        Some("true" | "True" | "1") => true,
        Some(s) => {
            return Err(ApiError::bad(
                format!("stream {s:?} must be true or false"),
                "stream",
            ));
        }
    };
    // Who spoke when (extension fields): `diarize=true`, optionally with
    // `min_speakers` / `max_speakers`, which imply it.
    let count = |field: &'static str, v: Option<&str>| -> Result<u32, ApiError> {
        match v.map(str::trim) {
            None | Some("") => Ok(0),
            Some(n) => n
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=nexus_models::speaker::MAX_SPEAKERS as u32).contains(n))
                .ok_or_else(|| {
                    ApiError::bad(
                        format!(
                            "{field} {n:?} must be a whole number from 1 to {}",
                            nexus_models::speaker::MAX_SPEAKERS
                        ),
                        field,
                    )
                }),
        }
    };
    let min_speakers = count("min_speakers", form.min_speakers.as_deref())?;
    let max_speakers = count("max_speakers", form.max_speakers.as_deref())?;
    let diarize = match form.diarize.as_deref().map(str::trim) {
        None | Some("") => min_speakers > 0 || max_speakers > 0,
        Some("true" | "True" | "1") => true,
        Some("false" | "False" | "0") if min_speakers == 0 && max_speakers == 0 => false,
        Some("false" | "False" | "0") => {
            return Err(ApiError::bad(
                "min_speakers/max_speakers need diarize=true",
                "diarize",
            ));
        }
        Some(s) => {
            return Err(ApiError::bad(
                format!("diarize {s:?} must be true or false"),
                "diarize",
            ));
        }
    };
    if diarize && stream {
        return Err(ApiError::bad(
            "diarize needs the whole file before speakers are known; ask without stream=true",
            "stream",
        ));
    }
    let model = match form.model.as_deref().map(str::trim) {
        None | Some("") | Some(OPENAI_MODEL) => String::new(),
        Some(m) => m.to_owned(),
    };
    let target = form
        .target_language
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty());
    if task == Task::Transcribe && target.is_some() {
        return Err(ApiError::bad(
            "target_language belongs to /v1/audio/translations; transcriptions keep the spoken language",
            "target_language",
        ));
    }
    let target = target.unwrap_or_else(|| "en".to_owned());
    let mut rc = RecognitionConfig {
        model,
        language: form.language.unwrap_or_default().trim().to_owned(),
        task: task as i32,
        translation: (task == Task::Translate).then(|| TranslationConfig {
            target_language: target.clone(),
            model: String::new(),
        }),
        enable_word_time_offsets: words,
        speech_context: form.prompt.map(|prompt| SpeechContext {
            prompt,
            ..Default::default()
        }),
        decoding: Some(DecodingOptions {
            temperature,
            ..Default::default()
        }),
        diarization: diarize.then_some(SpeakerDiarizationConfig {
            enable: true,
            min_speakers,
            max_speakers,
        }),
        ..Default::default()
    };
    ingest.check_config(&mut rc).await?;
    let prepared = ingest.prepare_bytes(rc, bytes).await?;
    let target = (task == Task::Translate).then_some(target);

    if stream {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ptx, mut prx) = mpsc::unbounded_channel::<crate::recognize::Progress>();
        let runner = ingest.clone();
        tokio::spawn(async move {
            let _grant = grant;
            let tenant = _grant.tenant.clone();
            let run = runner.recognize_prepared(prepared, &tenant, Some(ptx));
            tokio::pin!(run);
            let mut text = String::new();
            let mut done = None;
            loop {
                tokio::select! {
                    r = &mut run, if done.is_none() => done = Some(r),
                    p = prx.recv() => match p {
                        Some(p) => {
                            for s in &p.segments {
                                let seg = crate::transcript::segment(0, s);
                                let piece = seg.display_text().trim().to_owned();
                                if piece.is_empty() {
                                    continue;
                                }
                                let delta = if text.is_empty() { piece } else { format!(" {piece}") };
                                text.push_str(&delta);
                                let ev = serde_json::json!({"type": "transcript.text.delta", "delta": delta});
                                if tx.send(ev).is_err() {
                                    return;
                                }
                            }
                        }
                        None => break,
                    },
                }
            }
            let ev = match done {
                Some(Ok(_)) => serde_json::json!({"type": "transcript.text.done", "text": text}),
                Some(Err(s)) => {
                    let e = ApiError::from(s);
                    error_body(e.status, &e.message, None)
                }
                None => return,
            };
            let _ = tx.send(ev);
        });
        let events = UnboundedReceiverStream::new(rx)
            .map(|v| Ok::<_, Infallible>(Event::default().data(v.to_string())));
        return Ok(Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response());
    }

    let resp = ingest
        .recognize_prepared(prepared, &grant.tenant, None)
        .await?;
    drop(grant);
    let t = transcript(&resp, task, target.as_deref());
    let body = render(&t, format, segments);
    Ok(([(header::CONTENT_TYPE, format.content_type())], body).into_response())
}

/// Renders `t`; verbose JSON leaves segments out when only words were asked for.
fn render(t: &nexus_transcript::Transcript, format: Format, segments: bool) -> String {
    if format == Format::VerboseJson && !segments {
        let mut v: serde_json::Value = serde_json::from_str(&t.render(format)).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.remove("segments");
        }
        return v.to_string();
    }
    t.render(format)
}

async fn list_models<B: Bus>(
    State(ingest): State<Ingest<B>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let _grant = admit(&ingest, &headers)?;
    let data: Vec<serde_json::Value> = ingest
        .model_list()
        .await
        .into_iter()
        .map(|m| model_object(&m.name))
        .chain(std::iter::once(model_object(OPENAI_MODEL)))
        .collect();
    Ok(Json(serde_json::json!({"object": "list", "data": data})).into_response())
}

async fn get_model<B: Bus>(
    State(ingest): State<Ingest<B>>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let _grant = admit(&ingest, &headers)?;
    let known = id == OPENAI_MODEL || ingest.model_list().await.iter().any(|m| m.name == id);
    if !known {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("model {id:?} is not served here; GET /v1/models lists them"),
            param: Some("model"),
        });
    }
    Ok(Json(model_object(&id)).into_response())
}

fn model_object(id: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "nexus"})
}
