//! One simulated live client: speech sent at real-time pace (100 ms chunks,
//! each once its last sample "was captured"), results timed as they arrive,
//! over a gRPC stream or a Realtime WebSocket session (base64 appends, as
//! standard clients send them).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use nexus_proto::speech::speech_recognition_client::SpeechRecognitionClient;
use nexus_proto::speech::streaming_recognize_request::StreamingRequest;
use nexus_proto::speech::{
    AudioEncoding, AudioFormat, DecodingOptions, EndpointingConfig, RecognitionConfig,
    RecognizeRequest, SpeakerDiarizationConfig, SpeechEvent, StreamingRecognitionConfig,
    StreamingRecognizeRequest, recognize_request,
};
use tokio::time::Instant;

/// A clip of speech and what is said in it.
#[derive(Debug, Clone)]
pub struct Clip {
    /// 16 kHz mono samples.
    pub samples: Vec<f32>,
    /// The reference transcript.
    pub text: String,
}

/// What one session sends.
#[derive(Debug, Clone)]
pub struct Program {
    /// Samples, clips with a second of silence after each.
    pub samples: Vec<f32>,
    /// The references of the clips played, in order.
    pub reference: String,
}

impl Program {
    /// Whole clips from clip `rotate` on, until `seconds` are filled (one at least).
    pub fn new(clips: &[Clip], rotate: usize, seconds: f64) -> Self {
        let gap = vec![0.0f32; 16_000];
        let mut samples = Vec::new();
        let mut reference = Vec::new();
        let mut i = rotate;
        // At least one clip.
        while samples.is_empty() || (samples.len() as f64) < seconds * 16_000.0 {
            let c = &clips[i % clips.len()];
            samples.extend_from_slice(&c.samples);
            samples.extend_from_slice(&gap);
            reference.push(c.text.clone());
            i += 1;
        }
        Self {
            samples,
            reference: reference.join(" "),
        }
    }
}

/// What a session asks the fleet for, on either protocol.
#[derive(Debug, Clone)]
pub struct Ask {
    /// Model name.
    pub model: String,
    /// Spoken language.
    pub language: String,
    /// Interim results every this many ms; 0 asks for finals only.
    pub interim_ms: u32,
    /// Translate every final into this language.
    pub translate_to: Option<String>,
    /// Label every final's words with their speaker (gRPC only).
    pub diarize: bool,
    /// Beam width of the decoding (gRPC only).
    pub beam_size: Option<u32>,
}

/// What one session measured.
#[derive(Debug, Default)]
pub struct Outcome {
    /// From the END_OF_UTTERANCE event to the utterance's final, ms.
    pub final_ms: Vec<f64>,
    /// From the capture of an utterance's last sample to its final, ms: the
    /// same clock on every protocol (it includes the endpointer's silence).
    pub final_after_audio_ms: Vec<f64>,
    /// From the capture of an interim window's last sample to the interim, ms.
    pub interim_ms: Vec<f64>,
    /// Final text, in order.
    pub hypothesis: String,
    /// The reference of what was played.
    pub reference: String,
    /// Seconds of audio sent.
    pub audio_s: f64,
    /// Finals that asked for a translation and came without one.
    pub untranslated: usize,
    /// The gRPC code the session failed with, if it did.
    pub error: Option<String>,
}

/// How a session reaches the fleet.
#[derive(Debug, Clone, Copy)]
pub enum Endpoint {
    /// StreamingRecognize on the gRPC address.
    Grpc(SocketAddr),
    /// `/v1/realtime?intent=transcription` on the HTTP address.
    WebSocket(SocketAddr),
    /// A WhisperLive server's WebSocket (the live anchor).
    WhisperLive(SocketAddr),
}

/// Runs one session against `to`, starting after `lead`.
pub async fn run(to: Endpoint, ask: Ask, program: Program, lead: Duration) -> Outcome {
    tokio::time::sleep(lead).await;
    let mut out = Outcome {
        reference: program.reference.clone(),
        audio_s: program.samples.len() as f64 / 16_000.0,
        ..Default::default()
    };
    match to {
        Endpoint::Grpc(addr) => {
            if let Err(s) = stream(addr, &ask, program.samples, &mut out).await {
                out.error = Some(format!("{:?}", s.code()));
            }
        }
        Endpoint::WebSocket(_) if ask.diarize => {
            out.error = Some("the Realtime protocol takes no diarization".into());
        }
        Endpoint::WebSocket(_) | Endpoint::WhisperLive(_) if ask.beam_size.is_some() => {
            out.error = Some("a beam size is asked over gRPC only".into());
        }
        Endpoint::WebSocket(addr) => {
            if let Err(e) = websocket(addr, &ask, program.samples, &mut out).await {
                out.error = Some(e);
            }
        }
        Endpoint::WhisperLive(_) if ask.diarize || ask.translate_to.is_some() => {
            out.error = Some("the WhisperLive anchor is run untranslated, undiarized".into());
        }
        Endpoint::WhisperLive(addr) => {
            if let Err(e) = whisperlive(addr, &ask, program.samples, &mut out).await {
                out.error = Some(e);
            }
        }
    }
    out
}

/// The longest silence a WhisperLive session sends after its audio while
/// its last segment is still open, seconds.
const WHISPERLIVE_TAIL_S: usize = 5;

/// A WhisperLive session, the way its own client speaks: JSON options,
/// `SERVER_READY`, float32 16 kHz frames, `END_OF_AUDIO`. WhisperLive has no
/// endpoint event: it marks a segment `completed` once the text after it
/// has begun or its words stop changing, so its final latency runs from the
/// capture of the segment's end to the first message with it completed
/// (`final_after_audio_ms`, the same clock as the other protocols'), and
/// its interim latency from the capture of an open segment's end to the
/// message that brings it. After the audio, silence follows at real-time
/// pace until the last segment is completed (at most
/// [`WHISPERLIVE_TAIL_S`]); the transcript is the completed segments plus
/// any still open at the end, as WhisperLive's client prints it.
async fn whisperlive(
    addr: SocketAddr,
    ask: &Ask,
    samples: Vec<f32>,
    out: &mut Outcome,
) -> Result<(), String> {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let (ws, _) = tokio_tungstenite::connect_async_with_config(format!("ws://{addr}"), None, true)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sink, mut stream) = ws.split();
    let options = serde_json::json!({
        "uid": uuid::Uuid::new_v4().to_string(),
        "language": ask.language,
        "task": "transcribe",
        "model": ask.model,
        "use_vad": true,
        "send_last_n_segments": 10,
        "no_speech_thresh": 0.45,
        "clip_audio": false,
        "same_output_threshold": 10,
    });
    // As on the other protocols, the clock starts as the options go out.
    let start = Instant::now();
    sink.send(Message::Text(options.to_string().into()))
        .await
        .map_err(|e| format!("send: {e}"))?;
    loop {
        let m = stream
            .next()
            .await
            .ok_or("closed before SERVER_READY")?
            .map_err(|e| format!("read: {e}"))?;
        let Message::Text(t) = m else { continue };
        let v: serde_json::Value = serde_json::from_str(t.as_str()).map_err(|e| e.to_string())?;
        if v["message"] == "SERVER_READY" {
            break;
        }
        if let Some(status) = v["status"].as_str() {
            return Err(format!("{status}: {}", v["message"]));
        }
    }
    let (open_tx, open_rx) = tokio::sync::watch::channel(true);
    let sender = async move {
        let frame = |c: &[f32]| -> Vec<u8> { c.iter().flat_map(|s| s.to_le_bytes()).collect() };
        let n = samples.len().div_ceil(1_600);
        let silence = [0.0f32; 1_600];
        for i in 0..n + WHISPERLIVE_TAIL_S * 10 {
            if i >= n && !*open_rx.borrow() {
                break;
            }
            let c = if i < n {
                &samples[i * 1_600..((i + 1) * 1_600).min(samples.len())]
            } else {
                &silence[..]
            };
            tokio::time::sleep_until(start + Duration::from_millis(100 * (i as u64 + 1))).await;
            if sink.send(Message::Binary(frame(c).into())).await.is_err() {
                return sink;
            }
        }
        let _ = sink
            .send(Message::Binary(b"END_OF_AUDIO".to_vec().into()))
            .await;
        // The server closes the socket once it has cleaned up.
        sink
    };
    let receiver = async {
        // Completed segments by their start, and the open one.
        let mut completed: std::collections::BTreeMap<u64, String> = Default::default();
        let mut open: Option<(u64, String)> = None;
        let mut seen_open_ends: std::collections::HashSet<u64> = Default::default();
        let ms = |v: &serde_json::Value| -> Option<u64> {
            let s: f64 = v.as_str()?.parse().ok()?;
            Some((s * 1e3).round() as u64)
        };
        loop {
            let m = tokio::time::timeout(Duration::from_secs(60), stream.next())
                .await
                .map_err(|_| "no message for 60 s".to_owned())?;
            let text = match m {
                Some(Ok(Message::Text(t))) => t,
                None | Some(Ok(Message::Close(_)) | Err(_)) => break,
                Some(Ok(_)) => continue,
            };
            let now = Instant::now();
            let v: serde_json::Value =
                serde_json::from_str(text.as_str()).map_err(|e| e.to_string())?;
            if v["message"] == "DISCONNECT" {
                break;
            }
            let Some(segs) = v["segments"].as_array() else {
                continue;
            };
            let mut last_open = None;
            for seg in segs {
                let (Some(s0), Some(s1)) = (ms(&seg["start"]), ms(&seg["end"])) else {
                    continue;
                };
                let t = seg["text"].as_str().unwrap_or_default().trim().to_owned();
                if seg["completed"].as_bool().unwrap_or(false) {
                    if let std::collections::btree_map::Entry::Vacant(e) = completed.entry(s0) {
                        let captured = start + Duration::from_millis(s1);
                        out.final_after_audio_ms
                            .push(now.saturating_duration_since(captured).as_secs_f64() * 1e3);
                        e.insert(t);
                    }
                } else {
                    if seen_open_ends.insert(s1) {
                        let captured = start + Duration::from_millis(s1);
                        out.interim_ms
                            .push(now.saturating_duration_since(captured).as_secs_f64() * 1e3);
                    }
                    last_open = Some((s0, t));
                }
            }
            let _ = open_tx.send(last_open.is_some());
            open = last_open;
        }
        // WhisperLive has no endpoint: its finals are timed from the audio.
        out.final_ms = out.final_after_audio_ms.clone();
        let last_done = completed.keys().next_back().copied();
        let mut words: Vec<String> = completed.into_values().collect();
        if let Some((s0, t)) = open
            && last_done.is_none_or(|d| s0 > d)
        {
            words.push(t);
        }
        out.hypothesis = words.join(" ");
        Ok::<_, String>(())
    };
    let (sink, r) = tokio::join!(sender, receiver);
    drop(sink);
    r
}

/// The format both gRPC clients send: 16 kHz mono 16-bit PCM.
fn pcm16_format() -> AudioFormat {
    AudioFormat {
        encoding: AudioEncoding::LinearPcmS16le as i32,
        sample_rate_hz: 16_000,
        channels: 1,
    }
}

fn pcm16(c: &[f32]) -> Vec<u8> {
    c.iter()
        .flat_map(|s| ((s.clamp(-1.0, 1.0) * 32767.0) as i16).to_le_bytes())
        .collect()
}

/// A Realtime transcription session: the same audio and timing as the gRPC
/// stream. Final latency runs from `speech_stopped` to the item's
/// `completed`; interim latency from the delta window's end (`end_ms`).
async fn websocket(
    addr: SocketAddr,
    ask: &Ask,
    samples: Vec<f32>,
    out: &mut Outcome,
) -> Result<(), String> {
    use base64::Engine;
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let url = format!(
        "ws://{addr}/v1/realtime?intent=transcription&model={}",
        ask.model
    );
    // Without Nagle, as a real-time client (and Python's asyncio) sends.
    let (ws, _) = tokio_tungstenite::connect_async_with_config(&url, None, true)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sink, mut stream) = ws.split();
    let mut turn = serde_json::json!({"type": "server_vad"});
    if ask.interim_ms > 0 {
        turn["interim_interval_ms"] = ask.interim_ms.into();
    }
    let mut update = serde_json::json!({"type": "transcription_session.update", "session": {
        "input_audio_format": {"type": "audio/pcm", "rate": 16_000},
        "input_audio_transcription": {"model": ask.model, "language": ask.language},
        "turn_detection": turn,
    }});
    if let Some(t) = &ask.translate_to {
        update["session"]["translation"] = serde_json::json!({"target_language": t});
    }
    sink.send(Message::Text(update.to_string().into()))
        .await
        .map_err(|e| format!("send: {e}"))?;
    let start = Instant::now();
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(());
    let sender = async move {
        for (i, c) in samples.chunks(1_600).enumerate() {
            tokio::time::sleep_until(start + Duration::from_millis(100 * (i as u64 + 1))).await;
            let ev = serde_json::json!({
                "type": "input_audio_buffer.append",
                "audio": base64::engine::general_purpose::STANDARD.encode(pcm16(c)),
            });
            if sink
                .send(Message::Text(ev.to_string().into()))
                .await
                .is_err()
            {
                break;
            }
        }
        drop(done_tx);
        sink
    };
    let receiver = async {
        let mut started: Vec<String> = Vec::new();
        let mut stopped: HashMap<String, Instant> = HashMap::new();
        let mut finals: HashMap<String, (Instant, String)> = HashMap::new();
        // Whether audio is still going out. The sender drops its end of
        // the watch when it is done, after which `changed()` is ready at
        // every poll: it is awaited only while the sender runs, or this
        // loop would spin a core until the last transcript came.
        let mut sending = true;
        loop {
            // Once the audio is sent, the session is done when every
            // utterance that started has its transcript.
            if !sending && started.iter().all(|k| finals.contains_key(k)) {
                break;
            }
            let next = tokio::select! {
                m = stream.next() => m,
                _ = done_rx.changed(), if sending => {
                    sending = false;
                    continue;
                }
            };
            let Some(m) = next else {
                return Err("the server closed the connection".to_owned());
            };
            let text = match m.map_err(|e| format!("read: {e}"))? {
                Message::Text(t) => t,
                Message::Close(f) => return Err(format!("closed: {f:?}")),
                _ => continue,
            };
            let now = Instant::now();
            let ev: serde_json::Value =
                serde_json::from_str(text.as_str()).map_err(|e| e.to_string())?;
            let item = ev["item_id"].as_str().unwrap_or_default().to_owned();
            match ev["type"].as_str().unwrap_or_default() {
                "input_audio_buffer.speech_started" => started.push(item),
                "input_audio_buffer.speech_stopped" => {
                    stopped.insert(item, now);
                }
                "conversation.item.input_audio_transcription.completed" => {
                    if let Some(end) = ev["end_ms"].as_u64() {
                        let captured = start + Duration::from_millis(end);
                        out.final_after_audio_ms
                            .push(now.saturating_duration_since(captured).as_secs_f64() * 1e3);
                    }
                    let t = ev["transcript"].as_str().unwrap_or_default().to_owned();
                    if ask.translate_to.is_some() && !finals.contains_key(&item) {
                        let tr = &ev["translation"];
                        let text = tr["text"].as_str().unwrap_or_default();
                        let failed = tr["failure"].as_str().is_some_and(|f| !f.is_empty());
                        out.untranslated += usize::from(text.is_empty() || failed);
                    }
                    finals.entry(item).or_insert((now, t));
                }
                "conversation.item.input_audio_transcription.delta" => {
                    if let Some(end) = ev["end_ms"].as_u64() {
                        let captured = start + Duration::from_millis(end);
                        out.interim_ms
                            .push(now.saturating_duration_since(captured).as_secs_f64() * 1e3);
                    }
                }
                "error" => {
                    return Err(ev["error"]["code"].as_str().unwrap_or("error").to_owned());
                }
                _ => {}
            }
        }
        for (item, at) in &stopped {
            if let Some((f, _)) = finals.get(item) {
                out.final_ms
                    .push(f.saturating_duration_since(*at).as_secs_f64() * 1e3);
            }
        }
        let mut items: Vec<_> = finals.into_iter().collect();
        items.sort();
        out.hypothesis = items
            .into_iter()
            .map(|(_, (_, t))| t)
            .collect::<Vec<_>>()
            .join(" ");
        Ok(())
    };
    let (mut sink, r) = tokio::join!(sender, receiver);
    let _ = sink.send(Message::Close(None)).await;
    r
}

async fn stream(
    addr: SocketAddr,
    ask: &Ask,
    samples: Vec<f32>,
    out: &mut Outcome,
) -> Result<(), tonic::Status> {
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = SpeechRecognitionClient::new(ch);
    let cfg = StreamingRecognitionConfig {
        config: Some(
            RecognitionConfig {
                model: ask.model.clone(),
                language: ask.language.clone(),
                audio_format: Some(pcm16_format()),
                diarization: ask.diarize.then_some(SpeakerDiarizationConfig {
                    enable: true,
                    min_speakers: 0,
                    max_speakers: 0,
                }),
                decoding: ask.beam_size.map(|beam_size| DecodingOptions {
                    beam_size,
                    ..Default::default()
                }),
                ..Default::default()
            }
            .translated_into(ask.translate_to.as_deref()),
        ),
        interim_results: ask.interim_ms > 0,
        endpointing: Some(EndpointingConfig {
            interim_interval_ms: ask.interim_ms,
            ..Default::default()
        }),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tx.send(StreamingRecognizeRequest {
        streaming_request: Some(StreamingRequest::StreamingConfig(cfg)),
    })
    .await
    .map_err(|_| tonic::Status::internal("request channel closed"))?;
    // The clock starts as the config goes out, as the WebSocket client's
    // starts as its session update goes out: the server's opening of the
    // session counts on both (audio due meanwhile goes at once after it).
    let start = Instant::now();
    let mut inbound = client
        .streaming_recognize(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let sender = async move {
        for (i, c) in samples.chunks(1_600).enumerate() {
            tokio::time::sleep_until(start + Duration::from_millis(100 * (i as u64 + 1))).await;
            let msg = StreamingRecognizeRequest {
                streaming_request: Some(StreamingRequest::AudioContent(pcm16(c).into())),
            };
            if tx.send(msg).await.is_err() {
                break;
            }
        }
    };
    let receiver = async {
        // Utterance k ends with the k-th END_OF_UTTERANCE; its final carries segment_id k.
        let mut endpoints: Vec<Instant> = Vec::new();
        let mut finals: HashMap<u64, (Instant, String)> = HashMap::new();
        while let Some(r) = inbound.message().await? {
            let now = Instant::now();
            if r.speech_event == SpeechEvent::EndOfUtterance as i32 {
                endpoints.push(now);
            }
            for res in &r.results {
                let text = res
                    .alternatives
                    .first()
                    .map(|a| a.transcript.clone())
                    .unwrap_or_default();
                if res.is_final {
                    if let Some(span) = &res.span
                        && !finals.contains_key(&res.segment_id)
                    {
                        let captured = start + Duration::from_millis(span.end_ms);
                        out.final_after_audio_ms
                            .push(now.saturating_duration_since(captured).as_secs_f64() * 1e3);
                    }
                    if ask.translate_to.is_some() && !finals.contains_key(&res.segment_id) {
                        let ok = res
                            .translation
                            .as_ref()
                            .is_some_and(|t| !t.text.is_empty() && t.failure.is_empty());
                        out.untranslated += usize::from(!ok);
                    }
                    finals.entry(res.segment_id).or_insert((now, text));
                } else if let Some(span) = &res.span {
                    let captured = start + Duration::from_millis(span.end_ms);
                    out.interim_ms
                        .push(now.saturating_duration_since(captured).as_secs_f64() * 1e3);
                }
            }
        }
        for (k, at) in endpoints.iter().enumerate() {
            if let Some((f, _)) = finals.get(&(k as u64)) {
                out.final_ms
                    .push(f.saturating_duration_since(*at).as_secs_f64() * 1e3);
            }
        }
        let mut segs: Vec<_> = finals.into_iter().collect();
        segs.sort_by_key(|(k, _)| *k);
        out.hypothesis = segs
            .into_iter()
            .map(|(_, (_, t))| t)
            .collect::<Vec<_>>()
            .join(" ");
        Ok::<_, tonic::Status>(())
    };
    let ((), r) = tokio::join!(sender, receiver);
    r
}

/// A batch transcription: one recording sent whole to Recognize.
#[derive(Debug, Clone)]
pub struct BatchJob {
    /// Model name.
    pub model: String,
    /// Spoken language.
    pub language: String,
    /// Beam width.
    pub beam_size: u32,
    /// Whether word times are asked for.
    pub word_timestamps: bool,
}

/// What a batch client beside a level did.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct BatchOutcome {
    /// Files transcribed.
    pub files: usize,
    /// Seconds of audio in each file.
    pub file_audio_s: f64,
    /// Seconds each file took per second of its audio (the median file).
    pub seconds_per_audio_s: f64,
    /// Failed calls by gRPC code.
    pub errors: std::collections::BTreeMap<String, usize>,
}

/// Sends `program` to Recognize at `addr` as one file, again and again,
/// until `stop` turns true; the file in flight then still completes.
pub async fn batch(
    addr: SocketAddr,
    job: BatchJob,
    program: Program,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> BatchOutcome {
    let file_audio_s = program.samples.len() as f64 / 16_000.0;
    let mut out = BatchOutcome {
        file_audio_s,
        ..Default::default()
    };
    let content = pcm16(&program.samples);
    let config = RecognitionConfig {
        model: job.model.clone(),
        language: job.language.clone(),
        audio_format: Some(pcm16_format()),
        enable_word_time_offsets: job.word_timestamps,
        decoding: Some(DecodingOptions {
            beam_size: job.beam_size,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut took = Vec::new();
    let client = match tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
        Ok(e) => e.connect().await,
        Err(e) => {
            out.errors.insert(format!("endpoint: {e}"), 1);
            return out;
        }
    };
    let mut client = match client {
        Ok(ch) => SpeechRecognitionClient::new(ch)
            .max_encoding_message_size(256 << 20)
            .max_decoding_message_size(256 << 20),
        Err(_) => {
            out.errors.insert("Unavailable".into(), 1);
            return out;
        }
    };
    while !*stop.borrow_and_update() {
        let t0 = Instant::now();
        let r = client
            .recognize(RecognizeRequest {
                config: Some(config.clone()),
                audio_source: Some(recognize_request::AudioSource::Content(
                    content.clone().into(),
                )),
            })
            .await;
        match r {
            Ok(_) => {
                out.files += 1;
                took.push(t0.elapsed().as_secs_f64() / file_audio_s);
            }
            Err(s) => {
                *out.errors.entry(format!("{:?}", s.code())).or_insert(0) += 1;
                // A refusal is not retried at once: wait for the level's end
                // or a second, whichever comes first.
                let _ = tokio::time::timeout(Duration::from_secs(1), stop.changed()).await;
            }
        }
    }
    took.sort_by(f64::total_cmp);
    out.seconds_per_audio_s = took.get(took.len() / 2).copied().unwrap_or(0.0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    /// CPU time this thread has used (user and system).
    fn thread_cpu() -> Duration {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("procfs");
        let after_name = &stat[stat.rfind(')').expect("stat's name") + 1..];
        let f: Vec<u64> = after_name
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        // utime and stime (fields 14 and 15) in USER_HZ ticks, 100 a second.
        Duration::from_millis((f[11] + f[12]) * 10)
    }

    /// A Realtime session whose last transcript comes long after its
    /// audio: the client waits for it idle. (It used to poll a watch whose
    /// sender was gone in a loop, taking a core from the server it measured
    /// for as long as a final was late: the WebSocket's last utterances
    /// looked seconds slower than the gRPC stream's.)
    #[tokio::test(flavor = "current_thread")]
    async fn a_websocket_session_waits_for_a_late_transcript_without_spinning() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = Duration::from_secs(2);
        // A server that takes the update and three appends (0.3 s of
        // audio), says speech started, and answers `hold` after the last.
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            let event = |v: serde_json::Value| Message::Text(v.to_string().into());
            let mut appends = 0;
            while appends < 3 {
                let Some(Ok(Message::Text(t))) = ws.next().await else {
                    panic!("the client left before its audio was sent");
                };
                if t.contains("input_audio_buffer.append") {
                    appends += 1;
                    if appends == 1 {
                        let started = serde_json::json!({"type": "input_audio_buffer.speech_started", "item_id": "item_1"});
                        ws.send(event(started)).await.unwrap();
                    }
                }
            }
            tokio::time::sleep(hold).await;
            let done = serde_json::json!({"type": "conversation.item.input_audio_transcription.completed",
                "item_id": "item_1", "transcript": "late words", "end_ms": 300});
            ws.send(event(done)).await.unwrap();
            // Until the client closes.
            while let Some(Ok(m)) = ws.next().await {
                if m.is_close() {
                    break;
                }
            }
        });
        let ask = Ask {
            model: "tiny.en".into(),
            language: "en".into(),
            interim_ms: 0,
            translate_to: None,
            diarize: false,
            beam_size: None,
        };
        let mut out = Outcome::default();
        let cpu = thread_cpu();
        let begun = Instant::now();
        websocket(addr, &ask, vec![0.0; 4_800], &mut out)
            .await
            .unwrap();
        let (cpu, wall) = (thread_cpu() - cpu, begun.elapsed());
        server.await.unwrap();
        assert_eq!(out.hypothesis, "late words");
        assert!(wall >= hold, "the session ended before its transcript");
        assert!(
            cpu < hold / 4,
            "the client used {cpu:?} of CPU in a {wall:?} session that mostly waited"
        );
    }
}
