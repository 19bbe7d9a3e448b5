//! The decoding pool: a thread that keeps up to `slots` sequences from any
//! sessions in flight and advances all of them with one batched forward pass
//! per token (continuous batching: a sequence joins at the next step after it
//! arrives and leaves the step it ends, without waiting for the others).
//!
//! That thread only steps. A starter thread before it prepares each sequence
//! (the audio's cross-attention keys and values, the prompt), live finals
//! first, then interims, then a recording's windows, and drops interims that
//! a newer window of their utterance supersedes; finisher threads after it
//! run what a finished sequence still needs (beam or fallback re-decodes,
//! word timing, speech codes). A window that asks for beam search (or a
//! first temperature above 0) skips the step loop, whose greedy pass it
//! would not use, and goes straight to the finishers. Live work and
//! recordings (Recognize, uploads, jobs) have finisher threads of their own,
//! so a recording's beam search never holds up a live caption's finish.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Instant;

use candle_core::{Device, Tensor};
use nexus_bus::EntryId;
use nexus_fleet::ModelSet;
use nexus_fleet::stages::Work;
use nexus_models::nexus::{LmSession, NexusModel, NexusTask};
use nexus_models::whisper::{
    DecodeOptions, GreedySequence, Task, TranscribeOptions, WhisperEngine, step_batch,
};
use nexus_proto::pipeline::{DType, EncodedSegment, SpeechCodes};
use nexus_proto::speech::{
    DecodingDetails, SpeechRecognitionAlternative, SpeechRecognitionResult,
    StreamingRecognitionResult, TimeSpan, WordInfo,
};
use rayon::prelude::*;
use tokio::sync::OwnedSemaphorePermit;

/// A decoding slot taken by one entry: counted busy until dropped (after its
/// result is written), which the slot gauges report.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    busy: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Slot {
    /// Marks `permit`'s slot busy in `busy`.
    pub fn new(
        permit: OwnedSemaphorePermit,
        busy: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) -> Self {
        busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            _permit: permit,
            busy,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.busy.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One segment revision to decode.
#[derive(Debug)]
pub struct Job {
    /// Its entry in the encoded stream, acknowledged once the result is written.
    pub id: EntryId,
    /// The features and what to do with them.
    pub seg: EncodedSegment,
    /// Its slot in the pool; freed when the result is written.
    pub permit: Slot,
    /// Keeps its entry from looking abandoned while it waits and decodes.
    pub fresh: Option<nexus_fleet::reader::KeepFresh>,
    /// Its `decode` span, from the read to the written result.
    pub span: tracing::Span,
}

/// A decoded segment revision, ready to be written.
#[derive(Debug)]
pub struct Output {
    /// The stream entry it came from.
    pub id: EntryId,
    /// The job's segment, without its features.
    pub seg: EncodedSegment,
    /// The result and, for finals, its timed segments; or why there is none.
    pub result: Result<(StreamingRecognitionResult, Vec<SpeechRecognitionResult>), String>,
    /// Decoder time spent.
    pub inference_ms: u32,
    /// The slot, held until the write.
    pub permit: Slot,
    /// Keeps its entry fresh until the write.
    pub fresh: Option<nexus_fleet::reader::KeepFresh>,
    /// The model itself translated (Whisper's translate task into English, or
    /// a NEXUS-O model into any language): the target it wrote.
    pub model_translated: Option<String>,
    /// Most sequences decoded together with it in one step.
    pub batch: usize,
    /// Its `decode` span.
    pub span: tracing::Span,
    /// Speech codes of the final's text, when the session asked to hear it.
    pub speech: Option<SpeechCodes>,
    /// An interim dropped unfinished because a newer window of its utterance
    /// (or its final) arrived: acknowledged, nothing written.
    pub superseded: bool,
}

struct Active {
    job: Job,
    model: String,
    started: Instant,
    /// Most sequences in one step with this one.
    batch: usize,
    kind: Kind,
}

// At most `slots` of these live at once; boxing the larger variant buys nothing.
#[allow(clippy::large_enum_variant)]
enum Kind {
    Whisper {
        engine: Arc<WhisperEngine>,
        audio: Tensor,
        /// The batch's greedy pass; none where beam search or sampling
        /// decodes the window instead.
        seq: Option<GreedySequence>,
        base: DecodeOptions,
        opts: TranscribeOptions,
    },
    Nexus {
        model: Arc<NexusModel>,
        session: Box<LmSession>,
        tokens: Vec<u32>,
        /// Final-norm LM states that produced each token (the audio decoder's input).
        hidden: Vec<Tensor>,
        /// Sum of the chosen tokens' log-probabilities.
        logprob_sum: f64,
        language: String,
        translated: Option<String>,
    },
}

/// Tokens a NEXUS-O window may produce (a 30 s window of speech is well under).
pub const NEXUS_MAX_TOKENS: usize = 160;

/// The NEXUS-O prompt task of a segment's config, the language the model
/// translates into (when it does), and the spoken language as results
/// report it (empty when not given).
pub fn nexus_task(seg: &EncodedSegment) -> (NexusTask, Option<String>, String) {
    let cfg = seg.config.clone().unwrap_or_default();
    let spoken = match cfg.language.as_str() {
        "" | "auto" => None,
        l => Some(l.to_string()),
    };
    let target = cfg
        .translation
        .as_ref()
        .map(|t| t.target_language.clone())
        .unwrap_or_default();
    let reported = spoken.clone().unwrap_or_default();
    if cfg.task == nexus_proto::speech::Task::Translate as i32 && !target.is_empty() {
        return (
            NexusTask::Translate {
                target: target.clone(),
            },
            Some(target),
            reported,
        );
    }
    (NexusTask::Transcribe { language: spoken }, None, reported)
}

fn start_nexus(
    job: Job,
    name: String,
    model: Arc<NexusModel>,
) -> Result<Active, Box<(Job, String)>> {
    let (task, translated, language) = nexus_task(&job.seg);
    let prepared = (|| {
        let audio = features(&job.seg)?
            .squeeze(0)
            .and_then(|t| t.to_device(model.device()))
            .map_err(|e| e.to_string())?;
        model.start(&task, &audio).map_err(|e| e.to_string())
    })();
    match prepared {
        Ok(session) => Ok(Active {
            job,
            model: name,
            started: Instant::now(),
            batch: 0,
            kind: Kind::Nexus {
                model,
                session: Box::new(session),
                tokens: Vec::new(),
                hidden: Vec::new(),
                logprob_sum: 0.0,
                language,
                translated,
            },
        }),
        Err(e) => Err(Box::new((job, e))),
    }
}

impl Active {
    /// The next token to feed, or `None` when the sequence is done.
    fn advance(&mut self) -> Option<u32> {
        match &mut self.kind {
            Kind::Whisper { seq, .. } => seq.as_mut()?.advance(),
            Kind::Nexus {
                model,
                session,
                tokens,
                hidden,
                logprob_sum,
                ..
            } => {
                let (next, logprob) = session.greedy_with_logprob().ok()?;
                if model.is_stop(next) || tokens.len() >= NEXUS_MAX_TOKENS {
                    return None;
                }
                *logprob_sum += f64::from(logprob);
                tokens.push(next);
                hidden.push(session.last_hidden().clone());
                Some(next)
            }
        }
    }
}

/// Whether a final's session asked to hear its text.
fn wants_speech(seg: &EncodedSegment) -> bool {
    seg.is_final
        && seg
            .config
            .as_ref()
            .and_then(|c| c.speech_output.as_ref())
            .is_some_and(|s| s.enabled)
}

/// Code frames the audio decoder may produce per text token, and at least.
const FRAMES_PER_TOKEN: usize = 12;
const MIN_FRAMES: usize = 24;

/// The audio decoder's codes for a final's text (its LM states), for a vocoder.
fn speech_codes(
    seg: &EncodedSegment,
    model: &NexusModel,
    hidden: &[Tensor],
) -> Result<SpeechCodes, String> {
    let h = Tensor::stack(hidden, 0).map_err(|e| e.to_string())?;
    let max = (hidden.len() * FRAMES_PER_TOKEN).max(MIN_FRAMES);
    let codes = model.speak(&h, max).map_err(|e| e.to_string())?;
    let k = model
        .audio_decoder()
        .ok_or("the checkpoint has no audio decoder")?
        .codebooks();
    let f = codes.frames.len();
    // Codebook-major, as the message says.
    let flat = (0..k)
        .flat_map(|c| codes.frames.iter().map(move |fr| fr[c]))
        .collect();
    Ok(SpeechCodes {
        envelope: seg.envelope.clone(),
        num_codebooks: k as u32,
        codes: flat,
        frames: f as u32,
        frame_rate_hz: 0.0,
        is_last: true,
        vocoder: model.config().vocoder.clone().unwrap_or_default(),
    })
}

/// The result of a finished NEXUS-O sequence: its text for the window.
fn finish_nexus(
    seg: &EncodedSegment,
    model: &NexusModel,
    tokens: &[u32],
    logprob_sum: f64,
    language: String,
) -> Result<(StreamingRecognitionResult, Vec<SpeechRecognitionResult>), String> {
    let text = model
        .decode_text(tokens)
        .map_err(|e| e.to_string())?
        .trim()
        .to_owned();
    let alternatives = if text.is_empty() {
        Vec::new()
    } else {
        vec![SpeechRecognitionAlternative {
            transcript: text.clone(),
            // The geometric mean of the chosen tokens' probabilities, as
            // Whisper results report exp(avg_logprob).
            confidence: (logprob_sum / tokens.len().max(1) as f64)
                .exp()
                .clamp(0.0, 1.0) as f32,
            words: Vec::new(),
        }]
    };
    let span = Some(TimeSpan {
        start_ms: utterance_start_ms(seg),
        end_ms: seg.end_ms,
    });
    let segments = if seg.is_final && !text.is_empty() {
        vec![SpeechRecognitionResult {
            alternatives: alternatives.clone(),
            channel_tag: seg.channel_tag,
            language: language.clone(),
            span,
            translation: None,
            // The LM has no no-speech token: left out, not zeroed.
            no_speech_probability: None,
            // The LM reports no Whisper-style window figures: left out, not zeroed.
            decoding: None,
            // Speakers are given by ingest, which diarizes the recording.
            speaker: String::new(),
        }]
    } else {
        Vec::new()
    };
    let env = seg.envelope.clone().unwrap_or_default();
    Ok((
        StreamingRecognitionResult {
            alternatives,
            is_final: seg.is_final,
            stability: if seg.is_final { 1.0 } else { 0.0 },
            channel_tag: seg.channel_tag,
            language,
            segment_id: env.segment_id,
            revision: env.revision,
            span,
            audio_processed_ms: seg.end_ms,
            ..Default::default()
        },
        segments,
    ))
}

/// Temperatures from `start` to 1 in steps of 0.2, as OpenAI's fallback climbs.
fn temperature_ladder(start: f32) -> Vec<f32> {
    (0..=5)
        .map(|i| start + 0.2 * i as f32)
        .take_while(|t| *t <= 1.0 + 1e-6)
        .map(|t| t.min(1.0))
        .collect()
}

/// What a segment's config asks of Whisper.
pub fn options(
    seg: &EncodedSegment,
    engine: &WhisperEngine,
) -> Result<(DecodeOptions, TranscribeOptions), String> {
    let cfg = seg.config.clone().unwrap_or_default();
    let multilingual = engine.tokenizer.multilingual;
    let target = cfg
        .translation
        .as_ref()
        .map(|t| t.target_language.as_str())
        .unwrap_or("");
    let task = if cfg.task == nexus_proto::speech::Task::Translate as i32
        && target == "en"
        && multilingual
    {
        Task::Translate
    } else {
        Task::Transcribe
    };
    let language = match cfg.language.as_str() {
        "" | "auto" if multilingual => None,
        "" | "auto" => Some("en".to_string()),
        l => Some(l.to_string()),
    };
    let ctx = cfg.speech_context.unwrap_or_default();
    let dec = cfg.decoding.unwrap_or_default();
    // Ingest checks this at the edge; a segment from elsewhere on the bus must
    // not size the beams (each holds a KV cache) either.
    if dec.beam_size > nexus_models::whisper::decode::MAX_BEAM_SIZE {
        return Err(format!(
            "decoding.beam_size is {}; the limit is {}",
            dec.beam_size,
            nexus_models::whisper::decode::MAX_BEAM_SIZE
        ));
    }
    if !(dec.temperature.is_finite() && (0.0..=1.0).contains(&dec.temperature)) {
        return Err(format!(
            "decoding.temperature is {}; use a value in 0..=1",
            dec.temperature
        ));
    }
    let mut prompt_text = ctx.prompt.trim().to_string();
    if !ctx.hotwords.is_empty() {
        if !prompt_text.is_empty() {
            prompt_text.push(' ');
        }
        prompt_text.push_str(&ctx.hotwords.join(", "));
    }
    let mut prompt = if prompt_text.is_empty() {
        Vec::new()
    } else {
        engine
            .tokenizer
            .encode(&format!(" {prompt_text}"))
            .map_err(|e| format!("prompt: {e}"))?
    };
    // Finals are conditioned on the session's earlier finals, as offline windows
    // are on the text before them.
    let previous = seg.previous_text.trim();
    if seg.is_final && !previous.is_empty() {
        prompt.extend(
            engine
                .tokenizer
                .encode(&format!(" {previous}"))
                .map_err(|e| format!("previous text: {e}"))?,
        );
    }
    let mut opts = TranscribeOptions {
        task,
        language: language.clone(),
        // Interims are previews, superseded within a second: greedy, in the
        // batched step loop, whatever beam the session asks for its finals.
        beam_size: if seg.is_final {
            dec.beam_size.max(1) as usize
        } else {
            1
        },
        word_timestamps: cfg.enable_word_time_offsets && seg.is_final,
        ..TranscribeOptions::default()
    };
    // Interims are compared word by word: always at temperature 0. Finals
    // start at the asked temperature and, unless fallback is off, climb by
    // 0.2 up to 1.
    opts.temperatures = if !seg.is_final {
        vec![0.0]
    } else if dec.disable_fallback {
        vec![dec.temperature]
    } else {
        temperature_ladder(dec.temperature)
    };
    if dec.no_speech_threshold > 0.0 {
        opts.no_speech_threshold = Some(dec.no_speech_threshold);
    }
    let base = DecodeOptions {
        task,
        language,
        beam_size: opts.beam_size,
        best_of: opts.best_of,
        patience: opts.patience,
        prompt,
        // Interim text is compared word by word, not timed: skip timestamp tokens.
        without_timestamps: !seg.is_final,
        sample_len: token_budget(seg.valid_frames),
        ..DecodeOptions::default()
    };
    Ok((base, opts))
}

/// Tokens a window of `valid_frames` mel frames may decode to: room for the
/// fastest speech (about 7 tokens a second, timestamps included) twice over,
/// up to Whisper's 224. A window that Whisper decodes into a repeating loop
/// (a short one, most often) then costs time in proportion to its audio at
/// every temperature of the fallback, and holds no other session up for long.
fn token_budget(valid_frames: u32) -> usize {
    (32 + valid_frames as usize * 15 / 100).min(DecodeOptions::default().sample_len)
}

fn features(seg: &EncodedSegment) -> Result<Tensor, String> {
    let [frames, hidden] = seg.shape[..] else {
        return Err(format!(
            "features have shape {:?}; expected [frames, hidden]",
            seg.shape
        ));
    };
    if seg.dtype != DType::F32 as i32 {
        return Err(format!(
            "features of dtype {}; this decoder reads f32",
            seg.dtype
        ));
    }
    let n = frames as usize * hidden as usize;
    if seg.data.len() != n * 4 {
        return Err(format!(
            "features hold {} bytes; shape {:?} needs {}",
            seg.data.len(),
            seg.shape,
            n * 4
        ));
    }
    let v: Vec<f32> = seg
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Tensor::from_vec(v, (1, frames as usize, hidden as usize), &Device::Cpu)
        .map_err(|e| e.to_string())
}

fn start(job: Job, models: &ModelSet) -> Result<Active, Box<(Job, String)>> {
    if let Some((name, model)) = models.nexus(&job.seg.model) {
        let (name, model) = (name.to_owned(), model.clone());
        return start_nexus(job, name, model);
    }
    let Some((name, engine)) = models.get(&job.seg.model) else {
        let e = format!(
            "model {:?} is not served by this decoder (serving {:?})",
            job.seg.model,
            models.names()
        );
        return Err(Box::new((job, e)));
    };
    let (name, engine) = (name.to_owned(), engine.clone());
    let prepared = (|| {
        let audio = features(&job.seg)?
            .to_device(&engine.device)
            .and_then(|t| t.to_dtype(engine.dtype))
            .map_err(|e| e.to_string())?;
        let (base, opts) = options(&job.seg, &engine)?;
        let seq = if greedy_first(&opts) {
            Some(
                GreedySequence::start(
                    &engine.model,
                    &engine.tokenizer,
                    &audio,
                    &DecodeOptions {
                        beam_size: 1,
                        ..base.clone()
                    },
                )
                .map_err(|e| e.to_string())?,
            )
        } else {
            None
        };
        Ok::<_, String>((audio, base, opts, seq))
    })();
    match prepared {
        Ok((audio, base, opts, seq)) => Ok(Active {
            job,
            model: name,
            started: Instant::now(),
            batch: 0,
            kind: Kind::Whisper {
                engine,
                audio,
                seq,
                base,
                opts,
            },
        }),
        Err(e) => Err(Box::new((job, e))),
    }
}

/// Whether the batch's greedy pass is a window's first attempt: when its
/// first temperature is 0 and no beam is asked for. Otherwise the window is
/// decoded by beam search or sampling on a finisher thread alone.
fn greedy_first(opts: &TranscribeOptions) -> bool {
    opts.beam_size <= 1 && opts.temperatures.first() == Some(&0.0)
}

/// Turns a finished sequence into a result: temperature fallback and beam
/// search when asked (outside the batch), then the same window logic as
/// offline transcription (no-speech skip, hallucinations, word times).
fn finish(a: Active) -> Output {
    let Active {
        job,
        started,
        batch,
        kind,
        ..
    } = a;
    let (engine, audio, seq, base, opts) = match kind {
        Kind::Whisper {
            engine,
            audio,
            seq,
            base,
            opts,
        } => (engine, audio, seq, base, opts),
        Kind::Nexus {
            model,
            tokens,
            hidden,
            logprob_sum,
            language,
            translated,
            ..
        } => {
            let result = finish_nexus(&job.seg, &model, &tokens, logprob_sum, language);
            let speech = if wants_speech(&job.seg)
                && result
                    .as_ref()
                    .is_ok_and(|(r, _)| !r.alternatives.is_empty())
            {
                match speech_codes(&job.seg, &model, &hidden) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::error!(error = %e, "the final's speech codes failed");
                        None
                    }
                }
            } else {
                None
            };
            let inference_ms = started.elapsed().as_millis() as u32;
            let mut seg = job.seg;
            seg.data = Default::default();
            return Output {
                id: job.id,
                seg,
                result,
                inference_ms,
                permit: job.permit,
                fresh: job.fresh,
                model_translated: translated,
                batch,
                span: job.span,
                speech,
                superseded: false,
            };
        }
    };
    let seg = &job.seg;
    let base_task = base.task;
    let result = (|| {
        let greedy = seq
            .map(|seq| seq.finish(&engine.tokenizer))
            .transpose()
            .map_err(|e| e.to_string())?;
        let mut r = engine
            .decode_with_fallback(&audio, &base, &opts, greedy)
            .map_err(|e| e.to_string())?;
        if !base.prompt.is_empty() && engine.skips_speech(&r.tokens) {
            // As offline: a prompt that already holds these words can make Whisper
            // jump over them; decode the window again without it.
            let fresh = DecodeOptions {
                prompt: Vec::new(),
                ..base.clone()
            };
            r = engine
                .decode_with_fallback(&audio, &fresh, &opts, None)
                .map_err(|e| e.to_string())?;
        }
        let lang = r.language.clone();
        let frames = (seg.valid_frames as usize).clamp(1, nexus_models::mel::CHUNK_FRAMES);
        // Segments reach the decoder only after the VAD heard speech in them.
        let mut out = engine
            .finish_window(&r, &audio, 0.0, frames, &|_, _| false, &lang, &opts)
            .map_err(|e| e.to_string())?;
        // Text timed from where the window's audio has ended (in the margin
        // the encoder saw, or past it) is not in the audio: Whisper adds such
        // trailing words most over windows shorter than 30 s.
        out.segments.retain(|s| s.start < after_audio(frames));
        let text = out
            .segments
            .iter()
            .map(|s| s.text.as_str())
            .collect::<String>()
            .trim()
            .to_owned();
        // Model times count from the window's first sample; a time the
        // model puts in a final's lead is clamped to the utterance's start.
        let utterance_ms = utterance_start_ms(seg);
        let in_session = |model_ms: u64| {
            (seg.start_ms + model_ms)
                .saturating_sub(seg.silence_ms)
                .max(utterance_ms)
        };
        let words = out
            .segments
            .iter()
            .flat_map(|s| &s.words)
            .map(|w| WordInfo {
                word: w.word.trim().to_owned(),
                start_ms: in_session((w.start * 1000.0) as u64),
                end_ms: in_session((w.end * 1000.0) as u64),
                confidence: w.probability,
                speaker: String::new(),
            })
            .collect();
        let alternatives = if text.is_empty() {
            Vec::new()
        } else {
            vec![SpeechRecognitionAlternative {
                transcript: text,
                confidence: r.avg_logprob.exp().clamp(0.0, 1.0),
                words,
            }]
        };
        let at = |t: f32| in_session((f64::from(t) * 1000.0).round() as u64);
        let segments = if seg.is_final {
            out.segments
                .iter()
                .filter(|s| !s.text.trim().is_empty())
                .map(|s| SpeechRecognitionResult {
                    alternatives: vec![SpeechRecognitionAlternative {
                        transcript: s.text.trim().to_owned(),
                        confidence: s.avg_logprob.exp().clamp(0.0, 1.0),
                        words: s
                            .words
                            .iter()
                            .map(|w| WordInfo {
                                word: w.word.trim().to_owned(),
                                start_ms: at(w.start),
                                end_ms: at(w.end),
                                confidence: w.probability,
                                speaker: String::new(),
                            })
                            .collect(),
                    }],
                    channel_tag: seg.channel_tag,
                    language: lang.clone(),
                    span: Some(TimeSpan {
                        start_ms: at(s.start),
                        end_ms: at(s.end).min(seg.end_ms.max(at(s.start))),
                    }),
                    translation: None,
                    no_speech_probability: Some(s.no_speech_prob),
                    decoding: Some(DecodingDetails {
                        tokens: s.tokens.clone(),
                        temperature: s.temperature,
                        avg_logprob: s.avg_logprob,
                        compression_ratio: s.compression_ratio,
                    }),
                    speaker: String::new(),
                })
                .collect()
        } else {
            Vec::new()
        };
        let env = seg.envelope.clone().unwrap_or_default();
        let result = StreamingRecognitionResult {
            alternatives,
            is_final: seg.is_final,
            stability: if seg.is_final { 1.0 } else { 0.0 },
            channel_tag: seg.channel_tag,
            language: lang,
            segment_id: env.segment_id,
            revision: env.revision,
            span: Some(TimeSpan {
                start_ms: utterance_start_ms(seg),
                end_ms: seg.end_ms,
            }),
            audio_processed_ms: seg.end_ms,
            ..Default::default()
        };
        Ok((result, segments))
    })();
    let inference_ms = started.elapsed().as_millis() as u32;
    let mut seg = job.seg;
    seg.data = Default::default();
    Output {
        id: job.id,
        seg,
        result,
        inference_ms,
        permit: job.permit,
        fresh: job.fresh,
        model_translated: (base_task == Task::Translate).then(|| "en".to_string()),
        batch,
        span: job.span,
        speech: None,
        superseded: false,
    }
}

/// Seconds from a window's start at which its audio of `valid_frames` mel
/// frames has ended, less the shortest word: a segment timed to start later
/// holds nothing spoken.
fn after_audio(valid_frames: usize) -> f32 {
    use nexus_models::mel::{HOP_LENGTH, SAMPLE_RATE};
    (valid_frames as f32 * HOP_LENGTH as f32 / SAMPLE_RATE as f32 - 0.1).max(0.0)
}

fn failed(job: Job, error: String) -> Output {
    let mut seg = job.seg;
    seg.data = Default::default();
    Output {
        id: job.id,
        seg,
        result: Err(error),
        inference_ms: 0,
        permit: job.permit,
        fresh: job.fresh,
        model_translated: None,
        batch: 0,
        span: job.span,
        speech: None,
        superseded: false,
    }
}

/// An interim that a newer window of its utterance made pointless.
fn superseded(job: Job) -> Output {
    let mut out = failed(job, String::new());
    out.superseded = true;
    out
}

/// A segment's utterance and its revision; a final ranks above every interim.
fn utterance(seg: &EncodedSegment) -> ((String, u64), (bool, u64)) {
    let env = seg.envelope.as_ref();
    (
        (
            env.map(|e| e.session_id.clone()).unwrap_or_default(),
            env.map_or(0, |e| e.segment_id),
        ),
        (seg.is_final, env.map_or(0, |e| u64::from(e.revision))),
    )
}

/// The work a window is: live finals are wanted first, then interims, then
/// a recording's windows.
fn work_of(seg: &EncodedSegment) -> Work {
    Work::of(seg.is_final, seg.envelope.as_ref().is_some_and(|e| e.live))
}

/// Orders newly arrived jobs by [`work_of`] and drops the interims that a newer
/// window of the same utterance, arrived or arriving, supersedes; also the
/// interims already in flight that the arrivals supersede (their indices in
/// `active`, highest first). Returns the jobs to start and the ones dropped.
fn triage<T>(
    incoming: Vec<T>,
    seg_of: fn(&T) -> &EncodedSegment,
    active: &[Active],
) -> (Vec<T>, Vec<T>, Vec<usize>) {
    let mut newest: std::collections::HashMap<(String, u64), (bool, u64)> =
        std::collections::HashMap::new();
    for j in &incoming {
        let (k, rank) = utterance(seg_of(j));
        let e = newest.entry(k).or_insert(rank);
        *e = (*e).max(rank);
    }
    let newer = |seg: &EncodedSegment| {
        let (k, rank) = utterance(seg);
        !seg.is_final && newest.get(&k).is_some_and(|n| *n > rank)
    };
    let (mut keep, drop): (Vec<T>, Vec<T>) = incoming.into_iter().partition(|j| !newer(seg_of(j)));
    keep.sort_by_key(|j| work_of(seg_of(j)));
    let mut stale: Vec<usize> = active
        .iter()
        .enumerate()
        .filter(|(_, a)| newer(&a.job.seg))
        .map(|(i, _)| i)
        .collect();
    stale.reverse();
    (keep, drop, stale)
}

/// Runs the pool until `jobs` closes and every sequence in flight is done.
pub fn run_pool(
    models: ModelSet,
    slots: usize,
    jobs: Receiver<Job>,
    out: tokio::sync::mpsc::UnboundedSender<Output>,
) {
    // Finishing a sequence (a beam or fallback re-decode, word alignment,
    // speech codes) runs beside the token steps, so a slow one holds up its
    // own session only; live work and recordings on threads of their own.
    // Returns after every finished sequence is sent.
    let (live, live_rx) = std::sync::mpsc::channel::<Active>();
    let (recording, recording_rx) = std::sync::mpsc::channel::<Active>();
    let finishing = Finishing { live, recording };
    // A recording's finish runs on a thread pool at background priority
    // (its thread only hands the work over), parallel products included:
    // the kernel serves live work first and recordings from what is left.
    let background = Arc::new(
        nexus_core::priority::background_pool("decoder-bg")
            .expect("building the decoder's background thread pool"),
    );
    let mut finishers = Vec::new();
    for (lane, rx) in [("live", live_rx), ("rec", recording_rx)] {
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..FINISHERS {
            let (rx, out) = (rx.clone(), out.clone());
            let background = (lane == "rec").then(|| background.clone());
            finishers.push(
                std::thread::Builder::new()
                    .name(format!("decoder-finish-{lane}-{i}"))
                    .spawn(move || {
                        loop {
                            let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                            let Ok(a) = next else { return };
                            let done = match &background {
                                Some(pool) => pool.install(|| finish(a)),
                                None => finish(a),
                            };
                            let _ = out.send(done);
                        }
                    })
                    .expect("spawning a decoder finisher thread"),
            );
        }
    }
    // Starting a sequence (the audio's cross-attention keys and values, the
    // prompt) runs beside the steps too: the step loop only steps.
    let (started, starting) = std::sync::mpsc::channel::<Active>();
    let starter = {
        let (models, out, finishing) = (models.clone(), out.clone(), finishing.clone());
        std::thread::Builder::new()
            .name("decoder-start".into())
            .spawn(move || start_jobs(&models, &jobs, &started, &finishing, &out))
            .expect("spawning the decoder starter thread")
    };
    step_pool(slots, starting, out, finishing);
    let _ = starter.join();
    for f in finishers {
        let _ = f.join();
    }
}

/// Where sequences go to be finished: a live session's to the live
/// finishers, a recording's to its own.
#[derive(Clone)]
struct Finishing {
    live: std::sync::mpsc::Sender<Active>,
    recording: std::sync::mpsc::Sender<Active>,
}

impl Finishing {
    fn send(&self, a: Active) {
        let lane = match work_of(&a.job.seg) {
            Work::Recording => &self.recording,
            Work::LiveFinal | Work::Interim => &self.live,
        };
        let _ = lane.send(a);
    }
}

/// Starts jobs as they arrive, finals first, dropping interims that a newer
/// window of their utterance supersedes, until `jobs` closes.
fn start_jobs(
    models: &ModelSet,
    jobs: &Receiver<Job>,
    started: &std::sync::mpsc::Sender<Active>,
    finishing: &Finishing,
    out: &tokio::sync::mpsc::UnboundedSender<Output>,
) {
    while let Ok(first) = jobs.recv() {
        let mut incoming = vec![first];
        while let Ok(j) = jobs.try_recv() {
            incoming.push(j);
        }
        let (keep, dropped, _) = triage(incoming, |j: &Job| &j.seg, &[]);
        for job in dropped {
            let _ = out.send(superseded(job));
        }
        for job in keep {
            match start(job, models) {
                // Beam search or sampling: nothing for the step loop.
                Ok(a) if matches!(a.kind, Kind::Whisper { seq: None, .. }) => finishing.send(a),
                Ok(a) => {
                    let _ = started.send(a);
                }
                Err(failure) => {
                    let (job, e) = *failure;
                    tracing::warn!(error = %e, "segment cannot be decoded");
                    let _ = out.send(failed(job, e));
                }
            }
        }
    }
}

/// Threads that finish sequences beside the token steps, per lane (live
/// sessions, recordings).
const FINISHERS: usize = 2;

fn step_pool(
    slots: usize,
    jobs: Receiver<Active>,
    out: tokio::sync::mpsc::UnboundedSender<Output>,
    finished: Finishing,
) {
    let mut active: Vec<Active> = Vec::new();
    let mut open = true;
    loop {
        // Join new sequences: wait when idle, otherwise take what is there.
        let mut incoming = Vec::new();
        if active.is_empty() {
            if !open {
                break;
            }
            match jobs.recv() {
                Ok(j) => incoming.push(j),
                Err(_) => break,
            }
        }
        while open && active.len() + incoming.len() < slots {
            match jobs.try_recv() {
                Ok(j) => incoming.push(j),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        // An interim whose utterance has moved on is no longer decoded: its
        // slot goes to the newer window.
        let (incoming, dropped, stale) = triage(incoming, |a: &Active| &a.job.seg, &active);
        for a in dropped {
            let _ = out.send(superseded(a.job));
        }
        for i in stale {
            let _ = out.send(superseded(active.swap_remove(i).job));
        }
        active.extend(incoming);
        // Pick every sequence's next token; finished ones leave the batch.
        // (A pass over the vocabulary each: side by side on the thread pool.)
        let picked: Vec<Option<u32>> = active.par_iter_mut().map(Active::advance).collect();
        let mut feed: Vec<(usize, u32)> = Vec::new();
        let mut done: Vec<usize> = Vec::new();
        for (i, p) in picked.into_iter().enumerate() {
            match p {
                Some(t) => feed.push((i, t)),
                None => done.push(i),
            }
        }
        let width = feed.len();
        for (i, _) in &feed {
            active[*i].batch = active[*i].batch.max(width);
        }
        // One forward pass per model over all its sequences.
        let mut models_in_step: Vec<&str> = feed
            .iter()
            .map(|(i, _)| active[*i].model.as_str())
            .collect();
        models_in_step.sort_unstable();
        models_in_step.dedup();
        let models_in_step: Vec<String> = models_in_step.into_iter().map(str::to_owned).collect();
        let mut broken: Vec<(usize, String)> = Vec::new();
        for m in &models_in_step {
            let idx: Vec<usize> = feed
                .iter()
                .filter(|(i, _)| active[*i].model == *m)
                .map(|(i, _)| *i)
                .collect();
            let tokens: Vec<u32> = feed
                .iter()
                .filter(|(i, _)| active[*i].model == *m)
                .map(|(_, t)| *t)
                .collect();
            let stepped = match &active[idx[0]].kind {
                Kind::Whisper { engine, .. } => {
                    let engine = engine.clone();
                    let mut seqs: Vec<&mut GreedySequence> = active
                        .iter_mut()
                        .enumerate()
                        .filter(|(i, _)| idx.contains(i))
                        .filter_map(|(_, a)| match &mut a.kind {
                            Kind::Whisper { seq, .. } => seq.as_mut(),
                            Kind::Nexus { .. } => None,
                        })
                        .collect();
                    step_batch(&engine.model, &mut seqs, &tokens).map_err(|e| e.to_string())
                }
                Kind::Nexus { model, .. } => {
                    let model = model.clone();
                    let mut sessions: Vec<&mut LmSession> = active
                        .iter_mut()
                        .enumerate()
                        .filter(|(i, _)| idx.contains(i))
                        .filter_map(|(_, a)| match &mut a.kind {
                            Kind::Nexus { session, .. } => Some(session.as_mut()),
                            Kind::Whisper { .. } => None,
                        })
                        .collect();
                    model
                        .lm()
                        .step_batch(&tokens, &mut sessions)
                        .map_err(|e| e.to_string())
                }
            };
            if let Err(e) = stepped {
                tracing::error!(model = %m, error = %e, batch = tokens.len(), "decoder step failed");
                broken.extend(idx.iter().map(|i| (*i, e.to_string())));
            }
        }
        // Retire finished and failed sequences, highest index first.
        let mut retire: Vec<(usize, Option<String>)> =
            done.into_iter().map(|i| (i, None)).collect();
        retire.extend(broken.into_iter().map(|(i, e)| (i, Some(e))));
        retire.sort_by_key(|r| std::cmp::Reverse(r.0));
        retire.dedup_by_key(|r| r.0);
        for (i, err) in retire {
            let a = active.swap_remove(i);
            match err {
                None => finished.send(a),
                Some(e) => {
                    let _ = out.send(failed(a.job, e));
                }
            }
        }
    }
}

/// Where a window's utterance starts in the session's audio: after the
/// window's digital silence and lead of quiet.
fn utterance_start_ms(seg: &EncodedSegment) -> u64 {
    (seg.start_ms + seg.lead_ms).saturating_sub(seg.silence_ms)
}

#[cfg(test)]
mod tests {
    use super::{Job, Slot, after_audio, temperature_ladder, token_budget, triage};
    use nexus_proto::pipeline::{EncodedSegment, Envelope};
    use std::sync::Arc;

    /// A live session's window.
    fn job(session: &str, segment: u64, revision: u32, is_final: bool) -> Job {
        let mut j = recording(session, segment, is_final);
        if let Some(e) = j.seg.envelope.as_mut() {
            e.revision = revision;
            e.live = true;
        }
        j
    }

    /// A recording's window.
    fn recording(session: &str, segment: u64, is_final: bool) -> Job {
        let permits = Arc::new(tokio::sync::Semaphore::new(1));
        Job {
            id: "1-1".parse().expect("an entry id"),
            seg: EncodedSegment {
                envelope: Some(Envelope {
                    session_id: session.into(),
                    segment_id: segment,
                    revision: 1,
                    ..Default::default()
                }),
                is_final,
                ..Default::default()
            },
            permit: Slot::new(
                permits.try_acquire_owned().expect("a permit"),
                Arc::default(),
            ),
            fresh: None,
            span: tracing::Span::none(),
        }
    }

    #[test]
    fn finals_go_first_and_superseded_interims_are_dropped() {
        let arrived = vec![
            recording("file", 0, true), // a recording's window: last
            job("a", 1, 1, false),      // superseded by revision 2
            job("b", 4, 3, false),      // the newest of its utterance
            job("a", 1, 2, false),      // superseded by the final
            job("a", 1, 3, true),
            job("a", 2, 1, false), // the next utterance: kept
        ];
        let (keep, dropped, stale) = triage(arrived, |j: &Job| &j.seg, &[]);
        let shape = |j: &Job| {
            let e = j.seg.envelope.clone().unwrap_or_default();
            (e.session_id, e.segment_id, e.revision, j.seg.is_final)
        };
        assert_eq!(
            keep.iter().map(shape).collect::<Vec<_>>(),
            [
                ("a".into(), 1, 3, true),
                ("b".into(), 4, 3, false),
                ("a".into(), 2, 1, false),
                ("file".into(), 0, 1, true)
            ]
        );
        assert_eq!(
            dropped.iter().map(shape).collect::<Vec<_>>(),
            [("a".into(), 1, 1, false), ("a".into(), 1, 2, false)]
        );
        assert!(stale.is_empty());
    }

    #[test]
    fn short_windows_decode_to_few_tokens_and_nothing_after_their_audio() {
        assert_eq!(token_budget(300), 77);
        assert_eq!(token_budget(1_000), 182);
        assert_eq!(token_budget(3_000), 224);
        assert_eq!(token_budget(0), 32);
        assert!((after_audio(300) - 2.9).abs() < 1e-6);
        assert_eq!(after_audio(5), 0.0);
    }

    #[test]
    fn the_ladder_starts_at_the_asked_temperature() {
        assert_eq!(temperature_ladder(0.0).len(), 6);
        assert_eq!(temperature_ladder(0.0)[5], 1.0);
        let l = temperature_ladder(0.5);
        assert_eq!(l.len(), 3);
        assert!(
            (l[0] - 0.5).abs() < 1e-6 && (l[2] - 0.9).abs() < 1e-6,
            "{l:?}"
        );
        assert_eq!(temperature_ladder(1.0), vec![1.0]);
    }
}
