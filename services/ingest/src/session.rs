//! One live session: audio in, segments out to the encoder stage, results
//! back from the session's log, until the client half-closes (or a single
//! utterance ends, or the server drains) and every final has arrived.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use nexus_audio::{EndpointConfig, EndpointEvent, Endpointer, MODEL_SAMPLE_RATE};
use nexus_bus::{Bus, BusError, EntryId, Holder, SessionId, decode, encode};
use nexus_fleet::{now_unix_ms, retry, stages};
use nexus_models::vad::{CHUNK, VadState};
use nexus_proto::pipeline::{AudioSegment, DecodeResult, Envelope};
use nexus_proto::speech::streaming_recognize_request::StreamingRequest;
use nexus_proto::speech::turn_control::Action;
use nexus_proto::speech::{
    RecognitionConfig, SpeechEvent, StreamingRecognitionConfig, StreamingRecognizeRequest,
    StreamingRecognizeResponse,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::Inner;
use crate::agreement::Agreement;
use crate::audio_in::AudioIn;

/// A session that passed validation and admission.
pub struct Session<B: Bus> {
    pub(crate) inner: Arc<Inner<B>>,
    pub(crate) id: SessionId,
    pub(crate) cfg: StreamingRecognitionConfig,
    pub(crate) rc: RecognitionConfig,
    pub(crate) endpoint: EndpointConfig,
    pub(crate) tenant: String,
    /// The caller's place among its tenant's calls, held while the session runs.
    pub(crate) _grant: crate::auth::Grant,
    /// Held while the session runs; returned to the ingest's bound on drop.
    pub(crate) _local: tokio::sync::OwnedSemaphorePermit,
    /// Whether a client that goes away may resume the session (gRPC
    /// streams); otherwise the session ends with its client (WebRTC).
    pub(crate) resumable: bool,
    /// The session's span: the root of its trace across the fleet (or a
    /// child of the caller's, when the call carried a `traceparent`).
    pub(crate) span: tracing::Span,
}

/// A session's incoming messages, from a gRPC stream or another source.
pub(crate) type Inbound = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<StreamingRecognizeRequest, Status>> + Send>,
>;

pub(crate) type Out = mpsc::Sender<Result<StreamingRecognizeResponse, Status>>;

struct Live {
    /// When each window (segment, revision) left for the encoders.
    sent: HashMap<(u64, u32), std::time::Instant>,
    endpointer: Endpointer,
    vad: VadState,
    vad_pending: Vec<f32>,
    /// Audio from sample `base` on.
    audio: Vec<f32>,
    base: u64,
    /// Where the last utterance's audio ended (or was cleared): a final's
    /// lead of earlier audio never reaches back past it.
    spoken_until: u64,
    sequence: u64,
    revisions: HashMap<u64, u32>,
    expected_finals: BTreeSet<u64>,
    finals: BTreeSet<u64>,
    /// Finals whose spoken reply has not all arrived (speech output).
    speech_pending: BTreeSet<u64>,
    /// Spoken pieces already forwarded, by (segment, chunk).
    speech_seen: HashSet<(u64, u32)>,
    seen: HashSet<(u64, u32)>,
    shown_revision: HashMap<u64, u32>,
    agreement: HashMap<u64, Agreement>,
    result_index: u64,
    processed: u64,
    input_done: bool,
    /// The client's response stream; none while the client is away.
    out: Option<Out>,
    /// Responses that carried results, for a client that resumes.
    history: VecDeque<StreamingRecognizeResponse>,
    /// Why the server ended the input (idle, maximum length): the session's
    /// status once the utterance in progress has its final.
    end_status: Option<Status>,
    /// The session's final text so far, for `condition_on_previous_text`.
    previous_text: String,
    /// The last finals of a translating session, the context of the next
    /// final's translation.
    translation_context: VecDeque<String>,
    /// Live diarization, when asked for: the session's speakers so far and
    /// each sent final's labelling, which runs while the final decodes.
    speakers: Option<LiveSpeakers>,
}

struct LiveSpeakers {
    diarizer: Arc<std::sync::Mutex<nexus_models::speaker::OnlineDiarizer>>,
    pending:
        HashMap<u64, tokio::task::JoinHandle<Result<Vec<nexus_models::speaker::Turn>, String>>>,
}

/// Responses kept for a client that resumes.
const HISTORY: usize = 1_024;

/// A resumed call handed to its parked session.
pub(crate) struct Reattach {
    pub(crate) inbound: Inbound,
    pub(crate) out: Out,
    pub(crate) after: u64,
}

const SAMPLES_PER_MS: u64 = MODEL_SAMPLE_RATE as u64 / 1000;

/// Most digital silence a final's window starts with.
const MAX_SILENCE_MS: u64 = 500;

fn ms(samples: u64) -> u64 {
    samples * 1000 / u64::from(MODEL_SAMPLE_RATE)
}

impl<B: Bus> Session<B> {
    /// Runs the session to its end, sending responses on `out`.
    /// `decoder` is kept out of `self`: it is not `Sync`, and the session is
    /// borrowed across awaits.
    pub async fn run(self, decoder: AudioIn, inbound: Inbound, out: Out) {
        use tracing::Instrument;
        let span = self.span.clone();
        self.run_in_span(decoder, inbound, out)
            .instrument(span)
            .await;
    }

    async fn run_in_span(self, mut decoder: AudioIn, inbound: Inbound, out: Out) {
        let id = self.id.clone();
        let stop = CancellationToken::new();
        let (res_tx, mut res_rx) = mpsc::channel::<Result<(EntryId, DecodeResult), String>>(256);
        let follower = tokio::spawn(follow(
            self.inner.bus.clone(),
            self.inner.cfg.fleet.keys.results(&id),
            self.inner.cfg.bus_retry,
            res_tx,
            stop.clone(),
        ));
        let mut live = Live {
            sent: HashMap::new(),
            endpointer: Endpointer::new(self.endpoint.clone(), MODEL_SAMPLE_RATE),
            vad: VadState::default(),
            vad_pending: Vec::new(),
            audio: Vec::new(),
            base: 0,
            spoken_until: 0,
            sequence: 0,
            revisions: HashMap::new(),
            expected_finals: BTreeSet::new(),
            finals: BTreeSet::new(),
            speech_pending: BTreeSet::new(),
            speech_seen: HashSet::new(),
            seen: HashSet::new(),
            shown_revision: HashMap::new(),
            agreement: HashMap::new(),
            result_index: 0,
            processed: 0,
            input_done: false,
            out: Some(out),
            history: VecDeque::new(),
            end_status: None,
            previous_text: String::new(),
            translation_context: VecDeque::new(),
            speakers: self
                .rc
                .diarization
                .as_ref()
                .filter(|d| d.enable)
                .map(|d| LiveSpeakers {
                    diarizer: Arc::new(std::sync::Mutex::new(
                        nexus_models::speaker::OnlineDiarizer::new(
                            nexus_models::speaker::diarize::DEFAULT_THRESHOLD,
                            match d.max_speakers {
                                0 => nexus_models::speaker::MAX_SPEAKERS,
                                n => n as usize,
                            },
                        ),
                    )),
                    pending: HashMap::new(),
                }),
        };
        let r = self
            .drive(&mut live, &mut decoder, inbound, &mut res_rx)
            .await;
        self.unpark();
        stop.cancel();
        let _ = follower.await;
        self.inner.release_slot(&id, &self.tenant).await;
        self.inner.metrics.session_ended(
            r.as_ref().err().map(Status::code),
            live.processed as f64 / f64::from(MODEL_SAMPLE_RATE),
        );
        match r {
            Ok(()) => tracing::info!(session = %id, "session ended"),
            Err(status) => {
                tracing::warn!(session = %id, code = ?status.code(), message = status.message(), "session failed");
                if let Some(out) = &live.out {
                    let _ = out.send(Err(status)).await;
                }
            }
        }
    }

    /// When the next message may be read: `processed` samples may arrive
    /// `live_burst` ahead of `live_max_speed` times real time since `started`.
    fn paced_until(&self, started: tokio::time::Instant, processed: u64) -> tokio::time::Instant {
        let cfg = &self.inner.cfg;
        let audio = Duration::from_secs_f64(processed as f64 / f64::from(MODEL_SAMPLE_RATE));
        let ahead = audio.saturating_sub(cfg.live_burst);
        started + ahead.div_f64(cfg.live_max_speed)
    }

    fn unpark(&self) {
        self.inner
            .resumable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.id.as_str());
    }

    async fn drive(
        &self,
        live: &mut Live,
        decoder: &mut AudioIn,
        inbound: Inbound,
        results: &mut mpsc::Receiver<Result<(EntryId, DecodeResult), String>>,
    ) -> Result<(), Status> {
        let mut inbound = Some(inbound);
        let grace = if self.resumable {
            self.inner.cfg.resume_grace
        } else {
            Duration::ZERO
        };
        // A resumable session can be taken over by a resumed call at any
        // time: after its client went away, or before this replica noticed
        // (a client reconnects faster than a dead connection times out).
        let mut handover: Option<mpsc::Receiver<Reattach>> = None;
        if !grace.is_zero() {
            let (tx, rx) = mpsc::channel(1);
            self.inner
                .resumable
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(self.id.to_string(), (self.tenant.clone(), tx));
            handover = Some(rx);
        }
        let mut away_until: Option<tokio::time::Instant> = None;
        self.respond(
            live,
            StreamingRecognizeResponse {
                session_id: self.id.to_string(),
                ..Default::default()
            },
        )
        .await?;
        let pool = self.inner.cfg.fleet.keys.pool(stages::DECODER_POOL);
        let lease_ttl = self.inner.cfg.lease_ttl;
        let mut renew = tokio::time::interval(lease_ttl / 3);
        renew.tick().await;
        let mut deadline: Option<tokio::time::Instant> = None;
        let shutdown = self.inner.shutdown.clone();
        let started = tokio::time::Instant::now();
        let idle = self.inner.cfg.idle_timeout;
        let max_samples = self.inner.cfg.max_session.as_secs() * u64::from(MODEL_SAMPLE_RATE);
        let mut last_audio = started;
        loop {
            if (live.out.is_none() || inbound.is_none()) && away_until.is_none() {
                // The client went away. The session waits the resume grace:
                // audio in hand is still decoded and results are kept for it.
                live.out = None;
                inbound = None;
                if grace.is_zero() {
                    tracing::info!(session = %self.id, "client gone; session ends");
                    return Ok(());
                }
                tracing::info!(session = %self.id, ?grace, "client gone; session parked for resuming");
                away_until = Some(tokio::time::Instant::now() + grace);
            }
            if live.input_done
                && live.expected_finals.is_subset(&live.finals)
                && live.speech_pending.is_empty()
                && live.out.is_some()
            {
                if let Some(status) = live.end_status.take() {
                    return Err(status);
                }
                self.respond(
                    live,
                    StreamingRecognizeResponse {
                        session_id: self.id.to_string(),
                        speech_event: SpeechEvent::EndOfSession as i32,
                        speech_event_ms: ms(live.processed),
                        ..Default::default()
                    },
                )
                .await?;
                return Ok(());
            }
            let wait_final = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            // A sender ahead of the live pace waits here: its messages stay
            // unread and flow control slows it down.
            let paced = self.paced_until(started, live.processed);
            let idle_armed = !idle.is_zero() && !live.input_done && inbound.is_some();
            let next_msg = async {
                match inbound.as_mut() {
                    Some(i) => {
                        tokio::time::sleep_until(paced).await;
                        futures::StreamExt::next(i).await.transpose()
                    }
                    None => std::future::pending().await,
                }
            };
            let idle_for = async {
                if !idle_armed {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep_until(last_audio.max(paced) + idle).await;
            };
            // A client that drops its response stream is gone, even while
            // the session has nothing to send it.
            let out_closed = async {
                match &live.out {
                    Some(o) => o.closed().await,
                    None => std::future::pending().await,
                }
            };
            let reattach = async {
                match handover.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let grace_over = async {
                match away_until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = grace_over => {
                    tracing::info!(session = %self.id, "not resumed within the grace; session ends");
                    return Ok(());
                }
                Some(r) = reattach => {
                    if away_until.take().is_none()
                        && let Some(old) = live.out.take()
                    {
                        let _ = old.try_send(Err(Status::aborted(
                            "the session was resumed by another call",
                        )));
                    }
                    tracing::info!(session = %self.id, after = r.after, "session resumed");
                    live.out = Some(r.out);
                    inbound = Some(r.inbound);
                    // The idle timeout counts from the resumed call, not the dropped one.
                    last_audio = tokio::time::Instant::now();
                    let replay: Vec<StreamingRecognizeResponse> = live
                        .history
                        .iter()
                        .filter(|h| h.results.iter().any(|x| x.result_index > r.after))
                        .cloned()
                        .collect();
                    let hello = StreamingRecognizeResponse {
                        session_id: self.id.to_string(),
                        ..Default::default()
                    };
                    for m in std::iter::once(hello).chain(replay) {
                        if let Some(o) = &live.out && o.send(Ok(m)).await.is_err() {
                            live.out = None;
                        }
                    }
                }
                msg = next_msg, if !live.input_done => {
                    match msg {
                        Ok(Some(m)) => match m.streaming_request {
                            Some(StreamingRequest::AudioContent(bytes)) => {
                                last_audio = tokio::time::Instant::now();
                                let mut samples = decoder.push(&bytes).map_err(|e| Status::invalid_argument(format!("audio at {} ms: {e}", ms(live.processed))))?;
                                let room = max_samples.saturating_sub(live.processed);
                                if samples.len() as u64 >= room {
                                    samples.truncate(room as usize);
                                    self.feed(live, &samples).await?;
                                    tracing::info!(session = %self.id, "session reached its maximum length");
                                    deadline = Some(self.end_input_with(live, Status::out_of_range(format!(
                                        "the session reached its maximum length of {} min (--max-session-minutes); its last final was delivered; open a new session to go on",
                                        self.inner.cfg.max_session.as_secs() / 60
                                    ))).await?);
                                } else {
                                    self.feed(live, &samples).await?;
                                }
                            }
                            Some(StreamingRequest::Control(c)) => {
                                last_audio = tokio::time::Instant::now();
                                self.control(live, c.action()).await?;
                            }
                            Some(_) => return Err(Status::invalid_argument(
                                "streaming_config and resume belong in the first message only; later messages carry audio_content or control",
                            )),
                            None => return Err(Status::invalid_argument("a message with no content; send audio_content or control")),
                        },
                        Ok(None) => {
                            let tail = decoder.finish().map_err(Status::invalid_argument)?;
                            self.feed(live, &tail).await?;
                            self.end_input(live).await?;
                            deadline = Some(tokio::time::Instant::now() + self.inner.cfg.final_timeout);
                        }
                        Err(status) => {
                            // The client went away; it may resume.
                            tracing::info!(session = %self.id, error = %status, "client stream broke");
                            inbound = None;
                        }
                    }
                }
                _ = out_closed => {
                    tracing::info!(session = %self.id, "client closed its response stream");
                    live.out = None;
                }
                r = results.recv() => {
                    match r {
                        Some(Ok((_, msg))) => self.on_result(live, msg).await?,
                        Some(Err(e)) => return Err(Status::unavailable(format!(
                            "results of session {} cannot be read ({e}); retry, resuming after result_index {}", self.id, live.result_index
                        ))),
                        None => return Err(Status::internal("the results reader stopped")),
                    }
                }
                _ = renew.tick() => {
                    let holder = Holder { tenant: &self.tenant, id: self.id.as_str() };
                    if let Err(e) = self.inner.bus.lease(&pool, holder, lease_ttl, self.inner.cfg.pool_reserve).await {
                        tracing::warn!(session = %self.id, error = %e, "renewing the session's slot failed");
                    }
                }
                _ = idle_for => {
                    tracing::info!(session = %self.id, ?idle, "no audio within the idle timeout; finishing the session");
                    deadline = Some(self.end_input_with(live, Status::deadline_exceeded(format!(
                        "no audio for {} ms (the idle timeout, --idle-timeout-ms); the session ended after its last final",
                        idle.as_millis()
                    ))).await?);
                }
                _ = shutdown.cancelled(), if !live.input_done => {
                    tracing::info!(session = %self.id, "server draining: finishing the session");
                    self.end_input(live).await?;
                    deadline = Some(tokio::time::Instant::now() + self.inner.cfg.final_timeout.min(self.inner.cfg.drain_grace));
                }
                _ = wait_final => {
                    let missing: Vec<u64> = live.expected_finals.difference(&live.finals).copied().collect();
                    if missing.is_empty() && !live.speech_pending.is_empty() {
                        return Err(Status::deadline_exceeded(format!(
                            "segments {:?} were not spoken within {:?}; the vocoder stage (--codec) may be down or overloaded",
                            live.speech_pending, self.inner.cfg.final_timeout
                        )));
                    }
                    return Err(Status::deadline_exceeded(format!(
                        "segments {missing:?} got no final result within {:?} after the audio ended; the decoder stage may be down or overloaded",
                        self.inner.cfg.final_timeout
                    )));
                }
            }
        }
    }

    /// Sends a response; a client that went away is noted (it may resume),
    /// and responses with results are kept for it.
    async fn respond(&self, live: &mut Live, r: StreamingRecognizeResponse) -> Result<(), Status> {
        if !r.results.is_empty() {
            if live.history.len() == HISTORY {
                live.history.pop_front();
            }
            live.history.push_back(r.clone());
        }
        if let Some(out) = &live.out
            && out.send(Ok(r)).await.is_err()
        {
            live.out = None;
        }
        Ok(())
    }

    /// Runs the VAD over new samples and acts on endpoint events.
    async fn feed(&self, live: &mut Live, samples: &[f32]) -> Result<(), Status> {
        if live.input_done {
            return Ok(());
        }
        live.audio.extend_from_slice(samples);
        live.vad_pending.extend_from_slice(samples);
        live.processed += samples.len() as u64;
        let whole = live.vad_pending.len() / CHUNK * CHUNK;
        let chunks: Vec<Vec<f32>> = live.vad_pending[..whole]
            .chunks(CHUNK)
            .map(<[f32]>::to_vec)
            .collect();
        live.vad_pending.drain(..whole);
        for chunk in chunks {
            let p = self
                .inner
                .vad
                .step(&mut [&mut live.vad], &[&chunk])
                .map_err(|e| Status::internal(format!("voice activity detection failed: {e}")))?[0];
            if let Some(ev) = live.endpointer.push(p) {
                self.on_event(live, ev).await?;
                if live.input_done {
                    return Ok(());
                }
            }
        }
        // Outside an utterance only the pre-roll and a final's lead are needed.
        if !live.endpointer.in_speech() {
            let lead_ms = self.inner.cfg.final_lead.as_millis() as usize;
            let keep = (self.endpoint.pre_roll_ms as usize + lead_ms + 1_000)
                * MODEL_SAMPLE_RATE as usize
                / 1000;
            if live.audio.len() > keep * 2 {
                let drop = live.audio.len() - keep;
                live.audio.drain(..drop);
                live.base += drop as u64;
            }
        }
        Ok(())
    }

    /// A client's turn control: COMMIT ends the utterance in progress at the
    /// audio so far, CLEAR drops it (results of its interims that are still
    /// on their way are not shown).
    async fn control(&self, live: &mut Live, action: Action) -> Result<(), Status> {
        let (event, segment) = match action {
            Action::Commit => match live.endpointer.commit() {
                Some(ev) => return self.on_event(live, ev).await,
                None => (SpeechEvent::NothingToCommit, 0),
            },
            Action::Clear => {
                let dropped = live.endpointer.clear();
                // Cleared audio is no final's lead either.
                live.spoken_until = live.processed;
                if let Some(seg) = dropped {
                    live.finals.insert(seg);
                    live.agreement.remove(&seg);
                    live.sent.retain(|(s, _), _| *s != seg);
                }
                (SpeechEvent::AudioCleared, dropped.unwrap_or_default())
            }
            Action::Unspecified => {
                return Err(Status::invalid_argument(
                    "control.action is unspecified; use COMMIT or CLEAR",
                ));
            }
        };
        self.respond(
            live,
            StreamingRecognizeResponse {
                session_id: self.id.to_string(),
                speech_event: event as i32,
                speech_event_ms: ms(live.processed),
                speech_event_segment_id: segment,
                ..Default::default()
            },
        )
        .await
    }

    async fn end_input(&self, live: &mut Live) -> Result<(), Status> {
        if let Some(ev) = live.endpointer.finish() {
            self.on_event(live, ev).await?;
        }
        live.input_done = true;
        Ok(())
    }

    /// The server ends the input (idle, maximum length): the utterance in
    /// progress is finalised, and once its final is delivered the session ends
    /// with `status`. Returns the deadline for the finals.
    async fn end_input_with(
        &self,
        live: &mut Live,
        status: Status,
    ) -> Result<tokio::time::Instant, Status> {
        live.end_status = Some(status);
        self.end_input(live).await?;
        Ok(tokio::time::Instant::now() + self.inner.cfg.final_timeout)
    }

    async fn on_event(&self, live: &mut Live, ev: EndpointEvent) -> Result<(), Status> {
        match ev {
            EndpointEvent::Started { segment, start } => {
                self.respond(
                    live,
                    StreamingRecognizeResponse {
                        session_id: self.id.to_string(),
                        speech_event: SpeechEvent::SpeechStarted as i32,
                        speech_event_ms: ms(start),
                        speech_event_segment_id: segment,
                        ..Default::default()
                    },
                )
                .await
            }
            EndpointEvent::Interim {
                segment,
                start,
                end,
            } => {
                if self.cfg.interim_results {
                    self.publish(live, segment, start, end, false).await?;
                }
                Ok(())
            }
            EndpointEvent::Ended {
                segment,
                start,
                end,
                ..
            } => {
                self.publish(live, segment, start, end, true).await?;
                self.respond(
                    live,
                    StreamingRecognizeResponse {
                        session_id: self.id.to_string(),
                        speech_event: SpeechEvent::EndOfUtterance as i32,
                        speech_event_ms: ms(end),
                        speech_event_segment_id: segment,
                        ..Default::default()
                    },
                )
                .await?;
                if self.cfg.single_utterance {
                    live.input_done = true;
                }
                Ok(())
            }
        }
    }

    /// Sends one window of an utterance to the encoder stage. Interim windows are
    /// best effort; a final one waits out backpressure and outages up to the
    /// session's bus budget, then fails the session with a retryable error.
    /// By default each utterance is decoded on its own audio, without earlier
    /// text as a prompt: conditioning on live finals spread a misrecognition
    /// into later utterances in our tests (see BENCHMARKS.md); a config with
    /// `decoding.condition_on_previous_text` gets the finals so far.
    async fn publish(
        &self,
        live: &mut Live,
        segment: u64,
        start: u64,
        end: u64,
        is_final: bool,
    ) -> Result<(), Status> {
        let a = start.saturating_sub(live.base) as usize;
        let b = (end.saturating_sub(live.base) as usize).min(live.audio.len());
        if a >= b {
            return Ok(());
        }
        if !is_final {
            let audio = live.audio[a..b].to_vec();
            return self
                .send(live, segment, start, 0, 0, end, audio, false)
                .await;
        }
        live.expected_finals.insert(segment);
        // A final's window starts up to the lead earlier, in the quiet
        // before the utterance (never inside the previous one): Whisper
        // misreads words that begin right at a window's start.
        let lead =
            self.inner.cfg.final_lead.as_millis() as u64 * u64::from(MODEL_SAMPLE_RATE) / 1000;
        let from = start
            .saturating_sub(lead)
            .max(live.spoken_until)
            .min(start)
            .max(live.base);
        live.spoken_until = end;
        // An utterance at the stream's start has no audio before it: digital
        // silence stands in, at most half a second (longer runs of zeros
        // made base repeat itself), in whole ms so times stay exact.
        let silence = if from == 0 {
            lead.saturating_sub(start)
                .min(MAX_SILENCE_MS * SAMPLES_PER_MS)
                / SAMPLES_PER_MS
                * SAMPLES_PER_MS
        } else {
            0
        };
        let mut audio = vec![0.0; silence as usize];
        audio.extend_from_slice(&live.audio[(from - live.base) as usize..b]);
        if let (Some(sp), Some(encoder)) = (live.speakers.as_mut(), self.inner.speaker.clone()) {
            let diarizer = sp.diarizer.clone();
            let utterance = audio[(silence + start.saturating_sub(from)) as usize..].to_vec();
            sp.pending.insert(
                segment,
                tokio::task::spawn_blocking(move || {
                    let mut d = diarizer
                        .lock()
                        .map_err(|_| "the diarizer panicked".to_owned())?;
                    d.label(&encoder, &utterance, 0..utterance.len(), start as usize)
                        .map_err(|e| e.to_string())
                }),
            );
        }
        self.send(live, segment, from, silence, start - from, end, audio, true)
            .await
    }

    /// Sends the window `start..end` after `silence` samples of zeros (both
    /// in `audio`); the utterance begins `lead` samples after `start`.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        live: &mut Live,
        segment: u64,
        start: u64,
        silence: u64,
        lead: u64,
        end: u64,
        audio: Vec<f32>,
        is_final: bool,
    ) -> Result<(), Status> {
        let rev = live.revisions.entry(segment).or_insert(0);
        *rev += 1;
        let revision = *rev;
        live.sequence += 1;
        live.sent
            .insert((segment, revision), std::time::Instant::now());
        // Each window is a child of the session; the stages' spans follow it.
        let span = tracing::info_span!(
            "segment",
            session.id = %self.id,
            segment,
            revision,
            is_final,
            audio_ms = ms(end.saturating_sub(start)),
        );
        let mut pcm = Vec::with_capacity(audio.len() * 4);
        for s in &audio {
            pcm.extend_from_slice(&s.to_le_bytes());
        }
        let msg = AudioSegment {
            envelope: Some(Envelope {
                session_id: self.id.to_string(),
                segment_id: segment,
                sequence: live.sequence,
                revision,
                emitted_unix_ms: now_unix_ms(),
                tenant: self.tenant.clone(),
                trace: nexus_core::trace::context_of(&span),
                live: true,
            }),
            config: Some(self.rc.clone()),
            start_ms: ms(start),
            end_ms: ms(end),
            lead_ms: silence / SAMPLES_PER_MS + ms(start + lead) - ms(start),
            silence_ms: silence / SAMPLES_PER_MS,
            sample_rate_hz: MODEL_SAMPLE_RATE,
            pcm_f32le: pcm.into(),
            is_final,
            previous_text: if is_final {
                live.previous_text.clone()
            } else {
                String::new()
            },
            translation_context: if is_final {
                live.translation_context.iter().cloned().collect()
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        let fields: nexus_bus::Fields = encode(&msg)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let stream = stages::stream(&self.inner.cfg.fleet.keys, stages::AUDIO);
        let limits = self.inner.cfg.fleet.limits;
        let bus = &self.inner.bus;
        if !is_final {
            if let Err(e) = bus.add(&stream, fields, limits).await {
                tracing::debug!(session = %self.id, error = %e, "interim window dropped");
            }
            return Ok(());
        }
        match self.inner.queue_audio(fields).await {
            Ok(()) => Ok(()),
            Err(BusError::Full { backlog, .. }) => Err(Status::resource_exhausted(format!(
                "the encoder stage is {backlog} segments behind; segment {segment} could not be queued within {:?}",
                self.inner.cfg.bus_retry
            ))),
            Err(e) => Err(Status::unavailable(format!(
                "segment {segment} ({} - {} ms) could not be queued: {e}; retry the session",
                ms(start),
                ms(end)
            ))),
        }
    }

    async fn on_result(&self, live: &mut Live, msg: DecodeResult) -> Result<(), Status> {
        if let Some(sp) = msg.speech {
            // A piece of a final's spoken reply, forwarded once, in arrival order.
            if !live.speech_seen.insert((sp.segment_id, sp.chunk)) {
                return Ok(());
            }
            if sp.is_last {
                live.speech_pending.remove(&sp.segment_id);
            }
            if !sp.error.is_empty() {
                tracing::warn!(session = %self.id, segment = sp.segment_id, error = %sp.error, "segment not spoken");
            }
            return self
                .respond(
                    live,
                    StreamingRecognizeResponse {
                        session_id: self.id.to_string(),
                        speech_audio: Some(sp),
                        ..Default::default()
                    },
                )
                .await;
        }
        live.result_index += 1;
        let env = msg.envelope.clone().unwrap_or_default();
        let key = (env.segment_id, env.revision);
        if !live.seen.insert(key) {
            return Ok(());
        }
        let Some(mut r) = msg.result else {
            if !msg.error.is_empty() {
                let final_ = live.revisions.get(&env.segment_id) == Some(&env.revision)
                    && live.expected_finals.contains(&env.segment_id);
                if final_ {
                    return Err(Status::internal(format!(
                        "segment {} could not be decoded: {}",
                        env.segment_id, msg.error
                    )));
                }
                tracing::debug!(session = %self.id, error = %msg.error, "interim failed");
            }
            return Ok(());
        };
        if !msg.error.is_empty() && r.is_final {
            return Err(Status::internal(format!(
                "segment {}: {}",
                env.segment_id, msg.error
            )));
        }
        if let Some(t) = live.sent.remove(&key) {
            self.inner
                .metrics
                .caption(r.is_final, t.elapsed().as_secs_f64());
        }
        r.result_index = live.result_index;
        r.speaker = self.cfg.speaker_label.clone();
        if r.is_final
            && let Some(task) = live
                .speakers
                .as_mut()
                .and_then(|s| s.pending.remove(&r.segment_id))
        {
            match task.await {
                Ok(Ok(turns)) => crate::speakers::label_live(&mut r, &turns),
                Ok(Err(e)) => tracing::warn!(session = %self.id, error = %e, "final not diarized"),
                Err(e) => tracing::warn!(session = %self.id, error = %e, "final not diarized"),
            }
        }
        r.audio_processed_ms = ms(live.processed);
        if r.is_final {
            live.sent.retain(|(segment, _), _| *segment != r.segment_id);
            live.finals.insert(r.segment_id);
            live.agreement.remove(&r.segment_id);
            let Some(best) = r.alternatives.first() else {
                return Ok(());
            };
            if crate::conditions_on_previous_text(&self.rc) {
                let joined = format!("{} {}", live.previous_text, best.transcript);
                live.previous_text = crate::previous_text_tail(&joined);
            }
            if self.rc.task == nexus_proto::speech::Task::Translate as i32
                && !best.transcript.trim().is_empty()
            {
                live.translation_context
                    .push_back(crate::previous_text_tail(best.transcript.trim()));
                while live.translation_context.len() > nexus_models::qwen::prompt::MAX_CONTEXT {
                    live.translation_context.pop_front();
                }
            }
            let speaks = self.rc.speech_output.as_ref().is_some_and(|s| s.enabled);
            if speaks && !live.speech_seen.iter().any(|(s, _)| *s == r.segment_id) {
                live.speech_pending.insert(r.segment_id);
            }
        } else {
            let newer = live
                .shown_revision
                .get(&r.segment_id)
                .is_some_and(|s| *s >= r.revision);
            if live.finals.contains(&r.segment_id) || newer {
                return Ok(());
            }
            live.shown_revision.insert(r.segment_id, r.revision);
            let Some(alt) = r.alternatives.first_mut() else {
                return Ok(());
            };
            let (text, stability) = live
                .agreement
                .entry(r.segment_id)
                .or_default()
                .update(&alt.transcript);
            alt.transcript = text;
            r.stability = stability;
        }
        self.respond(
            live,
            StreamingRecognizeResponse {
                session_id: self.id.to_string(),
                results: vec![r],
                ..Default::default()
            },
        )
        .await
    }
}

/// Reads the session's result log as it grows and hands entries to the session.
pub(crate) async fn follow<B: Bus, M: nexus_bus::StreamMessage + Send + 'static>(
    bus: B,
    log: String,
    budget: Duration,
    tx: mpsc::Sender<Result<(EntryId, M), String>>,
    stop: CancellationToken,
) {
    let mut after = None;
    loop {
        let read = tokio::select! {
            r = retry("read results", budget, &stop, || bus.read_after(&log, after, 64, Duration::from_millis(500))) => r,
            _ = stop.cancelled() => return,
        };
        match read {
            Ok(entries) => {
                for e in entries {
                    after = Some(e.id);
                    match decode::<M>(&e.fields) {
                        Ok(m) => {
                            if tx.send(Ok((e.id, m))).await.is_err() {
                                return;
                            }
                        }
                        Err(err) => {
                            tracing::error!(log, id = %e.id, error = %err, "unreadable result skipped")
                        }
                    }
                }
            }
            Err(e) => {
                if !stop.is_cancelled() {
                    let _ = tx.send(Err(e.to_string())).await;
                }
                return;
            }
        }
    }
}
