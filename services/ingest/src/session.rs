//! One live session: audio in, segments out to the encoder stage, results
//! back from the session's log, until the client half-closes (or a single
//! utterance ends, or the server drains) and every final has arrived.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use nexus_audio::{EndpointConfig, EndpointEvent, Endpointer, MODEL_SAMPLE_RATE};
use nexus_bus::{Bus, BusError, EntryId, SessionId, decode, encode};
use nexus_fleet::{now_unix_ms, retry, stages};
use nexus_models::vad::{CHUNK, VadState};
use nexus_proto::pipeline::{AudioSegment, DecodeResult, Envelope};
use nexus_proto::speech::streaming_recognize_request::StreamingRequest;
use nexus_proto::speech::{
    RecognitionConfig, SpeechEvent, StreamingRecognitionConfig, StreamingRecognizeRequest,
    StreamingRecognizeResponse,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

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
    /// Held while the session runs; returned to the ingest's bound on drop.
    pub(crate) _local: tokio::sync::OwnedSemaphorePermit,
}

type Out = mpsc::Sender<Result<StreamingRecognizeResponse, Status>>;

struct Live {
    endpointer: Endpointer,
    vad: VadState,
    vad_pending: Vec<f32>,
    /// Audio from sample `base` on.
    audio: Vec<f32>,
    base: u64,
    sequence: u64,
    revisions: HashMap<u64, u32>,
    expected_finals: BTreeSet<u64>,
    finals: BTreeSet<u64>,
    seen: HashSet<(u64, u32)>,
    shown_revision: HashMap<u64, u32>,
    agreement: HashMap<u64, Agreement>,
    result_index: u64,
    processed: u64,
    input_done: bool,
}

fn ms(samples: u64) -> u64 {
    samples * 1000 / u64::from(MODEL_SAMPLE_RATE)
}

impl<B: Bus> Session<B> {
    /// Runs the session to its end, sending responses on `out`.
    /// `decoder` is kept out of `self`: it is not `Sync`, and the session is
    /// borrowed across awaits.
    pub async fn run(
        self,
        mut decoder: AudioIn,
        mut inbound: Streaming<StreamingRecognizeRequest>,
        out: Out,
    ) {
        let id = self.id.clone();
        let pool = self.inner.cfg.fleet.keys.pool(stages::DECODER_POOL);
        let stop = CancellationToken::new();
        let (res_tx, mut res_rx) = mpsc::channel::<Result<(EntryId, DecodeResult), String>>(256);
        let follower = tokio::spawn(follow(
            self.inner.bus.clone(),
            self.inner.cfg.fleet.keys.results(&id),
            self.inner.cfg.bus_retry,
            res_tx,
            stop.clone(),
        ));
        let r = self
            .drive(&mut decoder, &mut inbound, &out, &mut res_rx)
            .await;
        stop.cancel();
        let _ = follower.await;
        if let Err(e) = self.inner.bus.release(&pool, id.as_str()).await {
            tracing::warn!(session = %id, error = %e, "releasing the session's slot failed; its lease expires");
        }
        match r {
            Ok(()) => tracing::info!(session = %id, "session ended"),
            Err(status) => {
                tracing::warn!(session = %id, code = ?status.code(), message = status.message(), "session failed");
                let _ = out.send(Err(status)).await;
            }
        }
    }

    async fn drive(
        &self,
        decoder: &mut AudioIn,
        inbound: &mut Streaming<StreamingRecognizeRequest>,
        out: &Out,
        results: &mut mpsc::Receiver<Result<(EntryId, DecodeResult), String>>,
    ) -> Result<(), Status> {
        let mut live = Live {
            endpointer: Endpointer::new(self.endpoint.clone(), MODEL_SAMPLE_RATE),
            vad: VadState::default(),
            vad_pending: Vec::new(),
            audio: Vec::new(),
            base: 0,
            sequence: 0,
            revisions: HashMap::new(),
            expected_finals: BTreeSet::new(),
            finals: BTreeSet::new(),
            seen: HashSet::new(),
            shown_revision: HashMap::new(),
            agreement: HashMap::new(),
            result_index: 0,
            processed: 0,
            input_done: false,
        };
        self.respond(
            out,
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
        loop {
            if live.input_done && live.expected_finals.is_subset(&live.finals) {
                self.respond(
                    out,
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
            tokio::select! {
                msg = inbound.message(), if !live.input_done => {
                    match msg {
                        Ok(Some(m)) => match m.streaming_request {
                            Some(StreamingRequest::AudioContent(bytes)) => {
                                let samples = decoder.push(&bytes).map_err(|e| Status::invalid_argument(format!("audio at {} ms: {e}", ms(live.processed))))?;
                                self.feed(&mut live, &samples, out).await?;
                            }
                            Some(_) => return Err(Status::invalid_argument(
                                "streaming_config and resume belong in the first message only; later messages carry audio_content",
                            )),
                            None => return Err(Status::invalid_argument("a message with no content; send audio_content")),
                        },
                        Ok(None) => {
                            let tail = decoder.finish().map_err(Status::invalid_argument)?;
                            self.feed(&mut live, &tail, out).await?;
                            self.end_input(&mut live, out).await?;
                            deadline = Some(tokio::time::Instant::now() + self.inner.cfg.final_timeout);
                        }
                        Err(status) => {
                            // The client went away: nobody is left to read results.
                            tracing::info!(session = %self.id, error = %status, "client stream broke");
                            return Ok(());
                        }
                    }
                }
                r = results.recv() => {
                    match r {
                        Some(Ok((_, msg))) => self.on_result(&mut live, msg, out).await?,
                        Some(Err(e)) => return Err(Status::unavailable(format!(
                            "results of session {} cannot be read ({e}); retry, resuming after result_index {}", self.id, live.result_index
                        ))),
                        None => return Err(Status::internal("the results reader stopped")),
                    }
                }
                _ = renew.tick() => {
                    if let Err(e) = self.inner.bus.lease(&pool, self.id.as_str(), lease_ttl).await {
                        tracing::warn!(session = %self.id, error = %e, "renewing the session's slot failed");
                    }
                }
                _ = shutdown.cancelled(), if !live.input_done => {
                    tracing::info!(session = %self.id, "server draining: finishing the session");
                    self.end_input(&mut live, out).await?;
                    deadline = Some(tokio::time::Instant::now() + self.inner.cfg.final_timeout.min(self.inner.cfg.drain_grace));
                }
                _ = wait_final => {
                    let missing: Vec<u64> = live.expected_finals.difference(&live.finals).copied().collect();
                    return Err(Status::deadline_exceeded(format!(
                        "segments {missing:?} got no final result within {:?} after the audio ended; the decoder stage may be down or overloaded",
                        self.inner.cfg.final_timeout
                    )));
                }
            }
        }
    }

    async fn respond(&self, out: &Out, r: StreamingRecognizeResponse) -> Result<(), Status> {
        out.send(Ok(r))
            .await
            .map_err(|_| Status::cancelled("the client went away"))
    }

    /// Runs the VAD over new samples and acts on endpoint events.
    async fn feed(&self, live: &mut Live, samples: &[f32], out: &Out) -> Result<(), Status> {
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
                self.on_event(live, ev, out).await?;
                if live.input_done {
                    return Ok(());
                }
            }
        }
        // Outside an utterance only the pre-roll is needed.
        if !live.endpointer.in_speech() {
            let keep =
                (self.endpoint.pre_roll_ms as usize + 1_000) * MODEL_SAMPLE_RATE as usize / 1000;
            if live.audio.len() > keep * 2 {
                let drop = live.audio.len() - keep;
                live.audio.drain(..drop);
                live.base += drop as u64;
            }
        }
        Ok(())
    }

    async fn end_input(&self, live: &mut Live, out: &Out) -> Result<(), Status> {
        if let Some(ev) = live.endpointer.finish() {
            self.on_event(live, ev, out).await?;
        }
        live.input_done = true;
        Ok(())
    }

    async fn on_event(&self, live: &mut Live, ev: EndpointEvent, out: &Out) -> Result<(), Status> {
        match ev {
            EndpointEvent::Started { start, .. } => {
                self.respond(
                    out,
                    StreamingRecognizeResponse {
                        session_id: self.id.to_string(),
                        speech_event: SpeechEvent::SpeechStarted as i32,
                        speech_event_ms: ms(start),
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
                    out,
                    StreamingRecognizeResponse {
                        session_id: self.id.to_string(),
                        speech_event: SpeechEvent::EndOfUtterance as i32,
                        speech_event_ms: ms(end),
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
    /// Each utterance is decoded on its own audio, without earlier text as a
    /// prompt: conditioning on live finals spread a misrecognition into later
    /// utterances in our tests (see BENCHMARKS.md).
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
        let audio = live.audio[a..b].to_vec();
        if !is_final {
            return self.send(live, segment, start, end, audio, false).await;
        }
        live.expected_finals.insert(segment);
        self.send(live, segment, start, end, audio, true).await
    }

    async fn send(
        &self,
        live: &mut Live,
        segment: u64,
        start: u64,
        end: u64,
        audio: Vec<f32>,
        is_final: bool,
    ) -> Result<(), Status> {
        let rev = live.revisions.entry(segment).or_insert(0);
        *rev += 1;
        let revision = *rev;
        live.sequence += 1;
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
                ..Default::default()
            }),
            config: Some(self.rc.clone()),
            start_ms: ms(start),
            end_ms: ms(end),
            sample_rate_hz: MODEL_SAMPLE_RATE,
            pcm_f32le: pcm.into(),
            is_final,
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
        let never = CancellationToken::new();
        let budget = self.inner.cfg.bus_retry;
        let t0 = std::time::Instant::now();
        loop {
            let left = budget.saturating_sub(t0.elapsed());
            match retry("publish final segment", left, &never, || {
                bus.add(&stream, fields.clone(), limits)
            })
            .await
            {
                Ok(_) => return Ok(()),
                Err(BusError::Full { backlog, .. }) if t0.elapsed() < budget => {
                    tracing::debug!(session = %self.id, backlog, "audio stage full; waiting");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(BusError::Full { backlog, .. }) => {
                    return Err(Status::resource_exhausted(format!(
                        "the encoder stage is {backlog} segments behind; segment {segment} could not be queued within {budget:?}"
                    )));
                }
                Err(e) => {
                    return Err(Status::unavailable(format!(
                        "segment {segment} ({} - {} ms) could not be queued: {e}; retry the session",
                        ms(start),
                        ms(end)
                    )));
                }
            }
        }
    }

    async fn on_result(&self, live: &mut Live, msg: DecodeResult, out: &Out) -> Result<(), Status> {
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
        r.result_index = live.result_index;
        r.speaker = self.cfg.speaker_label.clone();
        r.audio_processed_ms = ms(live.processed);
        if r.is_final {
            live.finals.insert(r.segment_id);
            live.agreement.remove(&r.segment_id);
            if r.alternatives.is_empty() {
                return Ok(());
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
            out,
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
pub(crate) async fn follow<B: Bus>(
    bus: B,
    log: String,
    budget: Duration,
    tx: mpsc::Sender<Result<(EntryId, DecodeResult), String>>,
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
                    match decode::<DecodeResult>(&e.fields) {
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
