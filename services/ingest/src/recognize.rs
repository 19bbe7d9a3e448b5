//! Whole-audio recognition on the live fleet. The audio is decoded, the Silero
//! VAD and the live endpointer find its speech, and neighbouring utterances are
//! packed into windows of at most 30 s (silence between them is never sent).
//! The windows go to the encoder stage as final segments of a one-off session,
//! a few at a time so one long file cannot flood the stages that live sessions
//! share, and come back as timed segments from the session's result log.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use nexus_audio::{
    AudioLimits, EndpointConfig, EndpointEvent, Endpointer, MODEL_SAMPLE_RATE, PcmSpec,
};
use nexus_bus::{Bus, BusError, EntryId, Holder, SessionId, encode};
use nexus_fleet::{now_unix_ms, stages};
use nexus_proto::pipeline::{AudioSegment, DecodeResult, Envelope};
use nexus_proto::speech::recognize_request::AudioSource;
use nexus_proto::speech::{
    AudioEncoding, RecognitionConfig, RecognizeRequest, RecognizeResponse, SpeechRecognitionResult,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{Ingest, invalid};

/// Longest window the models take, in samples.
const WINDOW: u64 = 30 * MODEL_SAMPLE_RATE as u64;

/// Windows of one request in the stages at once.
const IN_FLIGHT: usize = 4;

/// Speech windows of one channel: utterances as the live endpointer cuts them
/// from per-frame voice probabilities, packed while a window stays within 30 s.
/// Positions are samples.
pub(crate) fn windows(probs: &[f32], samples: u64) -> Vec<(u64, u64)> {
    let cfg = EndpointConfig {
        max_utterance_ms: 29_000,
        interim_interval_ms: 0,
        ..EndpointConfig::default()
    };
    let mut ep = Endpointer::new(cfg, MODEL_SAMPLE_RATE);
    let mut utterances = Vec::new();
    let mut on = |ev| {
        if let Some(EndpointEvent::Ended { start, end, .. }) = ev {
            utterances.push((start, end.min(samples)));
        }
    };
    for p in probs {
        on(ep.push(*p));
    }
    on(ep.finish());
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in utterances.into_iter().filter(|(s, e)| e > s) {
        match out.last_mut() {
            Some(last) if e - last.0 <= WINDOW => last.1 = e,
            _ => out.push((s, e.min(s + WINDOW))),
        }
    }
    // Each window starts up to a lead earlier, in the quiet before its
    // first utterance, as a live final does: Whisper misreads words that
    // begin right at a window's start.
    let mut prev_end = 0;
    for w in &mut out {
        w.0 =
            w.0.saturating_sub(BATCH_LEAD)
                .max(prev_end)
                .max(w.1.saturating_sub(WINDOW))
                .min(w.0);
        prev_end = w.1;
    }
    out
}

/// Audio before a window's first utterance that the window also takes.
const BATCH_LEAD: u64 = MODEL_SAMPLE_RATE as u64;

/// Decodes a request's audio into 16 kHz channels: one, or one per channel when asked.
fn decode_audio(
    bytes: Vec<u8>,
    rc: &RecognitionConfig,
    limits: &AudioLimits,
) -> Result<Vec<Vec<f32>>, String> {
    let fmt = rc.audio_format.unwrap_or_default();
    let enc = AudioEncoding::try_from(fmt.encoding).unwrap_or(AudioEncoding::Unspecified);
    let (channels, rate) = match enc {
        AudioEncoding::LinearPcmS16le
        | AudioEncoding::LinearPcmF32le
        | AudioEncoding::G711Ulaw
        | AudioEncoding::G711Alaw => {
            let (format, sample_rate) = crate::audio_in::raw_samples(&fmt)?;
            let spec = PcmSpec {
                format,
                sample_rate,
                channels: fmt.channels.max(1),
            };
            let ch =
                nexus_audio::pcm::decode_all(&bytes, spec, limits).map_err(|e| e.to_string())?;
            (ch, sample_rate)
        }
        AudioEncoding::OpusPackets => {
            return Err(
                "OPUS_PACKETS is a streaming format; send an Ogg Opus file (OGG_OPUS) or a container"
                    .into(),
            );
        }
        AudioEncoding::OggOpus | AudioEncoding::Container | AudioEncoding::Unspecified => {
            // Containers decode straight to 16 kHz, packet by packet: memory is
            // bounded by the decoded-sample budget, not by the file's native rate.
            let layout = if rc.separate_recognition_per_channel {
                nexus_audio::Layout::PerChannel
            } else {
                nexus_audio::Layout::Mono
            };
            return nexus_audio::decode_to_model_rate(bytes, None, limits, layout)
                .map_err(|e| e.to_string());
        }
    };
    if rc.separate_recognition_per_channel && channels.len() > 1 {
        channels
            .into_iter()
            .map(|c| nexus_audio::to_model_rate(&[c], rate).map_err(|e| e.to_string()))
            .collect()
    } else {
        Ok(vec![
            nexus_audio::to_model_rate(&channels, rate).map_err(|e| e.to_string())?,
        ])
    }
}

/// What a whole-audio request reports while it runs: segments that became
/// final in time order (each window's once every earlier window is done) and
/// how much of the audio is done.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    /// Segments of the windows completed since the last report, in order.
    pub(crate) segments: Vec<SpeechRecognitionResult>,
    /// Audio covered by the completed windows in order, ms (the whole audio at the end).
    pub(crate) processed_ms: u64,
    /// The audio's duration, ms.
    pub(crate) duration_ms: u64,
}

/// A whole-audio request, decoded and planned, ready to run.
pub(crate) struct Prepared {
    pub(crate) rc: RecognitionConfig,
    channels: std::sync::Arc<Vec<Vec<f32>>>,
    plan: Vec<Window>,
    /// Voice probability per VAD frame, per channel.
    probs: Vec<Vec<f32>>,
    pub(crate) duration_ms: u64,
}

/// Voiced audio after a window's last segment that is decoded again.
const REMAINDER_SPEECH_MS: u64 = 1_000;

/// Milliseconds of frames with voice between two sample positions.
fn voiced_ms(probs: &[f32], from: u64, to: u64) -> u64 {
    let frame = nexus_models::vad::CHUNK as u64;
    let (a, b) = ((from / frame) as usize, (to.div_ceil(frame)) as usize);
    let voiced = probs
        .get(a..b.min(probs.len()))
        .map_or(0, |p| p.iter().filter(|p| **p >= 0.5).count()) as u64;
    voiced * frame * 1000 / u64::from(MODEL_SAMPLE_RATE)
}

/// The text of the latest decoded window before `w` on its channel, as a prompt.
fn text_before(
    plan: &[Window],
    done: &HashMap<usize, Vec<SpeechRecognitionResult>>,
    w: &Window,
) -> String {
    let before = done
        .iter()
        .filter(|(i, _)| plan[**i].channel_tag == w.channel_tag && plan[**i].start < w.start)
        .max_by_key(|(i, _)| plan[**i].start);
    let text: Vec<&str> = before
        .into_iter()
        .flat_map(|(_, segs)| segs)
        .filter_map(|s| s.alternatives.first())
        .map(|a| a.transcript.as_str())
        .collect();
    crate::previous_text_tail(&text.join(" "))
}

/// One window on its way through the stages.
#[derive(Clone)]
struct Window {
    channel_tag: u32,
    start: u64,
    end: u64,
}

impl<B: Bus> Ingest<B> {
    /// Serves one Recognize call.
    pub(crate) async fn recognize_audio(
        &self,
        req: RecognizeRequest,
        tenant: String,
    ) -> Result<RecognizeResponse, Status> {
        let prepared = self.prepare(req).await?;
        self.recognize_prepared(prepared, &tenant, None).await
    }

    /// Validates a request, reads and decodes its audio and plans its windows.
    pub(crate) async fn prepare(&self, req: RecognizeRequest) -> Result<Prepared, Status> {
        let mut rc = req.config.ok_or_else(|| invalid("config is required"))?;
        self.check_config(&mut rc).await?;
        let bytes = match req.audio_source {
            Some(AudioSource::Content(b)) if b.is_empty() => {
                return Err(invalid("content is empty; send the audio file's bytes"));
            }
            Some(AudioSource::Content(b)) => b.to_vec(),
            Some(AudioSource::Uri(u)) => self.read_uri(&u).await?,
            None => {
                return Err(invalid("no audio: set content (the file's bytes) or uri"));
            }
        };
        self.prepare_bytes(rc, bytes).await
    }

    /// Decodes checked audio bytes and plans their windows.
    pub(crate) async fn prepare_bytes(
        &self,
        rc: RecognitionConfig,
        bytes: Vec<u8>,
    ) -> Result<Prepared, Status> {
        let inner = self.inner.clone();
        inner
            .limits
            .check_bytes(bytes.len() as u64)
            .map_err(|e| invalid(e.to_string()))?;
        let (cfg, limits) = (rc.clone(), inner.limits.clone());
        let channels = inner
            .in_background(move || decode_audio(bytes, &cfg, &limits))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| invalid(format!("the audio could not be read: {e}")))?;
        let duration_ms = channels.iter().map(Vec::len).max().unwrap_or(0) as u64 * 1000
            / u64::from(MODEL_SAMPLE_RATE);
        let vad = inner.vad.clone();
        let (channels, plan, probs) = inner
            .in_background(move || {
                let mut plan = Vec::new();
                let mut all = Vec::new();
                for (i, c) in channels.iter().enumerate() {
                    let probs = vad.probabilities(c).map_err(|e| e.to_string())?;
                    for (start, end) in windows(&probs, c.len() as u64) {
                        plan.push(Window {
                            channel_tag: if channels.len() > 1 { i as u32 + 1 } else { 0 },
                            start,
                            end,
                        });
                    }
                    all.push(probs);
                }
                Ok::<_, String>((channels, plan, all))
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("voice activity detection failed: {e}")))?;
        Ok(Prepared {
            rc,
            channels: std::sync::Arc::new(channels),
            plan,
            probs,
            duration_ms,
        })
    }

    /// Runs a prepared request through the stages, reporting on `progress`.
    pub(crate) async fn recognize_prepared(
        &self,
        p: Prepared,
        tenant: &str,
        progress: Option<mpsc::UnboundedSender<Progress>>,
    ) -> Result<RecognizeResponse, Status> {
        let inner = self.inner.clone();
        let id = SessionId::parse(&uuid::Uuid::new_v4().to_string())
            .map_err(|e| Status::internal(e.to_string()))?;
        let mut results = Vec::new();
        let duration_ms = p.duration_ms;
        if !p.plan.is_empty() {
            self.admit(&id, tenant, &p.rc.model).await?;
            if let Some(tx) = &progress {
                // Admitted: the request holds a decoder slot from here on.
                let _ = tx.send(Progress {
                    segments: Vec::new(),
                    processed_ms: 0,
                    duration_ms,
                });
            }
            // Who spoke when runs beside the decoding of the windows (on the
            // blocking pool, one per admitted request), from the same VAD.
            let diarization = self.start_diarization(&p)?;
            let r = self.run_windows(&id, tenant, &p, progress.as_ref()).await;
            inner.release_slot(&id, tenant).await;
            results = r?;
            if let Some(task) = diarization {
                let who = task
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
                    .map_err(|e| Status::internal(format!("diarization failed: {e}")))?;
                results.sort_by_key(|r| (r.span.as_ref().map_or(0, |s| s.start_ms), r.channel_tag));
                results = crate::speakers::label(results, &who);
            }
        }
        if let Some(p) = &progress {
            let _ = p.send(Progress {
                segments: Vec::new(),
                processed_ms: duration_ms,
                duration_ms,
            });
        }
        results.sort_by_key(|r| (r.span.as_ref().map_or(0, |s| s.start_ms), r.channel_tag));
        let mut votes: HashMap<&str, u64> = HashMap::new();
        for r in &results {
            let span = r.span.unwrap_or_default();
            *votes.entry(r.language.as_str()).or_default() += span.end_ms - span.start_ms;
        }
        let language = votes
            .into_iter()
            .max_by_key(|(_, v)| *v)
            .map(|(l, _)| l.to_owned())
            .unwrap_or_else(|| p.rc.language.clone());
        tracing::info!(request = %id, windows = p.plan.len(), segments = results.len(), duration_ms, "recognized");
        Ok(RecognizeResponse {
            results,
            audio_duration_ms: duration_ms,
            language,
            model: p.rc.model,
            request_id: id.to_string(),
        })
    }

    /// Starts diarizing each channel when the request asks for it.
    #[allow(clippy::type_complexity)]
    fn start_diarization(
        &self,
        p: &Prepared,
    ) -> Result<
        Option<tokio::task::JoinHandle<Result<Vec<nexus_models::speaker::Diarization>, String>>>,
        Status,
    > {
        let Some((count, encoder)) = self.diarization(&p.rc)? else {
            return Ok(None);
        };
        let (channels, probs) = (p.channels.clone(), p.probs.clone());
        Ok(Some(self.inner.in_background(move || {
            let opts = nexus_models::speaker::DiarizeOptions {
                count,
                ..Default::default()
            };
            channels
                .iter()
                .zip(&probs)
                .map(|(c, pr)| {
                    let regions = nexus_models::vad::speech_regions(pr, c.len());
                    nexus_models::speaker::diarize(&encoder, c, &regions, &opts)
                        .map_err(|e| e.to_string())
                })
                .collect()
        })))
    }

    /// Reads a `file://` location under the configured root.
    pub(crate) async fn read_uri(&self, uri: &str) -> Result<Vec<u8>, Status> {
        let full = self.check_uri(uri).await?;
        tokio::fs::read(&full)
            .await
            .map_err(|e| invalid(format!("uri {uri:?}: {e}")))
    }

    /// The file a `file://` location names under `--file-root`, checked to
    /// exist there and to fit the audio limit, without reading it.
    pub(crate) async fn check_uri(&self, uri: &str) -> Result<std::path::PathBuf, Status> {
        let Some(root) = self.inner.cfg.file_root.clone() else {
            return Err(invalid(format!(
                "uri {uri:?}: this server reads no locations; send the audio as content"
            )));
        };
        let Some(path) = uri.strip_prefix("file://") else {
            return Err(invalid(format!(
                "uri {uri:?}: only file:// locations are read here; send the audio as content"
            )));
        };
        let root = tokio::fs::canonicalize(&root)
            .await
            .map_err(|e| Status::internal(format!("file root {}: {e}", root.display())))?;
        let full = tokio::fs::canonicalize(root.join(path.trim_start_matches('/')))
            .await
            .map_err(|e| invalid(format!("uri {uri:?}: {e}")))?;
        if !full.starts_with(&root) {
            return Err(invalid(format!("uri {uri:?} is outside the readable root")));
        }
        let meta = tokio::fs::metadata(&full)
            .await
            .map_err(|e| invalid(format!("uri {uri:?}: {e}")))?;
        self.inner
            .limits
            .check_bytes(meta.len())
            .map_err(|e| invalid(format!("uri {uri:?}: {e}")))?;
        if !meta.is_file() {
            return Err(invalid(format!("uri {uri:?} is not a file")));
        }
        Ok(full)
    }

    /// Sends the windows (a few at a time) and collects their timed segments.
    /// Whisper sometimes ends a window's text early, leaving later speech in
    /// it undecoded; such a remainder (at least [`REMAINDER_SPEECH_MS`] of
    /// voiced audio after the last segment) goes out again as a window of its
    /// own, as offline decoding seeks past its last timestamp.
    async fn run_windows(
        &self,
        id: &SessionId,
        tenant: &str,
        p: &Prepared,
        progress: Option<&mpsc::UnboundedSender<Progress>>,
    ) -> Result<Vec<SpeechRecognitionResult>, Status> {
        let inner = &self.inner;
        let (rc, channels, duration_ms) = (&p.rc, &p.channels, p.duration_ms);
        let mut plan = p.plan.clone();
        let stop = CancellationToken::new();
        let _stop_follower = stop.clone().drop_guard();
        let (tx, mut rx) = mpsc::channel::<Result<(EntryId, DecodeResult), String>>(64);
        tokio::spawn(crate::session::follow(
            inner.bus.clone(),
            inner.cfg.fleet.keys.results(id),
            inner.cfg.bus_retry,
            tx,
            stop.clone(),
        ));
        // Generous: the whole audio at real-time pace, on top of the live budget.
        let deadline =
            Instant::now() + inner.cfg.final_timeout + Duration::from_millis(duration_ms);
        let mut queue: VecDeque<usize> = (0..plan.len()).collect();
        let mut pending: HashSet<usize> = HashSet::new();
        let mut done: HashMap<usize, Vec<SpeechRecognitionResult>> = HashMap::new();
        let mut emitted: HashSet<usize> = HashSet::new();
        let lease_ttl = inner.cfg.lease_ttl;
        let pool = inner.cfg.fleet.keys.pool(stages::DECODER_POOL);
        let mut renew = tokio::time::interval(lease_ttl / 3);
        renew.tick().await;
        let ms = |s: u64| s * 1000 / u64::from(MODEL_SAMPLE_RATE);
        // Conditioning on the text before a window needs that text: windows
        // then go one at a time, in time order, each with its predecessor's text.
        let condition = crate::conditions_on_previous_text(rc);
        let in_flight = if condition { 1 } else { IN_FLIGHT };
        while done.len() < plan.len() {
            while pending.len() < in_flight {
                let Some(next) = queue.pop_front() else { break };
                let w = &plan[next];
                let ch = &channels[w.channel_tag.saturating_sub(1) as usize];
                let previous = if condition {
                    text_before(&plan, &done, w)
                } else {
                    String::new()
                };
                self.publish_window(id, rc, tenant, next as u64, w, ch, previous)
                    .await?;
                pending.insert(next);
            }
            let msg = tokio::select! {
                m = rx.recv() => m,
                _ = renew.tick() => {
                    let holder = Holder { tenant, id: id.as_str() };
                    if let Err(e) = inner.bus.lease(&pool, holder, lease_ttl, inner.cfg.pool_reserve).await {
                        tracing::warn!(request = %id, error = %e, "renewing the request's slot failed");
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    return Err(Status::deadline_exceeded(format!(
                        "{} of {} speech windows were not decoded in time; retry",
                        plan.len() - done.len(),
                        plan.len()
                    )));
                }
            };
            let (_, msg) = match msg {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    return Err(Status::unavailable(format!(
                        "results could not be read: {e}; retry"
                    )));
                }
                None => return Err(Status::internal("the result follower stopped")),
            };
            let env = msg.envelope.clone().unwrap_or_default();
            let index = env.segment_id as usize;
            if !pending.remove(&index) {
                continue; // a redelivered duplicate
            }
            let w = plan[index].clone();
            if !msg.error.is_empty() {
                return Err(Status::internal(format!(
                    "the window at {} - {} ms could not be decoded: {}",
                    ms(w.start),
                    ms(w.end),
                    msg.error
                )));
            }
            let covered = msg
                .segments
                .iter()
                .filter_map(|s| s.span.map(|s| s.end_ms))
                .max()
                .map(|end| end * u64::from(MODEL_SAMPLE_RATE) / 1000);
            if let Some(covered) = covered
                && covered > w.start
                && covered < w.end
            {
                let probs = &p.probs[w.channel_tag.saturating_sub(1) as usize];
                if voiced_ms(probs, covered, w.end) >= REMAINDER_SPEECH_MS {
                    tracing::debug!(request = %id, from_ms = ms(covered), to_ms = ms(w.end), "speech after the window's text; decoding the remainder");
                    plan.push(Window {
                        channel_tag: w.channel_tag,
                        start: covered,
                        end: w.end,
                    });
                    queue.push_front(plan.len() - 1);
                }
            }
            done.insert(index, msg.segments);
            if let Some(tx) = progress {
                // Report the windows that now complete an unbroken run from the start.
                let mut order: Vec<usize> = (0..plan.len()).collect();
                order.sort_by_key(|i| (plan[*i].channel_tag, plan[*i].start));
                let mut segments = Vec::new();
                let mut processed_ms = None;
                for i in order {
                    if emitted.contains(&i) {
                        continue;
                    }
                    let Some(s) = done.get(&i) else { break };
                    segments.extend(s.iter().cloned());
                    processed_ms = Some(ms(plan[i].end));
                    emitted.insert(i);
                }
                if let Some(processed_ms) = processed_ms {
                    let _ = tx.send(Progress {
                        segments,
                        processed_ms: processed_ms.min(duration_ms),
                        duration_ms,
                    });
                }
            }
        }
        Ok(done.into_values().flatten().collect())
    }

    async fn publish_window(
        &self,
        id: &SessionId,
        rc: &RecognitionConfig,
        tenant: &str,
        segment: u64,
        w: &Window,
        channel: &[f32],
        previous_text: String,
    ) -> Result<(), Status> {
        let inner = &self.inner;
        let audio = &channel[w.start as usize..(w.end as usize).min(channel.len())];
        let mut pcm = Vec::with_capacity(audio.len() * 4);
        for s in audio {
            pcm.extend_from_slice(&s.to_le_bytes());
        }
        let ms = |s: u64| s * 1000 / u64::from(MODEL_SAMPLE_RATE);
        // A child of the call's (or the batch job's) span: the stages' spans follow it.
        let span = tracing::info_span!(
            "window",
            session.id = %id,
            segment,
            audio_ms = ms(w.end.saturating_sub(w.start)),
        );
        let msg = AudioSegment {
            envelope: Some(Envelope {
                session_id: id.to_string(),
                segment_id: segment,
                sequence: segment + 1,
                revision: 1,
                emitted_unix_ms: now_unix_ms(),
                tenant: tenant.to_owned(),
                trace: nexus_core::trace::context_of(&span),
                // A whole recording: stages take live work before it.
                live: false,
            }),
            config: Some(rc.clone()),
            start_ms: ms(w.start),
            end_ms: ms(w.end),
            sample_rate_hz: MODEL_SAMPLE_RATE,
            pcm_f32le: pcm.into(),
            is_final: true,
            channel_tag: w.channel_tag,
            previous_text,
            // A file's windows are queued before any is decoded: no finals
            // exist yet to give a translation context.
            translation_context: Vec::new(),
            lead_ms: 0,
            silence_ms: 0,
        };
        let fields: nexus_bus::Fields = encode(&msg)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        match inner.queue_audio(fields).await {
            Ok(()) => Ok(()),
            Err(BusError::Full { backlog, .. }) => Err(Status::resource_exhausted(format!(
                "the encoder stage is {backlog} segments behind; retry later"
            ))),
            Err(e) => Err(Status::unavailable(format!(
                "audio could not be queued: {e}; retry"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probs(pattern: &[(f32, f64)]) -> Vec<f32> {
        // (probability, seconds) runs at 32 ms per frame.
        pattern
            .iter()
            .flat_map(|(p, s)| std::iter::repeat_n(*p, (s / 0.032).round() as usize))
            .collect()
    }

    #[test]
    fn utterances_are_packed_into_windows_of_at_most_30_s() {
        let sr = f64::from(MODEL_SAMPLE_RATE);
        // 10 s speech, 2 s pause, 10 s speech, 2 s pause, 15 s speech.
        let p = probs(&[
            (0.9, 10.0),
            (0.0, 2.0),
            (0.9, 10.0),
            (0.0, 2.0),
            (0.9, 15.0),
            (0.0, 1.0),
        ]);
        let total = (p.len() * 512) as u64;
        let w = windows(&p, total);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w.iter().all(|(s, e)| e - s <= WINDOW), "{w:?}");
        // Each window takes up to a second of the quiet before it, never
        // the previous window's audio.
        assert!(w[1].0 >= w[0].1, "{w:?}");
        // The first window holds both 10 s utterances; the third starts a
        // new one, a second before its pre-roll (24 s - 0.32 s - 1 s).
        assert!((w[0].1 as f64 / sr - 22.0).abs() < 1.0, "{w:?}");
        assert!((w[1].0 as f64 / sr - 22.7).abs() < 0.2, "{w:?}");
    }

    #[test]
    fn voiced_time_is_counted_between_positions() {
        // 1 s silence, 2 s speech, 1 s silence.
        let p = probs(&[(0.0, 1.0), (0.9, 2.0), (0.1, 1.0)]);
        let sr = u64::from(MODEL_SAMPLE_RATE);
        assert!((voiced_ms(&p, 0, 4 * sr) as i64 - 2000).abs() <= 40);
        assert!((voiced_ms(&p, 2 * sr, 4 * sr) as i64 - 1000).abs() <= 40);
        assert_eq!(voiced_ms(&p, 3 * sr + sr / 10, 4 * sr), 0);
        assert_eq!(voiced_ms(&p, 10 * sr, 11 * sr), 0);
    }

    #[test]
    fn silence_gives_no_windows_and_long_speech_is_cut() {
        assert!(windows(&probs(&[(0.0, 20.0)]), 20 * 16_000).is_empty());
        let p = probs(&[(0.9, 70.0)]);
        let w = windows(&p, (p.len() * 512) as u64);
        assert!(w.len() >= 3, "{w:?}");
        assert!(w.iter().all(|(s, e)| e - s <= WINDOW), "{w:?}");
    }

    #[test]
    fn a_window_is_conditioned_on_the_latest_text_before_it_on_its_channel() {
        let w = |channel_tag, start| Window {
            channel_tag,
            start,
            end: start + 10,
        };
        let plan = vec![w(1, 0), w(1, 100), w(2, 50), w(1, 200)];
        let said = |t: &str| {
            vec![SpeechRecognitionResult {
                alternatives: vec![nexus_proto::speech::SpeechRecognitionAlternative {
                    transcript: t.into(),
                    ..Default::default()
                }],
                ..Default::default()
            }]
        };
        let done: HashMap<usize, Vec<SpeechRecognitionResult>> = [
            (0, said("first")),
            (1, said("second")),
            (2, said("other channel")),
        ]
        .into();
        assert_eq!(text_before(&plan, &done, &plan[3]), "second");
        assert_eq!(text_before(&plan, &done, &plan[1]), "first");
        assert_eq!(text_before(&plan, &done, &plan[0]), "");
        let long = "é".repeat(300);
        assert_eq!(crate::previous_text_tail(&long).chars().count(), 200);
    }
}
