//! The OpenAI Realtime transcription protocol: client events parsed into
//! what a live session does, a transcription session's settings and their
//! mapping onto a `StreamingRecognitionConfig`, and the session's responses
//! rendered as server events. Pure: no sockets, no bus.
//!
//! Extensions (fields standard clients ignore): `session.translation`
//! (`{"target_language": "de"}`), `include: ["item.input_audio_transcription.words"]`,
//! `turn_detection.max_utterance_ms` / `interim_interval_ms`, audio formats as
//! objects with any rate the fleet takes, binary frames as raw audio; on
//! server events `result_index`, `start_ms`, `end_ms`, `language`, `words`,
//! `translation`, and `text` / `stability` on deltas (whose `start_ms` /
//! `end_ms` are the interim window's, in the session's audio).

use std::collections::HashMap;

use base64::Engine;
use nexus_proto::speech::{
    AudioEncoding, AudioFormat, EndpointingConfig, RecognitionConfig, SpeechContext, SpeechEvent,
    StreamingRecognitionConfig, StreamingRecognizeResponse,
};
use serde_json::{Map, Value, json};

/// Names of OpenAI's transcription models; they select the fleet's default model.
const OPENAI_MODELS: &[&str] = &[
    "whisper-1",
    "gpt-4o-transcribe",
    "gpt-4o-mini-transcribe",
    "gpt-4o-transcribe-latest",
    "gpt-4o-mini-transcribe-latest",
];

/// What `include` may ask for.
pub(crate) const INCLUDE_WORDS: &str = "item.input_audio_transcription.words";

/// Longest prompt a session may set, in characters (as on gRPC).
pub(crate) const MAX_PROMPT_CHARS: usize = crate::bounds::MAX_PROMPT_CHARS;

/// A client event the session acts on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ClientEvent {
    /// `transcription_session.update`, or (`ga`) a GA `session.update` of a
    /// transcription session: the settings it leaves.
    Update { settings: Box<Settings>, ga: bool },
    /// `input_audio_buffer.append`, its audio decoded.
    Append(Vec<u8>),
    /// `input_audio_buffer.commit`.
    Commit,
    /// `input_audio_buffer.clear`.
    Clear,
}

/// An `error` event's contents.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ProtocolError {
    pub(crate) kind: &'static str,
    pub(crate) code: &'static str,
    pub(crate) message: String,
    pub(crate) param: Option<String>,
    /// The client event it answers, when that had an `event_id`.
    pub(crate) event_id: Option<String>,
}

impl ProtocolError {
    pub(crate) fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: "invalid_request_error",
            code,
            message: message.into(),
            param: None,
            event_id: None,
        }
    }

    fn param(mut self, p: impl Into<String>) -> Self {
        self.param = Some(p.into());
        self
    }

    /// The error for a status that ended or refused a session.
    pub(crate) fn of_status(s: &tonic::Status) -> Self {
        use tonic::Code;
        let (kind, code) = match s.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                ("invalid_request_error", "invalid_value")
            }
            Code::Unauthenticated => ("authentication_error", "invalid_api_key"),
            Code::PermissionDenied => ("permission_error", "permission_denied"),
            Code::ResourceExhausted => ("rate_limit_error", "rate_limit_exceeded"),
            Code::DeadlineExceeded => ("invalid_request_error", "session_expired"),
            Code::Unavailable => ("server_error", "service_unavailable"),
            Code::NotFound => ("invalid_request_error", "session_not_found"),
            _ => ("server_error", "server_error"),
        };
        Self {
            kind,
            code,
            message: s.message().to_owned(),
            param: None,
            event_id: None,
        }
    }
}

/// Turn detection: the fleet's endpointer, or none (the client commits).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Vad {
    /// Voice probability below which a frame is silence (0 keeps the fleet's default).
    pub(crate) threshold: Option<f32>,
    pub(crate) prefix_padding_ms: Option<u32>,
    pub(crate) silence_duration_ms: Option<u32>,
    pub(crate) max_utterance_ms: Option<u32>,
    pub(crate) interim_interval_ms: Option<u32>,
}

/// A transcription session's settings, as the client set them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Settings {
    /// The format as the client named it, echoed back.
    pub(crate) format_name: Value,
    pub(crate) format: AudioFormat,
    /// The model as the client named it, echoed back.
    pub(crate) model_name: String,
    /// The fleet's model it selects; empty: the default.
    pub(crate) model: String,
    pub(crate) language: String,
    pub(crate) prompt: String,
    pub(crate) turn: Option<Vad>,
    pub(crate) words: bool,
    pub(crate) target_language: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            format_name: json!("pcm16"),
            format: pcm16(24_000),
            model_name: "whisper-1".into(),
            model: String::new(),
            language: String::new(),
            prompt: String::new(),
            turn: Some(Vad {
                threshold: None,
                prefix_padding_ms: None,
                silence_duration_ms: None,
                max_utterance_ms: None,
                interim_interval_ms: None,
            }),
            words: false,
            target_language: None,
        }
    }
}

fn pcm16(rate: u32) -> AudioFormat {
    AudioFormat {
        encoding: AudioEncoding::LinearPcmS16le as i32,
        sample_rate_hz: rate,
        channels: 1,
    }
}

/// The fleet's model a client's model name selects: OpenAI's transcription
/// models mean the default, a served name means itself.
pub(crate) fn model_of(name: &str, served: &[String]) -> Result<String, String> {
    let name = name.trim();
    if name.is_empty() || OPENAI_MODELS.contains(&name) || name.starts_with("gpt-") {
        return Ok(String::new());
    }
    if served.iter().any(|m| m == name) {
        return Ok(name.to_owned());
    }
    Err(format!(
        "model {name:?} is not served here; use one of {served:?} (or whisper-1 for the default)"
    ))
}

fn str_field<'a>(v: &'a Value, path: &str) -> Result<&'a str, ProtocolError> {
    v.as_str().ok_or_else(|| {
        ProtocolError::invalid("invalid_type", format!("{path} must be a string")).param(path)
    })
}

fn u32_field(v: &Value, path: &str, max: u32) -> Result<u32, ProtocolError> {
    match v.as_u64() {
        Some(n) if n <= u64::from(max) => Ok(n as u32),
        _ => Err(ProtocolError::invalid(
            "invalid_value",
            format!("{path} is {v}; use a whole number from 0 to {max}"),
        )
        .param(path)),
    }
}

fn unknown(path: &str, key: &str, known: &[&str]) -> ProtocolError {
    ProtocolError::invalid(
        "unknown_parameter",
        format!("{path}.{key} is not a setting of this server; known: {known:?}"),
    )
    .param(format!("{path}.{key}"))
}

/// An audio format named the beta way (`"pcm16"`, `"g711_ulaw"`,
/// `"g711_alaw"`) or as an object (`{"type": "audio/pcm", "rate": 16000}`).
fn format_of(v: &Value, path: &str) -> Result<AudioFormat, ProtocolError> {
    let bad = |m: String| ProtocolError::invalid("invalid_value", m).param(path);
    if let Some(name) = v.as_str() {
        let enc = match name {
            "pcm16" => return Ok(pcm16(24_000)),
            "g711_ulaw" => AudioEncoding::G711Ulaw,
            "g711_alaw" => AudioEncoding::G711Alaw,
            other => {
                return Err(bad(format!(
                    "{path} {other:?} is not one this server takes; use pcm16 (24 kHz), g711_ulaw, g711_alaw, or an object such as {{\"type\": \"audio/pcm\", \"rate\": 16000}}"
                )));
            }
        };
        return Ok(AudioFormat {
            encoding: enc as i32,
            sample_rate_hz: 8_000,
            channels: 1,
        });
    }
    let Some(obj) = v.as_object() else {
        return Err(bad(format!("{path} must be a string or an object")));
    };
    const KNOWN: &[&str] = &["type", "rate", "channels"];
    if let Some(k) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(unknown(path, k, KNOWN));
    }
    let kind = str_field(
        obj.get("type").unwrap_or(&Value::Null),
        &format!("{path}.type"),
    )?;
    let (encoding, default_rate) = match kind {
        "audio/pcm" => (AudioEncoding::LinearPcmS16le, 24_000),
        "audio/pcm-f32" => (AudioEncoding::LinearPcmF32le, 24_000),
        "audio/pcmu" => (AudioEncoding::G711Ulaw, 8_000),
        "audio/pcma" => (AudioEncoding::G711Alaw, 8_000),
        "audio/ogg" => (AudioEncoding::OggOpus, 48_000),
        other => {
            return Err(bad(format!(
                "{path}.type {other:?} is unknown; use audio/pcm (16-bit), audio/pcm-f32, audio/pcmu, audio/pcma or audio/ogg (Opus)"
            )));
        }
    };
    let rate = match obj.get("rate") {
        None => default_rate,
        Some(r) => u32_field(r, &format!("{path}.rate"), 384_000)?,
    };
    let channels = match obj.get("channels") {
        None => 1,
        Some(c) => u32_field(c, &format!("{path}.channels"), 8)?,
    };
    Ok(AudioFormat {
        encoding: encoding as i32,
        sample_rate_hz: rate,
        channels,
    })
}

fn turn_of(v: &Value, path: &str) -> Result<Option<Vad>, ProtocolError> {
    if v.is_null() {
        return Ok(None);
    }
    let Some(obj) = v.as_object() else {
        return Err(ProtocolError::invalid(
            "invalid_type",
            format!("{path} must be an object or null"),
        )
        .param(path));
    };
    const KNOWN: &[&str] = &[
        "type",
        "threshold",
        "prefix_padding_ms",
        "silence_duration_ms",
        "max_utterance_ms",
        "interim_interval_ms",
    ];
    if let Some(k) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(unknown(path, k, KNOWN));
    }
    match obj
        .get("type")
        .map(|t| str_field(t, &format!("{path}.type")))
    {
        None | Some(Ok("server_vad")) => {}
        Some(Ok(other)) => {
            return Err(ProtocolError::invalid(
                "invalid_value",
                format!("{path}.type {other:?} is not served; use server_vad (the fleet's endpointer) or null to commit turns yourself"),
            )
            .param(format!("{path}.type")));
        }
        Some(Err(e)) => return Err(e),
    }
    let threshold = match obj.get("threshold") {
        None | Some(Value::Null) => None,
        Some(t) => match t.as_f64() {
            Some(x) if (0.0..=1.0).contains(&x) => Some(x as f32),
            _ => {
                return Err(ProtocolError::invalid(
                    "invalid_value",
                    format!("{path}.threshold is {t}; use a number from 0 to 1"),
                )
                .param(format!("{path}.threshold")));
            }
        },
    };
    let ms = |k: &str, max: u32| -> Result<Option<u32>, ProtocolError> {
        obj.get(k)
            .filter(|v| !v.is_null())
            .map(|v| u32_field(v, &format!("{path}.{k}"), max))
            .transpose()
    };
    Ok(Some(Vad {
        threshold,
        prefix_padding_ms: ms("prefix_padding_ms", 2_000)?,
        silence_duration_ms: ms("silence_duration_ms", 30_000)?,
        max_utterance_ms: ms("max_utterance_ms", 30_000)?,
        interim_interval_ms: ms("interim_interval_ms", 30_000)?,
    }))
}

impl Settings {
    /// These settings with a `transcription_session.update`'s `session` object
    /// applied (fields it leaves out keep their values).
    pub(crate) fn updated(
        &self,
        session: &Map<String, Value>,
        served: &[String],
    ) -> Result<Self, ProtocolError> {
        const KNOWN: &[&str] = &[
            "input_audio_format",
            "input_audio_transcription",
            "turn_detection",
            "input_audio_noise_reduction",
            "include",
            "translation",
        ];
        let mut s = self.clone();
        for (k, v) in session {
            match k.as_str() {
                "input_audio_format" => {
                    s.format = format_of(v, "session.input_audio_format")?;
                    s.format_name = v.clone();
                }
                "input_audio_transcription" => {
                    if v.is_null() {
                        return Err(ProtocolError::invalid(
                            "invalid_value",
                            "session.input_audio_transcription cannot be null in a transcription session",
                        )
                        .param("session.input_audio_transcription"));
                    }
                    let Some(t) = v.as_object() else {
                        return Err(ProtocolError::invalid(
                            "invalid_type",
                            "session.input_audio_transcription must be an object",
                        )
                        .param("session.input_audio_transcription"));
                    };
                    const T: &[&str] = &["model", "language", "prompt"];
                    if let Some(k) = t.keys().find(|k| !T.contains(&k.as_str())) {
                        return Err(unknown("session.input_audio_transcription", k, T));
                    }
                    if let Some(m) = t.get("model").filter(|m| !m.is_null()) {
                        let path = "session.input_audio_transcription.model";
                        let name = str_field(m, path)?;
                        s.model = model_of(name, served)
                            .map_err(|e| ProtocolError::invalid("invalid_value", e).param(path))?;
                        s.model_name = name.to_owned();
                    }
                    if let Some(l) = t.get("language").filter(|l| !l.is_null()) {
                        s.language =
                            str_field(l, "session.input_audio_transcription.language")?.to_owned();
                    }
                    if let Some(p) = t.get("prompt").filter(|p| !p.is_null()) {
                        let path = "session.input_audio_transcription.prompt";
                        let prompt = str_field(p, path)?;
                        let n = prompt.chars().count();
                        if n > MAX_PROMPT_CHARS {
                            return Err(ProtocolError::invalid(
                                "invalid_value",
                                format!(
                                    "{path} is {n} characters; the limit is {MAX_PROMPT_CHARS}"
                                ),
                            )
                            .param(path));
                        }
                        s.prompt = prompt.to_owned();
                    }
                }
                "turn_detection" => s.turn = turn_of(v, "session.turn_detection")?,
                "input_audio_noise_reduction" => {
                    if !v.is_null() {
                        return Err(ProtocolError::invalid(
                            "invalid_value",
                            "session.input_audio_noise_reduction is not offered; leave it null (audio is transcribed as sent)",
                        )
                        .param("session.input_audio_noise_reduction"));
                    }
                }
                "include" => {
                    let Some(items) = v.as_array() else {
                        return Err(ProtocolError::invalid(
                            "invalid_type",
                            "session.include must be a list",
                        )
                        .param("session.include"));
                    };
                    s.words = false;
                    for i in items {
                        match i.as_str() {
                            Some(INCLUDE_WORDS) => s.words = true,
                            other => {
                                return Err(ProtocolError::invalid(
                                    "invalid_value",
                                    format!("session.include {other:?} is not offered; this server can include {INCLUDE_WORDS:?}"),
                                )
                                .param("session.include"));
                            }
                        }
                    }
                }
                "translation" => {
                    s.target_language = match v {
                        Value::Null => None,
                        Value::Object(t) => {
                            const T: &[&str] = &["target_language"];
                            if let Some(k) = t.keys().find(|k| !T.contains(&k.as_str())) {
                                return Err(unknown("session.translation", k, T));
                            }
                            let path = "session.translation.target_language";
                            let lang =
                                str_field(t.get("target_language").unwrap_or(&Value::Null), path)?;
                            Some(lang.to_owned()).filter(|l| !l.is_empty())
                        }
                        _ => {
                            return Err(ProtocolError::invalid(
                                "invalid_type",
                                "session.translation must be an object or null",
                            )
                            .param("session.translation"));
                        }
                    }
                }
                other => return Err(unknown("session", other, KNOWN)),
            }
        }
        Ok(s)
    }

    /// The live session these settings describe.
    pub(crate) fn streaming(&self) -> StreamingRecognitionConfig {
        let endpointing = match &self.turn {
            None => EndpointingConfig {
                manual: true,
                ..Default::default()
            },
            Some(v) => EndpointingConfig {
                stop_threshold: v.threshold.unwrap_or(0.0),
                pre_roll_ms: v.prefix_padding_ms.unwrap_or(0),
                stop_history_ms: v.silence_duration_ms.unwrap_or(0),
                max_utterance_ms: v.max_utterance_ms.unwrap_or(0),
                interim_interval_ms: v.interim_interval_ms.unwrap_or(0),
                ..Default::default()
            },
        };
        StreamingRecognitionConfig {
            config: Some(
                RecognitionConfig {
                    model: self.model.clone(),
                    language: self.language.clone(),
                    audio_format: Some(self.format),
                    enable_word_time_offsets: self.words,
                    speech_context: (!self.prompt.is_empty()).then(|| SpeechContext {
                        prompt: self.prompt.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }
                .translated_into(self.target_language.as_deref()),
            ),
            interim_results: true,
            endpointing: Some(endpointing),
            ..Default::default()
        }
    }

    /// The session object of `transcription_session.created/updated`.
    pub(crate) fn to_json(&self, id: &str) -> Value {
        let turn = self.turn.as_ref().map(|v| {
            json!({
                "type": "server_vad",
                "threshold": v.threshold.unwrap_or(0.5),
                "prefix_padding_ms": v.prefix_padding_ms.unwrap_or(320),
                "silence_duration_ms": v.silence_duration_ms.unwrap_or(800),
                "max_utterance_ms": v.max_utterance_ms.unwrap_or(30_000),
                "interim_interval_ms": v.interim_interval_ms.unwrap_or(1_000),
            })
        });
        let mut include = Vec::new();
        if self.words {
            include.push(INCLUDE_WORDS);
        }
        json!({
            "id": id,
            "object": "realtime.transcription_session",
            "input_audio_format": self.format_name,
            "input_audio_transcription": {
                "model": self.model_name,
                "language": self.language,
                "prompt": self.prompt,
            },
            "turn_detection": turn,
            "input_audio_noise_reduction": null,
            "include": include,
            "translation": self.target_language.as_ref().map(|t| json!({"target_language": t})),
        })
    }
}

/// Parses one text frame. `served` are the fleet's models.
pub(crate) fn parse(
    text: &str,
    current: &Settings,
    served: &[String],
) -> Result<ClientEvent, ProtocolError> {
    let v: Value = serde_json::from_str(text).map_err(|e| {
        ProtocolError::invalid("invalid_json", format!("the event is not valid JSON: {e}"))
    })?;
    let Some(obj) = v.as_object() else {
        return Err(ProtocolError::invalid(
            "invalid_json",
            "an event must be a JSON object with a type",
        ));
    };
    let event_id = obj
        .get("event_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let with_id = |mut e: ProtocolError| {
        e.event_id.clone_from(&event_id);
        e
    };
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or_default();
    let known = |keys: &[&str]| -> Result<(), ProtocolError> {
        match obj
            .keys()
            .find(|k| !["type", "event_id"].contains(&k.as_str()) && !keys.contains(&k.as_str()))
        {
            Some(k) => Err(with_id(unknown(kind, k, keys))),
            None => Ok(()),
        }
    };
    match kind {
        "transcription_session.update" | "session.update" => {
            known(&["session"])?;
            let Some(session) = obj.get("session").and_then(Value::as_object) else {
                return Err(with_id(
                    ProtocolError::invalid("missing_required_parameter", "session is required")
                        .param("session"),
                ));
            };
            let ga = kind == "session.update";
            let settings = if ga {
                ga_update(session, current, served)
            } else {
                current.updated(session, served)
            };
            settings
                .map(|s| ClientEvent::Update {
                    settings: Box::new(s),
                    ga,
                })
                .map_err(with_id)
        }
        "input_audio_buffer.append" => {
            known(&["audio"])?;
            let audio = obj.get("audio").and_then(Value::as_str).ok_or_else(|| {
                with_id(
                    ProtocolError::invalid(
                        "missing_required_parameter",
                        "audio is required: base64 of the audio bytes",
                    )
                    .param("audio"),
                )
            })?;
            base64::engine::general_purpose::STANDARD
                .decode(audio)
                .map(ClientEvent::Append)
                .map_err(|e| {
                    with_id(
                        ProtocolError::invalid("invalid_value", format!("audio is not base64: {e}"))
                            .param("audio"),
                    )
                })
        }
        "input_audio_buffer.commit" => known(&[]).map(|()| ClientEvent::Commit),
        "input_audio_buffer.clear" => known(&[]).map(|()| ClientEvent::Clear),
        "" => Err(with_id(
            ProtocolError::invalid("missing_required_parameter", "the event has no type")
                .param("type"),
        )),
        other => Err(with_id(
            ProtocolError::invalid(
                "unknown_event_type",
                format!("event type {other:?} is not served here; a transcription session takes transcription_session.update, input_audio_buffer.append, input_audio_buffer.commit and input_audio_buffer.clear"),
            )
            .param("type"),
        )),
    }
}

/// A GA-protocol `session.update` of a transcription session
/// (`{"type": "transcription", "audio": {"input": {...}}, "include": [...]}`),
/// mapped onto the same settings.
fn ga_update(
    session: &Map<String, Value>,
    current: &Settings,
    served: &[String],
) -> Result<Settings, ProtocolError> {
    let mut flat = Map::new();
    for (k, v) in session {
        match k.as_str() {
            "type" => {
                if v.as_str() != Some("transcription") {
                    return Err(ProtocolError::invalid(
                        "invalid_value",
                        format!(
                            "session.type is {v}; this server serves transcription sessions only"
                        ),
                    )
                    .param("session.type"));
                }
            }
            "include" | "translation" => {
                flat.insert(k.clone(), v.clone());
            }
            "audio" => {
                let input = v.get("input").and_then(Value::as_object);
                let extra = v
                    .as_object()
                    .and_then(|a| a.keys().find(|k| *k != "input").cloned());
                if let Some(k) = extra {
                    return Err(unknown("session.audio", &k, &["input"]));
                }
                for (ik, iv) in input.into_iter().flatten() {
                    let to = match ik.as_str() {
                        "format" => "input_audio_format",
                        "transcription" => "input_audio_transcription",
                        "turn_detection" => "turn_detection",
                        "noise_reduction" => "input_audio_noise_reduction",
                        other => {
                            return Err(unknown(
                                "session.audio.input",
                                other,
                                &[
                                    "format",
                                    "transcription",
                                    "turn_detection",
                                    "noise_reduction",
                                ],
                            ));
                        }
                    };
                    flat.insert(to.to_owned(), iv.clone());
                }
            }
            other => {
                return Err(unknown(
                    "session",
                    other,
                    &["type", "audio", "include", "translation"],
                ));
            }
        }
    }
    current.updated(&flat, served)
}

/// Renders a session's responses as server events; one per connection.
#[derive(Debug)]
pub(crate) struct Render {
    /// Turn detection is off: no speech_started/stopped events.
    pub(crate) manual: bool,
    next_event: u64,
    last_item: Option<String>,
    /// Text already sent as deltas, per utterance.
    sent: HashMap<u64, String>,
}

/// The item id of an utterance.
pub(crate) fn item_id(segment: u64) -> String {
    format!("item_{segment:06}")
}

impl Render {
    pub(crate) fn new(manual: bool) -> Self {
        Self {
            manual,
            next_event: 0,
            last_item: None,
            sent: HashMap::new(),
        }
    }

    /// A server event of `kind` with `fields`.
    pub(crate) fn event(&mut self, kind: &str, fields: Value) -> Value {
        self.next_event += 1;
        let mut v = json!({"type": kind, "event_id": format!("event_{:06}", self.next_event)});
        if let (Some(o), Value::Object(f)) = (v.as_object_mut(), fields) {
            o.extend(f);
        }
        v
    }

    pub(crate) fn error(&mut self, e: &ProtocolError) -> Value {
        self.event(
            "error",
            json!({"error": {
                "type": e.kind,
                "code": e.code,
                "message": e.message,
                "param": e.param,
                "event_id": e.event_id,
            }}),
        )
    }

    /// The events of one response; `ended` is set when the session ended.
    pub(crate) fn response(&mut self, r: &StreamingRecognizeResponse) -> (Vec<Value>, bool) {
        let mut out = Vec::new();
        let seg = r.speech_event_segment_id;
        match SpeechEvent::try_from(r.speech_event).unwrap_or(SpeechEvent::Unspecified) {
            SpeechEvent::SpeechStarted if !self.manual => out.push(self.event(
                "input_audio_buffer.speech_started",
                json!({"audio_start_ms": r.speech_event_ms, "item_id": item_id(seg)}),
            )),
            SpeechEvent::EndOfUtterance => {
                let item = item_id(seg);
                if !self.manual {
                    out.push(self.event(
                        "input_audio_buffer.speech_stopped",
                        json!({"audio_end_ms": r.speech_event_ms, "item_id": item}),
                    ));
                }
                let previous = self.last_item.replace(item.clone());
                out.push(self.event(
                    "input_audio_buffer.committed",
                    json!({"previous_item_id": previous, "item_id": item}),
                ));
                out.push(self.event(
                    "conversation.item.created",
                    json!({"previous_item_id": previous, "item": {
                        "id": item, "object": "realtime.item", "type": "message",
                        "status": "completed", "role": "user",
                        "content": [{"type": "input_audio", "transcript": null}],
                    }}),
                ));
            }
            SpeechEvent::AudioCleared => {
                self.sent.remove(&seg);
                out.push(self.event("input_audio_buffer.cleared", json!({})));
            }
            SpeechEvent::NothingToCommit => out.push(self.error(&ProtocolError::invalid(
                "input_audio_buffer_commit_empty",
                "nothing to commit: no speech is in progress (the turn detector already committed it, or no audio was appended since the last commit)",
            ))),
            SpeechEvent::EndOfSession => return (out, true),
            _ => {}
        }
        for res in &r.results {
            let Some(alt) = res.alternatives.first() else {
                continue;
            };
            let item = item_id(res.segment_id);
            let span = res.span.unwrap_or_default();
            if res.is_final {
                self.sent.remove(&res.segment_id);
                let mut fields = json!({
                    "item_id": item,
                    "content_index": 0,
                    "transcript": alt.transcript.trim(),
                    "result_index": res.result_index,
                    "start_ms": span.start_ms,
                    "end_ms": span.end_ms,
                    "language": res.language,
                });
                if !alt.words.is_empty() {
                    fields["words"] = alt
                        .words
                        .iter()
                        .map(|w| json!({"word": w.word, "start_ms": w.start_ms, "end_ms": w.end_ms, "probability": w.confidence}))
                        .collect();
                }
                if let Some(t) = &res.translation {
                    fields["translation"] = json!({"language": t.target_language, "text": t.text});
                    if !t.failure.is_empty() {
                        fields["translation"]["failure"] = t.failure.clone().into();
                    }
                }
                out.push(self.event(
                    "conversation.item.input_audio_transcription.completed",
                    fields,
                ));
            } else {
                // Deltas carry the words local agreement committed: they only
                // grow, so a client that concatenates them never shows text
                // it must take back; a hypothesis that commits no new word
                // sends none. `text` is the whole current hypothesis.
                let words: Vec<&str> = alt.transcript.split_whitespace().collect();
                let stable =
                    ((res.stability * words.len() as f32).round() as usize).min(words.len());
                let committed = words[..stable].join(" ");
                let sent = self.sent.entry(res.segment_id).or_default();
                let delta = committed
                    .strip_prefix(sent.as_str())
                    .unwrap_or_default()
                    .to_owned();
                if delta.is_empty() {
                    continue;
                }
                sent.push_str(&delta);
                out.push(self.event(
                    "conversation.item.input_audio_transcription.delta",
                    json!({
                        "item_id": item,
                        "content_index": 0,
                        "delta": delta,
                        "text": alt.transcript.trim(),
                        "stability": res.stability,
                        "result_index": res.result_index,
                        "start_ms": span.start_ms,
                        "end_ms": span.end_ms,
                    }),
                ));
            }
        }
        (out, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_proto::speech::{SpeechRecognitionAlternative, StreamingRecognitionResult, Task};

    fn served() -> Vec<String> {
        vec!["tiny.en".into(), "base".into()]
    }

    fn update(session: Value) -> Result<Settings, ProtocolError> {
        let ev =
            json!({"type": "transcription_session.update", "event_id": "c1", "session": session});
        match parse(&ev.to_string(), &Settings::default(), &served())? {
            ClientEvent::Update { settings, ga } => {
                assert!(!ga);
                Ok(*settings)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn beta_and_ga_updates_map_onto_one_streaming_config() {
        let s = update(json!({
            "input_audio_format": "g711_ulaw",
            "input_audio_transcription": {"model": "base", "language": "de", "prompt": "Nexus"},
            "turn_detection": {"type": "server_vad", "threshold": 0.6, "prefix_padding_ms": 200, "silence_duration_ms": 500},
            "include": [INCLUDE_WORDS],
            "translation": {"target_language": "en"},
        }))
        .unwrap();
        let cfg = s.streaming();
        let rc = cfg.config.as_ref().unwrap();
        assert_eq!(rc.model, "base");
        assert_eq!(rc.language, "de");
        assert_eq!(
            rc.audio_format.unwrap().encoding,
            AudioEncoding::G711Ulaw as i32
        );
        assert_eq!(rc.audio_format.unwrap().sample_rate_hz, 8_000);
        assert!(rc.enable_word_time_offsets);
        assert_eq!(rc.task, Task::Translate as i32);
        assert_eq!(rc.speech_context.as_ref().unwrap().prompt, "Nexus");
        let e = cfg.endpointing.unwrap();
        assert_eq!(
            (e.stop_threshold, e.pre_roll_ms, e.stop_history_ms),
            (0.6, 200, 500)
        );
        assert!(!e.manual);

        let ga = json!({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 16000},
            "transcription": {"model": "gpt-4o-transcribe"},
            "turn_detection": null,
        }}}});
        let ClientEvent::Update { settings, ga } =
            parse(&ga.to_string(), &Settings::default(), &served()).unwrap()
        else {
            panic!()
        };
        assert!(ga);
        let cfg = settings.streaming();
        assert!(cfg.endpointing.unwrap().manual);
        let rc = cfg.config.unwrap();
        assert_eq!(rc.model, "", "OpenAI's names select the default model");
        assert_eq!(rc.audio_format.unwrap().sample_rate_hz, 16_000);
    }

    #[test]
    fn bad_events_name_the_field_and_keep_the_client_event_id() {
        let e = update(json!({"input_audio_format": "pcm8"})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("session.input_audio_format"));
        assert_eq!(e.event_id.as_deref(), Some("c1"));
        let e = update(json!({"turn_detection": {"type": "semantic_vad"}})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("session.turn_detection.type"));
        let e = update(json!({"turn_detection": {"silence_duration_ms": 99_999}})).unwrap_err();
        assert!(e.message.contains("30000"), "{e:?}");
        let e = update(json!({"input_audio_transcription": {"model": "large-v9"}})).unwrap_err();
        assert!(e.message.contains("tiny.en"), "{e:?}");
        let long = "x".repeat(MAX_PROMPT_CHARS + 1);
        let e = update(json!({"input_audio_transcription": {"prompt": long}})).unwrap_err();
        assert!(e.message.contains("2000"), "{e:?}");
        let e =
            update(json!({"include": ["item.input_audio_transcription.logprobs"]})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("session.include"));
        let e = parse("[1]", &Settings::default(), &served()).unwrap_err();
        assert_eq!(e.code, "invalid_json");
        let e = parse(
            r#"{"type": "input_audio_buffer.append", "audio": "AAAA", "x": 1}"#,
            &Settings::default(),
            &served(),
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input_audio_buffer.append.x"));
        assert_eq!(
            parse(
                r#"{"type": "input_audio_buffer.append", "audio": "AAE="}"#,
                &Settings::default(),
                &served()
            )
            .unwrap(),
            ClientEvent::Append(vec![0, 1])
        );
    }

    fn interim(text: &str, stability: f32) -> StreamingRecognizeResponse {
        StreamingRecognizeResponse {
            results: vec![StreamingRecognitionResult {
                alternatives: vec![SpeechRecognitionAlternative {
                    transcript: text.into(),
                    ..Default::default()
                }],
                stability,
                segment_id: 3,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn deltas_carry_only_newly_committed_words() {
        let mut r = Render::new(false);
        let (ev, _) = r.response(&interim("hello there wor", 0.0));
        assert!(ev.is_empty(), "nothing committed yet: {ev:?}");
        let (ev, _) = r.response(&interim("hello there world how", 0.5));
        assert_eq!(ev[0]["delta"], "hello there");
        assert_eq!(ev[0]["item_id"], "item_000003");
        let (ev, _) = r.response(&interim("hello there world how are", 0.8));
        assert_eq!(ev[0]["delta"], " world how");
        assert_eq!(ev[0]["text"], "hello there world how are");
        let mut done = interim("Hello there, world.", 1.0);
        done.results[0].is_final = true;
        let (ev, ended) = r.response(&done);
        assert!(!ended);
        assert_eq!(
            ev[0]["type"],
            "conversation.item.input_audio_transcription.completed"
        );
        assert_eq!(ev[0]["transcript"], "Hello there, world.");
        let end = StreamingRecognizeResponse {
            speech_event: SpeechEvent::EndOfSession as i32,
            ..Default::default()
        };
        assert!(r.response(&end).1);
    }
}
