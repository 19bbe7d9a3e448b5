//! Live captioning over WebRTC: WHIP-style signalling (`POST
//! /v1/webrtc/sessions` with an SDP offer answers with the SDP answer and the
//! session's location; `DELETE` ends it), Opus from the browser through a
//! jitter buffer with loss concealment and in-band FEC into the same live
//! pipeline as gRPC streams, and captions back on the browser's data channel
//! and to the session's room.

mod jitter;
mod peer;
mod rooms_http;

pub(crate) use rooms_http::{events, page, room_info, srt, vtt};

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use nexus_bus::Bus;
use nexus_proto::speech::{
    AudioEncoding, AudioFormat, RecognitionConfig, SpeakerDiarizationConfig,
    StreamingRecognitionConfig,
};
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use webrtc::data_channel::DataChannel;
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceCandidateType, RTCIceGatheringState, RTCIceServer,
    RTCPeerConnectionState, RTCSessionDescription, Registry, SettingEngineBuilder,
    register_default_interceptors,
};
use webrtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};

use crate::Ingest;
use crate::http::ApiError;
use crate::rooms;

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
    /// Tell apart the voices on this participant's microphone (a meeting
    /// room's), labelling captions `Speaker 1`, `Speaker 2`, ...
    #[serde(default)]
    diarize: bool,
    /// At most this many voices on the microphone (1 to 32; implies `diarize`).
    #[serde(default)]
    max_speakers: Option<u32>,
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

pub(super) fn tenant_of<B: Bus>(
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
pub(super) enum PeerEvent {
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

pub(super) fn bad(msg: impl Into<String>, param: &'static str) -> ApiError {
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
        config: Some(
            RecognitionConfig {
                model: q.model.clone(),
                language: q.language.clone(),
                enable_word_time_offsets: true,
                audio_format: Some(AudioFormat {
                    encoding: AudioEncoding::LinearPcmF32le as i32,
                    sample_rate_hz: OPUS_RATE,
                    channels: 1,
                }),
                diarization: (q.diarize || q.max_speakers.is_some()).then(|| {
                    SpeakerDiarizationConfig {
                        enable: true,
                        min_speakers: 0,
                        max_speakers: q.max_speakers.unwrap_or(0),
                    }
                }),
                ..Default::default()
            }
            .translated_into(Some(q.target_language.as_str())),
        ),
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
    let port = match inner.webrtc.take_port() {
        Ok(p) => p,
        Err(e) => {
            inner.release_slot(&session.id, &session.tenant).await;
            return Err(e);
        }
    };
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let negotiated = async {
        let pc = build_peer(&inner.webrtc.args, port, ev_tx, sdp).await?;
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
        match (gathered, pc.local_description().await) {
            (Ok(early), Some(answer)) => Ok((pc, early, answer)),
            _ => {
                let _ = pc.close().await;
                Err(ApiError::from(Status::internal(
                    "gathering ICE candidates failed; see the server log",
                )))
            }
        }
    }
    .await;
    let (pc, early, answer) = match negotiated {
        Ok(n) => n,
        Err(e) => {
            inner.webrtc.give_port(port);
            inner.release_slot(&session.id, &session.tenant).await;
            return Err(e);
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
    let peer = peer::Peer {
        pc,
        room,
        participant: q.name.clone(),
        session_id: id.clone(),
        stop,
        idle: Duration::from_millis(inner.webrtc.args.idle_ms.max(500)),
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

#[cfg(test)]
mod tests {
    use super::*;

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
