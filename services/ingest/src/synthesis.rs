//! `nexus.speech.v1.SpeechSynthesis`: text to speech on the vocoder stage.
//! A request goes to the `synthesize` stream; the vocoder speaks it sentence
//! by sentence into the request's result log, and this replica forwards each
//! sentence as it lands (SynthesizeStreaming) or the whole (Synthesize),
//! resampled and encoded as asked.

use std::pin::Pin;
use std::time::{Duration, Instant};

use nexus_audio::StreamResampler;
use nexus_bus::{Bus, BusError, EntryId, SessionId, encode};
use nexus_fleet::{now_unix_ms, retry, stages};
use nexus_proto::pipeline::{Envelope, SynthesisChunk, SynthesisTask};
use nexus_proto::speech::speech_synthesis_server::SpeechSynthesis;
use nexus_proto::speech::{AudioEncoding, SynthesizeRequest, SynthesizeResponse};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{Ingest, invalid};

/// Characters one request may carry.
pub(crate) const MAX_CHARS: usize = 5_000;
/// Synthesis requests this replica follows at once; more are refused.
const IN_FLIGHT: usize = 32;

/// The SpeechSynthesis service of an ingest replica.
pub struct SynthesisService<B: Bus>(pub(crate) Ingest<B>);

/// A checked request.
struct Plan {
    text: String,
    voice: String,
    encoding: AudioEncoding,
    rate: u32,
    length_scale: f32,
}

type Chunks = mpsc::Receiver<Result<(EntryId, SynthesisChunk), String>>;

/// Turns the vocoder's f32 chunks into the requested rate and encoding.
struct Encoder {
    encoding: AudioEncoding,
    out_rate: u32,
    resampler: Option<StreamResampler>,
}

impl Encoder {
    fn new(encoding: AudioEncoding, in_rate: u32, out_rate: u32) -> Result<Self, Status> {
        let resampler = if in_rate == out_rate {
            None
        } else {
            Some(
                StreamResampler::new(in_rate, out_rate)
                    .map_err(|e| Status::internal(format!("resampler: {e}")))?,
            )
        };
        Ok(Self {
            encoding,
            out_rate,
            resampler,
        })
    }

    /// Samples at the output rate; `last` flushes the resampler.
    fn samples(&mut self, input: &[f32], last: bool) -> Result<Vec<f32>, Status> {
        let Some(r) = &mut self.resampler else {
            return Ok(input.to_vec());
        };
        let mut out = Vec::new();
        r.push(input, &mut out)
            .and_then(|()| if last { r.finish(&mut out) } else { Ok(()) })
            .map_err(|e| Status::internal(format!("resampling: {e}")))?;
        Ok(out)
    }

    fn bytes(&self, samples: &[f32]) -> Vec<u8> {
        match self.encoding {
            AudioEncoding::LinearPcmF32le => samples.iter().flat_map(|x| x.to_le_bytes()).collect(),
            AudioEncoding::Container => {
                nexus_audio::wav::encode_pcm16(&[samples.to_vec()], self.out_rate)
            }
            _ => nexus_audio::wav::pcm16_le(samples),
        }
    }

    fn response(&self, samples: &[f32], is_last: bool) -> SynthesizeResponse {
        SynthesizeResponse {
            audio: self.bytes(samples).into(),
            sample_rate_hz: self.out_rate,
            encoding: self.encoding as i32,
            duration_ms: samples.len() as u64 * 1000 / u64::from(self.out_rate.max(1)),
            is_last,
        }
    }
}

fn pcm(chunk: &SynthesisChunk) -> Vec<f32> {
    chunk
        .pcm_f32le
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

impl<B: Bus> Ingest<B> {
    fn check_synthesis(&self, r: &SynthesizeRequest, streaming: bool) -> Result<Plan, Status> {
        let voices = &self.inner.cfg.voices;
        if voices.is_empty() {
            return Err(Status::failed_precondition(
                "this fleet serves no voices; run a vocoder (`nexus-vocoder --voice piper-en-us-joe-medium`, or `nexus models pull piper-en-us-joe-medium` for nexus serve)",
            ));
        }
        let text = r.text.trim();
        if text.is_empty() {
            return Err(invalid("text is empty; send something to say"));
        }
        let chars = text.chars().count();
        if chars > MAX_CHARS {
            return Err(invalid(format!(
                "text has {chars} characters; split it into requests of at most {MAX_CHARS}"
            )));
        }
        let voice = if r.voice.is_empty() {
            voices[0].clone()
        } else if voices.contains(&r.voice) {
            r.voice.clone()
        } else {
            return Err(invalid(format!(
                "voice {:?} is not served here; use one of {voices:?}",
                r.voice
            )));
        };
        let lang = r.language.trim();
        if !lang.is_empty()
            && !lang.eq_ignore_ascii_case("en")
            && !lang.to_ascii_lowercase().starts_with("en-")
        {
            return Err(invalid(format!(
                "no voice here speaks {lang:?}; the voices speak English (en)"
            )));
        }
        let encoding = match AudioEncoding::try_from(r.encoding) {
            Ok(AudioEncoding::Unspecified) => AudioEncoding::LinearPcmS16le,
            Ok(e @ (AudioEncoding::LinearPcmS16le | AudioEncoding::LinearPcmF32le)) => e,
            Ok(AudioEncoding::Container) if !streaming => AudioEncoding::Container,
            Ok(AudioEncoding::Container) => {
                return Err(invalid(
                    "CONTAINER (WAV) is for Synthesize; stream LINEAR_PCM_S16LE or LINEAR_PCM_F32LE",
                ));
            }
            Ok(other) => {
                return Err(invalid(format!(
                    "encoding {} is not produced by synthesis; use LINEAR_PCM_S16LE, LINEAR_PCM_F32LE or CONTAINER (WAV)",
                    other.as_str_name()
                )));
            }
            Err(_) => return Err(invalid(format!("unknown encoding {}", r.encoding))),
        };
        if r.sample_rate_hz != 0 && !(8_000..=48_000).contains(&r.sample_rate_hz) {
            return Err(invalid(format!(
                "sample_rate_hz {} is outside 8000–48000 (0 keeps the voice's rate)",
                r.sample_rate_hz
            )));
        }
        let rate = if r.speaking_rate == 0.0 {
            1.0
        } else {
            r.speaking_rate
        };
        if !(0.25..=4.0).contains(&rate) {
            return Err(invalid(format!(
                "speaking_rate {} is outside 0.25–4.0 (1.0 is normal)",
                r.speaking_rate
            )));
        }
        Ok(Plan {
            text: text.to_owned(),
            voice,
            encoding,
            rate: r.sample_rate_hz,
            length_scale: 1.0 / rate,
        })
    }

    /// Queues the request and follows its result log.
    async fn start_synthesis(
        &self,
        plan: &Plan,
        tenant: String,
    ) -> Result<
        (
            Chunks,
            tokio_util::sync::DropGuard,
            tokio::sync::OwnedSemaphorePermit,
        ),
        Status,
    > {
        let permit = self
            .inner
            .synthesis_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "{IN_FLIGHT} syntheses are running on this replica; retry later"
                ))
            })?;
        let inner = &self.inner;
        let id = SessionId::parse(&uuid::Uuid::new_v4().to_string())
            .map_err(|e| Status::internal(e.to_string()))?;
        let stop = CancellationToken::new();
        let guard = stop.clone().drop_guard();
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(crate::session::follow(
            inner.bus.clone(),
            inner.cfg.fleet.keys.results(&id),
            inner.cfg.bus_retry,
            tx,
            stop,
        ));
        let span =
            tracing::info_span!("synthesis", request = %id, chars = plan.text.chars().count());
        let task = SynthesisTask {
            envelope: Some(Envelope {
                session_id: id.to_string(),
                emitted_unix_ms: now_unix_ms(),
                tenant,
                trace: nexus_core::trace::context_of(&span),
                ..Default::default()
            }),
            text: plan.text.clone(),
            voice: plan.voice.clone(),
            length_scale: plan.length_scale,
            seed: 0,
        };
        let fields: nexus_bus::Fields = encode(&task)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let stream = stages::stream(&inner.cfg.fleet.keys, stages::SYNTHESIZE);
        let never = CancellationToken::new();
        match retry("queue synthesis", inner.cfg.bus_retry, &never, || {
            inner
                .bus
                .add(&stream, fields.clone(), inner.cfg.fleet.limits)
        })
        .await
        {
            Ok(_) => Ok((rx, guard, permit)),
            Err(BusError::Full { backlog, .. }) => Err(Status::resource_exhausted(format!(
                "{backlog} syntheses are queued already; retry later"
            ))),
            Err(e) => Err(Status::unavailable(format!(
                "the synthesis could not be queued: {e}; retry"
            ))),
        }
    }

    /// How long the next chunk may take: the queue, then a few seconds a sentence.
    fn chunk_budget(&self) -> Duration {
        self.inner.cfg.final_timeout + Duration::from_secs(10)
    }
}

/// The next chunk in order, skipping redelivered ones.
async fn next_chunk(
    rx: &mut Chunks,
    next: u32,
    budget: Duration,
) -> Result<SynthesisChunk, Status> {
    let deadline = Instant::now() + budget;
    loop {
        let m = tokio::select! {
            m = rx.recv() => m,
            _ = tokio::time::sleep_until(deadline.into()) => {
                return Err(Status::deadline_exceeded(format!(
                    "no vocoder produced audio within {budget:?}; the vocoders may be down or busy"
                )));
            }
        };
        match m {
            Some(Ok((_, c))) if c.index < next => continue,
            Some(Ok((_, c))) if !c.error.is_empty() => return Err(Status::internal(c.error)),
            Some(Ok((_, c))) => return Ok(c),
            Some(Err(e)) => {
                return Err(Status::unavailable(format!(
                    "the audio could not be read: {e}; retry"
                )));
            }
            None => return Err(Status::internal("the result follower stopped")),
        }
    }
}

/// A request's audio as it arrives: chunks in order, at the asked rate.
struct Follow {
    rx: Chunks,
    next: u32,
    enc: Option<Encoder>,
    encoding: AudioEncoding,
    rate: u32,
    budget: Duration,
}

impl Follow {
    fn new(rx: Chunks, plan: &Plan, budget: Duration) -> Self {
        Self {
            rx,
            next: 0,
            enc: None,
            encoding: plan.encoding,
            rate: plan.rate,
            budget,
        }
    }

    /// The next chunk's samples at the output rate, whether it is the last,
    /// and the encoder that shapes responses.
    async fn next(&mut self) -> Result<(Vec<f32>, bool, &Encoder), Status> {
        let c = next_chunk(&mut self.rx, self.next, self.budget).await?;
        self.next = c.index + 1;
        if self.enc.is_none() {
            let out = if self.rate == 0 {
                c.sample_rate_hz
            } else {
                self.rate
            };
            self.enc = Some(Encoder::new(self.encoding, c.sample_rate_hz, out)?);
        }
        let e = self
            .enc
            .as_mut()
            .ok_or_else(|| Status::internal("no audio encoder"))?;
        let samples = e.samples(&pcm(&c), c.is_last)?;
        Ok((samples, c.is_last, e))
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<SynthesizeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<B: Bus> SpeechSynthesis for SynthesisService<B> {
    async fn synthesize(
        &self,
        request: Request<SynthesizeRequest>,
    ) -> Result<Response<SynthesizeResponse>, Status> {
        let grant = self.0.inner.access.admit_grpc(request.metadata())?;
        let plan = self.0.check_synthesis(request.get_ref(), false)?;
        let (rx, _guard, _permit) = self.0.start_synthesis(&plan, grant.tenant.clone()).await?;
        let mut follow = Follow::new(rx, &plan, self.0.chunk_budget());
        let mut samples = Vec::new();
        loop {
            let (s, last, e) = follow.next().await?;
            samples.extend(s);
            if last {
                return Ok(Response::new(e.response(&samples, true)));
            }
        }
    }

    type SynthesizeStreamingStream = ResponseStream;

    async fn synthesize_streaming(
        &self,
        request: Request<SynthesizeRequest>,
    ) -> Result<Response<Self::SynthesizeStreamingStream>, Status> {
        let grant = self.0.inner.access.admit_grpc(request.metadata())?;
        let plan = self.0.check_synthesis(request.get_ref(), true)?;
        let (rx, guard, permit) = self.0.start_synthesis(&plan, grant.tenant.clone()).await?;
        let mut follow = Follow::new(rx, &plan, self.0.chunk_budget());
        let (tx, out) = mpsc::channel(4);
        tokio::spawn(async move {
            let _guard = guard;
            let _permit = permit;
            loop {
                let r = follow.next().await.map(|(s, last, e)| e.response(&s, last));
                let stop = r.as_ref().map_or(true, |m| m.is_last);
                if tx.send(r).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }
}

/// The permits of [`IN_FLIGHT`] syntheses.
pub(crate) fn slots() -> std::sync::Arc<tokio::sync::Semaphore> {
    std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT))
}
