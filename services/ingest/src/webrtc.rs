//! Live captioning over WebRTC: WHIP-style signalling (`POST
//! /v1/webrtc/sessions` with an SDP offer answers with the SDP answer and the
//! session's location; `DELETE` ends it), Opus from the browser through a
//! jitter buffer with loss concealment and in-band FEC into the same live
//! pipeline as gRPC streams, and captions back on the browser's data channel
//! and to the session's room.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use nexus_audio::OpusPacketDecoder;
use nexus_bus::Bus;
use nexus_fleet::stages;
use nexus_proto::speech::streaming_recognize_request::StreamingRequest;
use nexus_proto::speech::{
    AudioEncoding, AudioFormat, RecognitionConfig, StreamingRecognitionConfig,
    StreamingRecognizeRequest, StreamingRecognizeResponse, TranslationConfig,
};
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceCandidateType, RTCIceGatheringState, RTCIceServer,
    RTCPeerConnectionState, RTCSessionDescription, Registry, SettingEngineBuilder,
    register_default_interceptors,
};
use webrtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};

use crate::Ingest;
use crate::http::ApiError;
use crate::rooms::{self, Caption, CaptionEvent, Room, Translated, Word};

/// Opus decodes at 48 kHz.
const OPUS_RATE: u32 = 48_000;

/// WebRTC settings of the ingest.
#[derive(Debug, Clone, clap::Args)]
pub struct WebRtcArgs {
    /// Address the media sockets bind: `0.0.0.0` binds every non-loopback
    /// interface (one host candidate each).
    #[arg(
        long = "webrtc-udp-ip",
        env = "NEXUS_WEBRTC_UDP_IP",
        default_value = "0.0.0.0"
    )]
    pub udp_ip: String,
    /// UDP ports for media, `LOW-HIGH` (one per session; open them in the
    /// firewall or Service), or empty for ephemeral ports.
    #[arg(
        long = "webrtc-udp-ports",
        env = "NEXUS_WEBRTC_UDP_PORTS",
        default_value = ""
    )]
    pub udp_ports: String,
    /// Public address to advertise instead of the interfaces' own (a node's
    /// external IP behind 1:1 NAT, as on Kubernetes with hostNetwork).
    #[arg(long = "webrtc-public-ip", env = "NEXUS_WEBRTC_PUBLIC_IP")]
    pub public_ip: Option<String>,
    /// STUN or TURN servers for the server's side of ICE (`stun:host:port`).
    #[arg(
        long = "webrtc-ice-server",
        env = "NEXUS_WEBRTC_ICE_SERVERS",
        value_delimiter = ','
    )]
    pub ice_servers: Vec<String>,
    /// Silence on the wire after which a browser counts as gone, ms (browsers
    /// send Opus packets through silence).
    #[arg(long = "webrtc-idle-ms", default_value_t = 2_500)]
    pub idle_ms: u64,
    /// Time a session that ended gets to deliver its last captions, ms; its
    /// decoder slot is freed after at most this.
    #[arg(long = "webrtc-drain-ms", default_value_t = 4_000)]
    pub drain_ms: u64,
    /// Rooms this replica holds at most.
    #[arg(long = "webrtc-max-rooms", default_value_t = 1_000)]
    pub max_rooms: usize,
    /// How long a room's captions stay downloadable after everyone left, s.
    #[arg(long = "webrtc-room-keep-s", default_value_t = 3_600)]
    pub room_keep_s: u64,
}

impl Default for WebRtcArgs {
    fn default() -> Self {
        Self {
            udp_ip: "0.0.0.0".into(),
            udp_ports: String::new(),
            public_ip: None,
            ice_servers: Vec::new(),
            idle_ms: 2_500,
            drain_ms: 4_000,
            max_rooms: 1_000,
            room_keep_s: 3_600,
        }
    }
}

impl WebRtcArgs {
    fn ports(&self) -> anyhow::Result<Option<(u16, u16)>> {
        let s = self.udp_ports.trim();
        if s.is_empty() {
            return Ok(None);
        }
        let (lo, hi) = s
            .split_once('-')
            .ok_or_else(|| anyhow::anyhow!("--webrtc-udp-ports {s:?}: write LOW-HIGH"))?;
        let (lo, hi): (u16, u16) = (lo.trim().parse()?, hi.trim().parse()?);
        anyhow::ensure!(
            lo > 0 && lo <= hi,
            "--webrtc-udp-ports {s:?}: LOW must be at least 1 and at most HIGH"
        );
        Ok(Some((lo, hi)))
    }
}

/// The WebRTC side of one ingest replica.
#[derive(Debug)]
pub(crate) struct WebRtc {
    args: WebRtcArgs,
    ports: Option<(u16, u16)>,
    used_ports: Mutex<HashSet<u16>>,
    pub(crate) rooms: rooms::Rooms,
    sessions: Mutex<HashMap<String, (String, CancellationToken)>>,
}

impl WebRtc {
    pub(crate) fn new(args: WebRtcArgs) -> anyhow::Result<Self> {
        Ok(Self {
            ports: args.ports()?,
            rooms: rooms::Rooms::new(args.max_rooms, Duration::from_secs(args.room_keep_s)),
            args,
            used_ports: Mutex::new(HashSet::new()),
            sessions: Mutex::new(HashMap::new()),
        })
    }

    fn take_port(&self) -> Result<u16, ApiError> {
        let Some((lo, hi)) = self.ports else {
            return Ok(0);
        };
        let mut used = self.used_ports.lock().unwrap_or_else(|p| p.into_inner());
        let port = (lo..=hi).find(|p| !used.contains(p)).ok_or_else(|| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("every WebRTC media port ({lo}-{hi}) is in use; retry later"),
            )
        })?;
        used.insert(port);
        Ok(port)
    }

    fn give_port(&self, port: u16) {
        if port != 0 {
            self.used_ports
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&port);
        }
    }
}

/// The query of a session offer.
#[derive(Debug, Deserialize)]
pub(crate) struct OfferQuery {
    room: String,
    name: String,
    #[serde(default)]
    language: String,
    #[serde(default)]
    target_language: String,
    #[serde(default)]
    model: String,
}

/// The query of the room endpoints: browsers' `EventSource` sends no
/// headers, so a key may come as `access_token`.
#[derive(Debug, Deserialize, Default)]
pub(crate) struct RoomQuery {
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
    /// Live WebVTT: seconds of captions to list.
    #[serde(default)]
    window_s: Option<u64>,
    /// Subtitles in the translation's language instead of the speech's.
    #[serde(default)]
    translated: Option<bool>,
}

fn tenant_of<B: Bus>(
    ingest: &Ingest<B>,
    headers: &HeaderMap,
    token: Option<&str>,
    tenant: Option<&str>,
) -> Result<String, ApiError> {
    let get = |k: &str| headers.get(k).and_then(|v| v.to_str().ok());
    let bearer = token.map(|t| format!("Bearer {t}"));
    ingest
        .inner
        .access
        .authenticate(
            get("authorization").or(bearer.as_deref()),
            get("x-api-key"),
            get("x-tenant").or(tenant),
        )
        .map_err(|d| ApiError::from(Status::from(d)))
}

/// What the peer connection's driver reports to its session.
enum PeerEvent {
    State(RTCPeerConnectionState),
    Gathered,
    Track(Arc<dyn TrackRemote>),
    Channel(Arc<dyn DataChannel>),
}

struct Handler(mpsc::UnboundedSender<PeerEvent>);

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.0.send(PeerEvent::Gathered);
        }
    }
    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.0.send(PeerEvent::State(state));
    }
    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let _ = self.0.send(PeerEvent::Track(track));
    }
    async fn on_data_channel(&self, dc: Arc<dyn DataChannel>) {
        let _ = self.0.send(PeerEvent::Channel(dc));
    }
}

fn bad(msg: impl Into<String>, param: &'static str) -> ApiError {
    ApiError::bad(msg, param)
}

/// `POST /v1/webrtc/sessions`: an SDP offer in, the SDP answer out.
pub(crate) async fn offer<B: Bus>(
    State(ingest): State<Ingest<B>>,
    headers: HeaderMap,
    Query(q): Query<OfferQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let inner = ingest.inner.clone();
    if inner.shutdown.is_cancelled() {
        return Err(
            Status::unavailable("this ingest replica is draining; retry on another").into(),
        );
    }
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ctype.starts_with("application/sdp") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("the offer must be sent as application/sdp, not {ctype:?}"),
        ));
    }
    let tenant = tenant_of(&ingest, &headers, None, None)?;
    rooms::check_name("room", &q.room, false).map_err(|e| bad(e, "room"))?;
    rooms::check_name("name", &q.name, true).map_err(|e| bad(e, "name"))?;
    let sdp = String::from_utf8(body.to_vec())
        .map_err(|_| bad("the SDP offer is not UTF-8 text", "body"))?;
    if !sdp.lines().any(|l| l.starts_with("m=audio")) {
        return Err(bad(
            "the SDP offer has no audio section; add a microphone track (sendonly) before creating the offer",
            "body",
        ));
    }
    let room = inner
        .webrtc
        .rooms
        .open(&tenant, &q.room)
        .map_err(|e| ApiError::new(StatusCode::TOO_MANY_REQUESTS, e))?;
    let cfg = StreamingRecognitionConfig {
        config: Some(RecognitionConfig {
            model: q.model.clone(),
            language: q.language.clone(),
            enable_word_time_offsets: true,
            audio_format: Some(AudioFormat {
                encoding: AudioEncoding::LinearPcmF32le as i32,
                sample_rate_hz: OPUS_RATE,
                channels: 1,
            }),
            translation: (!q.target_language.is_empty()).then(|| TranslationConfig {
                target_language: q.target_language.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        interim_results: true,
        ..Default::default()
    };
    let grant = inner
        .access
        .limit(tenant.clone())
        .map_err(|d| ApiError::from(Status::from(d)))?;
    let (mut session, audio_in) = ingest.open(cfg, grant).await?;
    session.resumable = false;
    let id = session.id.to_string();
    let release = |inner: &Arc<crate::Inner<B>>, id: String| {
        let inner = inner.clone();
        async move {
            let pool = inner.cfg.fleet.keys.pool(stages::DECODER_POOL);
            let _ = inner.bus.release(&pool, &id).await;
        }
    };
    let port = match inner.webrtc.take_port() {
        Ok(p) => p,
        Err(e) => {
            release(&inner, id).await;
            return Err(e);
        }
    };
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let pc = match build_peer(&inner.webrtc.args, port, ev_tx, sdp).await {
        Ok(pc) => pc,
        Err(e) => {
            inner.webrtc.give_port(port);
            release(&inner, id).await;
            return Err(e);
        }
    };
    // Non-trickle: the answer carries every candidate.
    let gathered = tokio::time::timeout(Duration::from_secs(5), async {
        let mut early = Vec::new();
        while let Some(ev) = ev_rx.recv().await {
            match ev {
                PeerEvent::Gathered => return early,
                other => early.push(other),
            }
        }
        early
    })
    .await;
    let answer = pc.local_description().await;
    let (early, answer) = match (gathered, answer) {
        (Ok(early), Some(a)) => (early, a),
        _ => {
            let _ = pc.close().await;
            inner.webrtc.give_port(port);
            release(&inner, id).await;
            return Err(
                Status::internal("gathering ICE candidates failed; see the server log").into(),
            );
        }
    };
    let stop = CancellationToken::new();
    inner
        .webrtc
        .sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id.clone(), (tenant.clone(), stop.clone()));
    tracing::info!(session = %id, room = %q.room, participant = %q.name, "WebRTC session answered");
    let peer = Peer {
        pc,
        room,
        participant: q.name.clone(),
        session_id: id.clone(),
        stop,
        idle: Duration::from_millis(inner.webrtc.args.idle_ms.max(500)),
        drain: Duration::from_millis(inner.webrtc.args.drain_ms),
    };
    let location = format!("/v1/webrtc/sessions/{id}");
    let ingest2 = ingest.clone();
    tokio::spawn(async move {
        peer.run(session, audio_in, early, ev_rx).await;
        let inner = &ingest2.inner;
        inner.webrtc.give_port(port);
        inner
            .webrtc
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    });
    Ok((
        StatusCode::CREATED,
        [
            (header::CONTENT_TYPE, "application/sdp".to_owned()),
            (header::LOCATION, location),
        ],
        answer.sdp,
    )
        .into_response())
}

async fn build_peer(
    args: &WebRtcArgs,
    port: u16,
    events: mpsc::UnboundedSender<PeerEvent>,
    offer: String,
) -> Result<Arc<dyn PeerConnection>, ApiError> {
    let internal = |what: &str, e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, "{what}");
        ApiError::from(Status::internal(format!("{what}: {e}")))
    };
    let mut media = MediaEngine::default();
    media
        .register_default_codecs()
        .map_err(|e| internal("registering codecs", &e))?;
    let registry = register_default_interceptors(Registry::new(), &mut media)
        .map_err(|e| internal("registering interceptors", &e))?;
    let mut settings = SettingEngineBuilder::new().with_ice_timeouts(
        Some(Duration::from_secs(2)),
        Some(Duration::from_secs(4)),
        Some(Duration::from_secs(1)),
    );
    if let Some(ip) = &args.public_ip {
        settings = settings.with_nat_1to1_ips(vec![ip.clone()], RTCIceCandidateType::Host);
    }
    let config = RTCConfigurationBuilder::new()
        .with_ice_servers(
            args.ice_servers
                .iter()
                .filter(|s| !s.trim().is_empty())
                .map(|s| RTCIceServer {
                    urls: vec![s.trim().to_owned()],
                    ..Default::default()
                })
                .collect(),
        )
        .build();
    let pc = PeerConnectionBuilder::new()
        .with_configuration(config)
        .with_media_engine(media)
        .with_setting_engine(settings.build())
        .with_interceptor_registry(registry)
        .with_handler(Arc::new(Handler(events)) as Arc<dyn PeerConnectionEventHandler>)
        .with_udp_addrs(vec![format!("{}:{port}", args.udp_ip)])
        .build()
        .await
        .map_err(|e| internal("creating the peer connection", &e))?;
    let pc: Arc<dyn PeerConnection> = Arc::new(pc);
    let fail = |e: &dyn std::fmt::Display| bad(format!("the SDP offer was refused: {e}"), "body");
    let negotiate = async {
        pc.add_transceiver_from_kind(
            RtpCodecKind::Audio,
            Some(RTCRtpTransceiverInit {
                direction: RTCRtpTransceiverDirection::Recvonly,
                ..Default::default()
            }),
        )
        .await
        .map_err(|e| internal("adding the audio receiver", &e))?;
        let offer = RTCSessionDescription::offer(offer).map_err(|e| fail(&e))?;
        pc.set_remote_description(offer)
            .await
            .map_err(|e| fail(&e))?;
        let answer = pc.create_answer(None).await.map_err(|e| fail(&e))?;
        pc.set_local_description(answer)
            .await
            .map_err(|e| fail(&e))?;
        Ok::<(), ApiError>(())
    };
    if let Err(e) = negotiate.await {
        let _ = pc.close().await;
        return Err(e);
    }
    Ok(pc)
}

/// One browser's session: its peer connection, its room and its place in
/// the live pipeline.
struct Peer {
    pc: Arc<dyn PeerConnection>,
    room: Arc<Room>,
    participant: String,
    session_id: String,
    stop: CancellationToken,
    idle: Duration,
    drain: Duration,
}

type Inbound = mpsc::Sender<Result<StreamingRecognizeRequest, Status>>;

impl Peer {
    async fn run<B: Bus>(
        self,
        session: crate::session::Session<B>,
        audio_in: crate::audio_in::AudioIn,
        early: Vec<PeerEvent>,
        mut events: mpsc::UnboundedReceiver<PeerEvent>,
    ) {
        let (in_tx, in_rx) = mpsc::channel(64);
        let (out_tx, mut out_rx) = mpsc::channel(64);
        let pipeline =
            tokio::spawn(session.run(audio_in, Box::pin(ReceiverStream::new(in_rx)), out_tx));
        let mut input: Option<Inbound> = Some(in_tx);
        let clock0 = self.room.clock_ms();
        self.room.publish(CaptionEvent::Joined {
            participant: self.participant.clone(),
            session: self.session_id.clone(),
        });
        let (_, mut room_rx) = self.room.subscribe();
        let (pkt_tx, mut pkt_rx) = mpsc::channel::<(u16, Bytes)>(256);
        let channel: Arc<Mutex<Option<Arc<dyn DataChannel>>>> = Arc::default();
        let open = Arc::new(AtomicBool::new(false));
        let mut jitter = Jitter::default();
        let mut opus = match OpusPacketDecoder::new(1) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "no Opus decoder");
                return;
            }
        };
        let mut heard = false;
        let mut last_packet = tokio::time::Instant::now();
        // Until the first packet, allow for ICE and DTLS to come up.
        let mut idle_deadline = last_packet + Duration::from_secs(15);
        let mut drain_until: Option<tokio::time::Instant> = None;
        let mut pending = early;
        loop {
            for ev in pending.drain(..) {
                match ev {
                    PeerEvent::State(s) => {
                        tracing::debug!(session = %self.session_id, state = %s, "peer connection state");
                        if matches!(
                            s,
                            RTCPeerConnectionState::Failed
                                | RTCPeerConnectionState::Closed
                                | RTCPeerConnectionState::Disconnected
                        ) && input.is_some()
                        {
                            tracing::info!(session = %self.session_id, state = %s, "browser gone; finishing the session");
                            input = None;
                        }
                    }
                    PeerEvent::Gathered => {}
                    PeerEvent::Track(t) => {
                        tokio::spawn(read_track(t, pkt_tx.clone()));
                    }
                    PeerEvent::Channel(dc) => {
                        *channel.lock().unwrap_or_else(|p| p.into_inner()) = Some(dc.clone());
                        tokio::spawn(watch_channel(dc, open.clone()));
                    }
                }
            }
            if input.is_none() && drain_until.is_none() {
                drain_until = Some(tokio::time::Instant::now() + self.drain);
            }
            let drained = async {
                match drain_until {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => pending.push(ev),
                    None => input = None,
                },
                Some((seq, payload)) = pkt_rx.recv(), if input.is_some() => {
                    heard = true;
                    last_packet = tokio::time::Instant::now();
                    idle_deadline = last_packet + self.idle;
                    let mut pcm = Vec::new();
                    for frame in jitter.push(seq, payload) {
                        let decoded = match frame {
                            Frame::Packet(p) => opus.decode(&p),
                            Frame::Recover(next) => opus.recover(&next),
                            Frame::Conceal => opus.conceal(),
                        };
                        match decoded {
                            Ok(x) => pcm.extend(x),
                            Err(e) => tracing::debug!(session = %self.session_id, error = %e, "undecodable Opus packet; concealed"),
                        }
                    }
                    if !pcm.is_empty() {
                        let bytes: Vec<u8> = pcm.iter().flat_map(|s| s.to_le_bytes()).collect();
                        let msg = StreamingRecognizeRequest {
                            streaming_request: Some(StreamingRequest::AudioContent(bytes.into())),
                        };
                        if let Some(tx) = &input
                            && tx.send(Ok(msg)).await.is_err()
                        {
                            input = None;
                        }
                    }
                }
                _ = tokio::time::sleep_until(idle_deadline), if input.is_some() => {
                    tracing::info!(session = %self.session_id, heard, "no audio from the browser; finishing the session");
                    input = None;
                }
                _ = self.stop.cancelled(), if input.is_some() => {
                    tracing::info!(session = %self.session_id, "session ended by request");
                    input = None;
                }
                r = out_rx.recv() => match r {
                    Some(Ok(resp)) => {
                        for ev in captions(&resp, &self.participant, &self.session_id, clock0) {
                            self.room.publish(ev);
                        }
                    }
                    Some(Err(status)) => {
                        self.room.publish(CaptionEvent::Error {
                            participant: self.participant.clone(),
                            session: self.session_id.clone(),
                            message: status.message().to_owned(),
                        });
                    }
                    None => break,
                },
                ev = room_rx.recv() => match ev {
                    Ok(ev) => send_event(&channel, &open, &ev).await,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(session = %self.session_id, skipped = n, "data channel fell behind the room");
                    }
                    Err(broadcast::error::RecvError::Closed) => {}
                },
                _ = drained => {
                    tracing::info!(session = %self.session_id, "drain time over; the session ends");
                    break;
                }
            }
        }
        // Dropping the response stream ends the pipeline session, which frees
        // its decoder slot.
        drop(out_rx);
        let _ = pipeline.await;
        let left = CaptionEvent::Left {
            participant: self.participant.clone(),
            session: self.session_id.clone(),
        };
        send_event(&channel, &open, &left).await;
        self.room.publish(left);
        // Give the data channel a moment to carry the last events.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = self.pc.close().await;
        tracing::info!(session = %self.session_id, "WebRTC session closed");
    }
}

async fn send_event(
    channel: &Mutex<Option<Arc<dyn DataChannel>>>,
    open: &AtomicBool,
    ev: &CaptionEvent,
) {
    if !open.load(Ordering::Relaxed) {
        return;
    }
    let dc = channel.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let (Some(dc), Ok(json)) = (dc, serde_json::to_string(ev)) {
        let _ = dc.send_text(&json).await;
    }
}

async fn watch_channel(dc: Arc<dyn DataChannel>, open: Arc<AtomicBool>) {
    if matches!(
        dc.ready_state().await,
        Ok(webrtc::data_channel::RTCDataChannelState::Open)
    ) {
        open.store(true, Ordering::Relaxed);
    }
    while let Some(ev) = dc.poll().await {
        match ev {
            DataChannelEvent::OnOpen => open.store(true, Ordering::Relaxed),
            DataChannelEvent::OnClose => {
                open.store(false, Ordering::Relaxed);
                break;
            }
            _ => {}
        }
    }
}

async fn read_track(track: Arc<dyn TrackRemote>, out: mpsc::Sender<(u16, Bytes)>) {
    if track.kind().await != RtpCodecKind::Audio {
        return;
    }
    while let Some(ev) = track.poll().await {
        match ev {
            TrackRemoteEvent::OnRtpPacket(p) => {
                if p.payload.is_empty() {
                    continue;
                }
                let payload = Bytes::copy_from_slice(&p.payload);
                if out.send((p.header.sequence_number, payload)).await.is_err() {
                    return;
                }
            }
            TrackRemoteEvent::OnEnded => return,
            _ => {}
        }
    }
}

/// Caption events of one pipeline response, in the room's clock.
fn captions(
    resp: &StreamingRecognizeResponse,
    participant: &str,
    session: &str,
    clock0: u64,
) -> Vec<CaptionEvent> {
    resp.results
        .iter()
        .filter_map(|r| {
            let alt = r.alternatives.first()?;
            let span = r.span.unwrap_or_default();
            let c = Caption {
                participant: participant.to_owned(),
                session: session.to_owned(),
                segment: r.segment_id,
                revision: r.revision,
                start_ms: clock0 + span.start_ms,
                end_ms: clock0 + span.end_ms,
                text: alt.transcript.trim().to_owned(),
                language: r.language.clone(),
                words: alt
                    .words
                    .iter()
                    .map(|w| Word {
                        word: w.word.clone(),
                        start_ms: clock0 + w.start_ms,
                        end_ms: clock0 + w.end_ms,
                    })
                    .collect(),
                translation: r.translation.as_ref().map(|t| Translated {
                    language: t.target_language.clone(),
                    text: t.text.clone(),
                }),
            };
            Some(if r.is_final {
                CaptionEvent::Final(c)
            } else {
                CaptionEvent::Interim(c)
            })
        })
        .collect()
}

/// What to decode next.
#[derive(Debug, PartialEq)]
enum Frame {
    Packet(Bytes),
    /// A lost packet, recovered from the in-band FEC of the one after it.
    Recover(Bytes),
    /// A lost packet with nothing to recover it from: concealed.
    Conceal,
}

/// Packets held back for reordering (20 ms each: 60 ms of jitter).
const JITTER_DEPTH: usize = 3;
/// The longest gap concealed; longer ones (a stalled network) are skipped.
const MAX_CONCEAL: u64 = 25;

/// A small reordering buffer of RTP packets by sequence number: packets come
/// out in order; a gap still open when [`JITTER_DEPTH`] later packets have
/// arrived counts as lost.
#[derive(Debug, Default)]
struct Jitter {
    /// Next sequence number to play, extended past 16 bits.
    next: Option<u64>,
    highest: u64,
    held: BTreeMap<u64, Bytes>,
}

impl Jitter {
    fn extend(&self, seq: u16) -> u64 {
        let Some(_) = self.next else {
            return u64::from(seq) + (1 << 16);
        };
        // The extended number nearest the highest one seen.
        let base = self.highest & !0xffff;
        let cands = [
            base.wrapping_sub(1 << 16) | u64::from(seq),
            base | u64::from(seq),
            (base + (1 << 16)) | u64::from(seq),
        ];
        cands
            .into_iter()
            .min_by_key(|c| c.abs_diff(self.highest))
            .unwrap_or(base | u64::from(seq))
    }

    fn push(&mut self, seq: u16, payload: Bytes) -> Vec<Frame> {
        let ext = self.extend(seq);
        let next = *self.next.get_or_insert(ext);
        if ext < next {
            return Vec::new(); // too late: already played or concealed
        }
        self.highest = self.highest.max(ext);
        self.held.insert(ext, payload);
        let mut out = Vec::new();
        while let Some((&first, _)) = self.held.first_key_value() {
            let next = self.next.unwrap_or(first);
            if first == next {
                if let Some(p) = self.held.remove(&first) {
                    out.push(Frame::Packet(p));
                }
                self.next = Some(first + 1);
            } else if self.held.len() > JITTER_DEPTH {
                let gap = first - next;
                if gap > MAX_CONCEAL {
                    self.next = Some(first);
                    continue;
                }
                for _ in 0..gap - 1 {
                    out.push(Frame::Conceal);
                }
                out.push(Frame::Recover(self.held[&first].clone()));
                self.next = Some(first);
            } else {
                break;
            }
        }
        out
    }
}

/// `DELETE /v1/webrtc/sessions/{id}`: ends a session; its last captions
/// still arrive.
pub(crate) async fn end<B: Bus>(
    State(ingest): State<Ingest<B>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let tenant = tenant_of(&ingest, &headers, None, None)?;
    let sessions = ingest
        .inner
        .webrtc
        .sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    match sessions.get(&id) {
        Some((owner, stop)) if *owner == tenant || !ingest.inner.access.requires_keys() => {
            stop.cancel();
            Ok(StatusCode::OK)
        }
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no WebRTC session {id} on this server; it may have ended"),
        )),
    }
}

fn room_of<B: Bus>(
    ingest: &Ingest<B>,
    headers: &HeaderMap,
    room: &str,
    q: &RoomQuery,
) -> Result<Arc<Room>, ApiError> {
    let tenant = tenant_of(
        ingest,
        headers,
        q.access_token.as_deref(),
        q.tenant.as_deref(),
    )?;
    rooms::check_name("room", room, false).map_err(|e| bad(e, "room"))?;
    ingest.inner.webrtc.rooms.get(&tenant, room).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no room {room:?} on this server; it opens when someone publishes into it"),
        )
    })
}

/// `GET /v1/rooms/{room}/events`: the room's captions as server-sent events
/// (`interim`, `final`, `joined`, `left`, `error`), the last finals first.
pub(crate) async fn events<B: Bus>(
    State(ingest): State<Ingest<B>>,
    headers: HeaderMap,
    Path(room): Path<String>,
    Query(q): Query<RoomQuery>,
) -> Result<Response, ApiError> {
    let tenant = tenant_of(
        &ingest,
        &headers,
        q.access_token.as_deref(),
        q.tenant.as_deref(),
    )?;
    rooms::check_name("room", &room, false).map_err(|e| bad(e, "room"))?;
    // Viewers may come before the first speaker: the room opens for them.
    let room = ingest
        .inner
        .webrtc
        .rooms
        .open(&tenant, &room)
        .map_err(|e| ApiError::new(StatusCode::TOO_MANY_REQUESTS, e))?;
    let (replay, rx) = room.subscribe();
    let first = futures::stream::iter(replay.into_iter().map(|c| Arc::new(CaptionEvent::Final(c))));
    let live = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(ev) => return Some((ev, rx)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    use futures::StreamExt;
    let stream = first.chain(live).map(|ev| {
        let name = match &*ev {
            CaptionEvent::Interim(_) => "interim",
            CaptionEvent::Final(_) => "final",
            CaptionEvent::Joined { .. } => "joined",
            CaptionEvent::Left { .. } => "left",
            CaptionEvent::Error { .. } => "error",
        };
        Event::default().event(name).json_data(&*ev)
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// `GET /v1/rooms/{room}/captions.vtt`: a rolling WebVTT cue list of the last
/// `window_s` seconds (default 60), for HLS subtitle playlists.
pub(crate) async fn vtt<B: Bus>(
    State(ingest): State<Ingest<B>>,
    headers: HeaderMap,
    Path(room): Path<String>,
    Query(q): Query<RoomQuery>,
) -> Result<Response, ApiError> {
    let room = room_of(&ingest, &headers, &room, &q)?;
    let window = q.window_s.unwrap_or(60).saturating_mul(1000);
    let since = room.clock_ms().saturating_sub(window);
    let body = rooms::webvtt(&room.cues(since), q.translated.unwrap_or(false));
    Ok((
        [
            (header::CONTENT_TYPE, "text/vtt; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response())
}

/// `GET /v1/rooms/{room}/captions.srt`: every caption of the room so far.
pub(crate) async fn srt<B: Bus>(
    State(ingest): State<Ingest<B>>,
    headers: HeaderMap,
    Path(room): Path<String>,
    Query(q): Query<RoomQuery>,
) -> Result<Response, ApiError> {
    let room = room_of(&ingest, &headers, &room, &q)?;
    let body = rooms::srt(&room.cues(0), q.translated.unwrap_or(false));
    let disposition = format!("attachment; filename=\"{}.srt\"", room.name);
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "application/x-subrip; charset=utf-8".to_owned(),
            ),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        body,
    )
        .into_response())
}

/// `GET /v1/rooms/{room}`: who publishes and how many captions there are.
pub(crate) async fn room_info<B: Bus>(
    State(ingest): State<Ingest<B>>,
    headers: HeaderMap,
    Path(room): Path<String>,
    Query(q): Query<RoomQuery>,
) -> Result<Response, ApiError> {
    let room = room_of(&ingest, &headers, &room, &q)?;
    Ok(axum::Json(serde_json::json!({
        "room": room.name,
        "publishers": room.publishers(),
        "captions": room.cues(0).len(),
        "clock_ms": room.clock_ms(),
    }))
    .into_response())
}

/// The captions page: plain HTML and JavaScript, no build step.
pub(crate) async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../static/captions.html"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(n: u8) -> Bytes {
        Bytes::from(vec![n])
    }

    #[test]
    fn jitter_reorders_recovers_and_conceals() {
        let mut j = Jitter::default();
        assert_eq!(j.push(10, b(10)), vec![Frame::Packet(b(10))]);
        // 12 before 11: held, then both in order.
        assert_eq!(j.push(12, b(12)), vec![]);
        assert_eq!(
            j.push(11, b(11)),
            vec![Frame::Packet(b(11)), Frame::Packet(b(12))]
        );
        // 13 and 14 lost: once three later packets wait, 13 is concealed and
        // 14 recovered from 15's FEC.
        assert_eq!(j.push(15, b(15)), vec![]);
        assert_eq!(j.push(16, b(16)), vec![]);
        assert_eq!(j.push(17, b(17)), vec![]);
        assert_eq!(
            j.push(18, b(18)),
            vec![
                Frame::Conceal,
                Frame::Recover(b(15)),
                Frame::Packet(b(15)),
                Frame::Packet(b(16)),
                Frame::Packet(b(17)),
                Frame::Packet(b(18)),
            ]
        );
        // A packet that comes after its gap was concealed is dropped.
        assert_eq!(j.push(13, b(13)), vec![]);
        // Sequence numbers wrap.
        let mut j = Jitter::default();
        assert_eq!(j.push(65_535, b(1)), vec![Frame::Packet(b(1))]);
        assert_eq!(j.push(0, b(2)), vec![Frame::Packet(b(2))]);
        assert_eq!(j.push(1, b(3)), vec![Frame::Packet(b(3))]);
    }

    #[test]
    fn responses_become_room_captions_in_the_room_clock() {
        use nexus_proto::speech::{
            SpeechRecognitionAlternative, StreamingRecognitionResult, TimeSpan, TranslationResult,
            WordInfo,
        };
        let result = |is_final: bool| StreamingRecognitionResult {
            alternatives: vec![SpeechRecognitionAlternative {
                transcript: " Go forward. ".into(),
                words: vec![WordInfo {
                    word: "Go".into(),
                    start_ms: 100,
                    end_ms: 300,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            is_final,
            segment_id: 3,
            revision: 2,
            language: "en".into(),
            span: Some(TimeSpan {
                start_ms: 100,
                end_ms: 900,
            }),
            translation: is_final.then(|| TranslationResult {
                target_language: "de".into(),
                text: "Geh vorwärts.".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let resp = StreamingRecognizeResponse {
            results: vec![result(false), result(true)],
            ..Default::default()
        };
        let evs = captions(&resp, "Ada", "s1", 5_000);
        let CaptionEvent::Interim(i) = &evs[0] else {
            panic!("{evs:?}")
        };
        assert_eq!(
            (i.start_ms, i.end_ms, i.text.as_str()),
            (5_100, 5_900, "Go forward.")
        );
        assert_eq!(i.translation, None);
        let CaptionEvent::Final(f) = &evs[1] else {
            panic!("{evs:?}")
        };
        assert_eq!(f.participant, "Ada");
        assert_eq!((f.segment, f.revision), (3, 2));
        assert_eq!(f.words[0].start_ms, 5_100);
        assert_eq!(
            f.translation.as_ref().map(|t| t.text.as_str()),
            Some("Geh vorwärts.")
        );
        // No alternative, no caption.
        let empty = StreamingRecognizeResponse {
            results: vec![StreamingRecognitionResult::default()],
            ..Default::default()
        };
        assert!(captions(&empty, "Ada", "s1", 0).is_empty());
    }

    #[test]
    fn port_ranges_are_checked() {
        let mut a = WebRtcArgs {
            udp_ports: "50000-50001".into(),
            ..WebRtcArgs::default()
        };
        let w = WebRtc::new(a.clone()).unwrap();
        assert_eq!(w.take_port().ok(), Some(50_000));
        assert_eq!(w.take_port().ok(), Some(50_001));
        let e = w.take_port().err().unwrap();
        assert!(e.message().contains("50000-50001"));
        w.give_port(50_000);
        assert_eq!(w.take_port().ok(), Some(50_000));
        a.udp_ports = "9-1".into();
        assert!(WebRtc::new(a.clone()).is_err());
        a.udp_ports = "x".into();
        assert!(WebRtc::new(a).is_err());
    }
}
