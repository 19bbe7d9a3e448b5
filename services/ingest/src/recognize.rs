//! Whole-audio recognition on the live fleet. The audio is decoded, the Silero
//! VAD and the live endpointer find its speech, and neighbouring utterances are
//! packed into windows of at most 30 s (silence between them is never sent).
//! The windows go to the encoder stage as final segments of a one-off session,
//! a few at a time so one long file cannot flood the stages that live sessions
//! share, and come back as timed segments from the session's result log.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use nexus_audio::{
    AudioLimits, EndpointConfig, EndpointEvent, Endpointer, MODEL_SAMPLE_RATE, PcmSpec,
    SampleFormat,
};
use nexus_bus::{Bus, BusError, EntryId, SessionId, encode};
use nexus_fleet::{now_unix_ms, retry, stages};
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
    out
}

/// Decodes a request's audio into 16 kHz channels: one, or one per channel when asked.
fn decode_audio(
    bytes: Vec<u8>,
    rc: &RecognitionConfig,
    limits: &AudioLimits,
) -> Result<Vec<Vec<f32>>, String> {
    let fmt = rc.audio_format.unwrap_or_default();
    let enc = AudioEncoding::try_from(fmt.encoding).unwrap_or(AudioEncoding::Unspecified);
    let (channels, rate) = match enc {
        AudioEncoding::LinearPcmS16le | AudioEncoding::LinearPcmF32le => {
            if fmt.sample_rate_hz == 0 {
                return Err(
                    "audio_format.sample_rate_hz is required for LINEAR_PCM_* audio".into(),
                );
            }
            let spec = PcmSpec {
                format: if enc == AudioEncoding::LinearPcmS16le {
                    SampleFormat::S16Le
                } else {
                    SampleFormat::F32Le
                },
                sample_rate: fmt.sample_rate_hz,
                channels: fmt.channels.max(1),
            };
            let ch =
                nexus_audio::pcm::decode_all(&bytes, spec, limits).map_err(|e| e.to_string())?;
            (ch, fmt.sample_rate_hz)
        }
        AudioEncoding::OpusPackets => {
            return Err(
                "OPUS_PACKETS is a streaming format; send an Ogg Opus file (OGG_OPUS) or a container"
                    .into(),
            );
        }
        AudioEncoding::OggOpus | AudioEncoding::Container | AudioEncoding::Unspecified => {
            let a = nexus_audio::decode_bytes(bytes, None, limits).map_err(|e| e.to_string())?;
            (a.channels, a.sample_rate)
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

/// One window on its way through the stages.
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
        let inner = self.inner.clone();
        let mut rc = req.config.ok_or_else(|| invalid("config is required"))?;
        self.check_config(&mut rc)?;
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
        inner
            .limits
            .check_bytes(bytes.len() as u64)
            .map_err(|e| invalid(e.to_string()))?;
        let (cfg, limits) = (rc.clone(), inner.limits.clone());
        let channels = tokio::task::spawn_blocking(move || decode_audio(bytes, &cfg, &limits))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| invalid(format!("the audio could not be read: {e}")))?;
        let duration_ms = channels.iter().map(Vec::len).max().unwrap_or(0) as u64 * 1000
            / u64::from(MODEL_SAMPLE_RATE);
        let vad = inner.vad.clone();
        let (channels, plan) = tokio::task::spawn_blocking(move || {
            let mut plan = Vec::new();
            for (i, c) in channels.iter().enumerate() {
                let probs = vad.probabilities(c).map_err(|e| e.to_string())?;
                for (start, end) in windows(&probs, c.len() as u64) {
                    plan.push(Window {
                        channel_tag: if channels.len() > 1 { i as u32 + 1 } else { 0 },
                        start,
                        end,
                    });
                }
            }
            Ok::<_, String>((channels, plan))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(format!("voice activity detection failed: {e}")))?;

        let id = SessionId::parse(&uuid::Uuid::new_v4().to_string())
            .map_err(|e| Status::internal(e.to_string()))?;
        let mut results = Vec::new();
        if !plan.is_empty() {
            self.admit(&id, &rc.model).await?;
            let r = self
                .run_windows(&id, &rc, &tenant, &channels, &plan, duration_ms)
                .await;
            let pool = inner.cfg.fleet.keys.pool(stages::DECODER_POOL);
            if let Err(e) = inner.bus.release(&pool, id.as_str()).await {
                tracing::warn!(request = %id, error = %e, "releasing the request's slot failed; its lease expires");
            }
            results = r?;
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
            .unwrap_or_else(|| rc.language.clone());
        tracing::info!(request = %id, windows = plan.len(), segments = results.len(), duration_ms, "recognized");
        Ok(RecognizeResponse {
            results,
            audio_duration_ms: duration_ms,
            language,
            model: rc.model,
            request_id: id.to_string(),
        })
    }

    /// Reads a `file://` location under the configured root.
    async fn read_uri(&self, uri: &str) -> Result<Vec<u8>, Status> {
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
        tokio::fs::read(&full)
            .await
            .map_err(|e| invalid(format!("uri {uri:?}: {e}")))
    }

    /// Sends the windows (a few at a time) and collects their timed segments.
    async fn run_windows(
        &self,
        id: &SessionId,
        rc: &RecognitionConfig,
        tenant: &str,
        channels: &[Vec<f32>],
        plan: &[Window],
        duration_ms: u64,
    ) -> Result<Vec<SpeechRecognitionResult>, Status> {
        let inner = &self.inner;
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
        let mut pending: BTreeMap<u64, &Window> = BTreeMap::new();
        let mut done: BTreeMap<u64, Vec<SpeechRecognitionResult>> = BTreeMap::new();
        let mut next = 0usize;
        let lease_ttl = inner.cfg.lease_ttl;
        let pool = inner.cfg.fleet.keys.pool(stages::DECODER_POOL);
        let mut renew = tokio::time::interval(lease_ttl / 3);
        renew.tick().await;
        while done.len() < plan.len() {
            while next < plan.len() && pending.len() < IN_FLIGHT {
                let w = &plan[next];
                let ch = &channels[w.channel_tag.saturating_sub(1) as usize];
                self.publish_window(id, rc, tenant, next as u64, w, ch)
                    .await?;
                pending.insert(next as u64, w);
                next += 1;
            }
            let msg = tokio::select! {
                m = rx.recv() => m,
                _ = renew.tick() => {
                    if let Err(e) = inner.bus.lease(&pool, id.as_str(), lease_ttl).await {
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
            let Some(w) = pending.remove(&env.segment_id) else {
                continue; // a redelivered duplicate
            };
            if !msg.error.is_empty() {
                return Err(Status::internal(format!(
                    "the window at {} - {} ms could not be decoded: {}",
                    w.start * 1000 / u64::from(MODEL_SAMPLE_RATE),
                    w.end * 1000 / u64::from(MODEL_SAMPLE_RATE),
                    msg.error
                )));
            }
            done.insert(env.segment_id, msg.segments);
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
    ) -> Result<(), Status> {
        let inner = &self.inner;
        let audio = &channel[w.start as usize..(w.end as usize).min(channel.len())];
        let mut pcm = Vec::with_capacity(audio.len() * 4);
        for s in audio {
            pcm.extend_from_slice(&s.to_le_bytes());
        }
        let ms = |s: u64| s * 1000 / u64::from(MODEL_SAMPLE_RATE);
        let msg = AudioSegment {
            envelope: Some(Envelope {
                session_id: id.to_string(),
                segment_id: segment,
                sequence: segment + 1,
                revision: 1,
                emitted_unix_ms: now_unix_ms(),
                tenant: tenant.to_owned(),
                ..Default::default()
            }),
            config: Some(rc.clone()),
            start_ms: ms(w.start),
            end_ms: ms(w.end),
            sample_rate_hz: MODEL_SAMPLE_RATE,
            pcm_f32le: pcm.into(),
            is_final: true,
            channel_tag: w.channel_tag,
            ..Default::default()
        };
        let fields: nexus_bus::Fields = encode(&msg)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let stream = stages::stream(&inner.cfg.fleet.keys, stages::AUDIO);
        let budget = inner.cfg.bus_retry;
        let never = CancellationToken::new();
        let t0 = Instant::now();
        loop {
            let left = budget.saturating_sub(t0.elapsed());
            match retry("publish window", left, &never, || {
                inner
                    .bus
                    .add(&stream, fields.clone(), inner.cfg.fleet.limits)
            })
            .await
            {
                Ok(_) => return Ok(()),
                Err(BusError::Full { .. }) if t0.elapsed() < budget => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(BusError::Full { backlog, .. }) => {
                    return Err(Status::resource_exhausted(format!(
                        "the encoder stage is {backlog} segments behind; retry later"
                    )));
                }
                Err(e) => {
                    return Err(Status::unavailable(format!(
                        "audio could not be queued: {e}; retry"
                    )));
                }
            }
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
        // The first window holds both 10 s utterances; the third starts a new one.
        assert!((w[0].1 as f64 / sr - 22.0).abs() < 1.0, "{w:?}");
        assert!((w[1].0 as f64 / sr - 24.0).abs() < 0.5, "{w:?}");
    }

    #[test]
    fn silence_gives_no_windows_and_long_speech_is_cut() {
        assert!(windows(&probs(&[(0.0, 20.0)]), 20 * 16_000).is_empty());
        let p = probs(&[(0.9, 70.0)]);
        let w = windows(&p, (p.len() * 512) as u64);
        assert!(w.len() >= 3, "{w:?}");
        assert!(w.iter().all(|(s, e)| e - s <= WINDOW), "{w:?}");
    }
}
