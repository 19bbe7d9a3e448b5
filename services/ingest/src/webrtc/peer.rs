//! One browser's session, from its peer connection's events and RTP packets
//! to the live pipeline, and from the pipeline's responses to its room and
//! data channel.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use nexus_audio::OpusPacketDecoder;
use nexus_bus::Bus;
use nexus_proto::speech::streaming_recognize_request::StreamingRequest;
use nexus_proto::speech::{StreamingRecognizeRequest, StreamingRecognizeResponse};
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{PeerConnection, RTCPeerConnectionState};

use crate::rooms::{Caption, CaptionEvent, Room, Translated, Word};

use super::PeerEvent;
use super::jitter::{Frame, Jitter};

/// One browser's session: its peer connection, its room and its place in
/// the live pipeline.
pub(super) struct Peer {
    pub(super) pc: Arc<dyn PeerConnection>,
    pub(super) room: Arc<Room>,
    pub(super) participant: String,
    pub(super) session_id: String,
    pub(super) stop: CancellationToken,
    pub(super) idle: Duration,
}

type Inbound = mpsc::Sender<Result<StreamingRecognizeRequest, Status>>;

impl Peer {
    pub(super) async fn run<B: Bus>(
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
            // Once the input ends, the loop runs on until the pipeline has
            // delivered the final of the utterance in progress and closed the
            // response stream (within the fleet's --final-timeout-ms).
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
                        speaker: (!w.speaker.is_empty()).then(|| w.speaker.clone()),
                    })
                    .collect(),
                translation: r.translation.as_ref().map(|t| Translated {
                    language: t.target_language.clone(),
                    text: t.text.clone(),
                    failure: (!t.failure.is_empty()).then(|| t.failure.clone()),
                }),
                // The session has no speaker label of its own (the
                // participant is kept here), so a set speaker is diarization's.
                speaker: (!r.speaker.is_empty()).then(|| r.speaker.clone()),
            };
            Some(if r.is_final {
                CaptionEvent::Final(c)
            } else {
                CaptionEvent::Interim(c)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
