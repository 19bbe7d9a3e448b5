//! Long audio: 30 s windows that advance by the last timestamp the model
//! emitted (so no word is cut or repeated at a border), temperature fallback on
//! degenerate output, no-speech skipping, conditioning on previous text, and
//! removal of the phrases Whisper is known to invent over silence.

use candle_core::Tensor;

use super::WhisperEngine;
use super::align::{TimedWord, align};
use super::decode::{DecodeOptions, DecodeResult, Task, decode, detect_language};
use crate::error::{ModelError, Result};
use crate::mel::{CHUNK_FRAMES, CHUNK_SAMPLES, HOP_LENGTH, SAMPLE_RATE};

/// How to transcribe a recording.
#[derive(Debug, Clone)]
pub struct TranscribeOptions {
    /// Transcribe, or translate into English.
    pub task: Task,
    /// Spoken language; `None` detects it from the first window.
    pub language: Option<String>,
    /// Beams of deterministic decoding (1 = greedy).
    pub beam_size: usize,
    /// Samples per window when sampling.
    pub best_of: usize,
    /// Beam search patience.
    pub patience: f32,
    /// Temperatures tried in order until the output is not degenerate.
    pub temperatures: Vec<f32>,
    /// Output more compressible than this is a repetition loop.
    pub compression_ratio_threshold: Option<f32>,
    /// Output with a lower mean log-probability is unreliable.
    pub logprob_threshold: Option<f32>,
    /// A window with a higher no-speech probability (and low confidence) is silence.
    pub no_speech_threshold: Option<f32>,
    /// Prompt each window with the text before it.
    pub condition_on_previous_text: bool,
    /// Text that precedes the recording (style, vocabulary).
    pub initial_prompt: Option<String>,
    /// Terms to favour; they join the prompt.
    pub hotwords: Vec<String>,
    /// Time every word.
    pub word_timestamps: bool,
}

impl Default for TranscribeOptions {
    fn default() -> Self {
        Self {
            task: Task::Transcribe,
            language: None,
            beam_size: 5,
            best_of: 5,
            patience: 1.0,
            temperatures: vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
            compression_ratio_threshold: Some(2.4),
            logprob_threshold: Some(-1.0),
            no_speech_threshold: Some(0.6),
            condition_on_previous_text: true,
            initial_prompt: None,
            hotwords: Vec::new(),
            word_timestamps: false,
        }
    }
}

/// A timed stretch of text.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// Position in the transcript.
    pub id: usize,
    /// Start, seconds from the beginning of the audio.
    pub start: f32,
    /// End, seconds.
    pub end: f32,
    /// Text, with Whisper's leading space.
    pub text: String,
    /// Tokens, timestamps included.
    pub tokens: Vec<u32>,
    /// Temperature that produced it.
    pub temperature: f32,
    /// Mean token log-probability of its window.
    pub avg_logprob: f32,
    /// Compression ratio of its window's text.
    pub compression_ratio: f32,
    /// No-speech probability of its window.
    pub no_speech_prob: f32,
    /// Word timings (seconds from the beginning), when asked for.
    pub words: Vec<TimedWord>,
}

/// The result of a transcription.
#[derive(Debug, Clone)]
pub struct Transcript {
    /// Language code of the audio.
    pub language: String,
    /// Segments in time order.
    pub segments: Vec<Segment>,
    /// Audio duration, seconds.
    pub duration: f32,
}

impl Transcript {
    /// All segment texts joined.
    pub fn text(&self) -> String {
        self.segments
            .iter()
            .map(|s| s.text.as_str())
            .collect::<String>()
            .trim()
            .to_owned()
    }
}

/// What one decoded window yields.
#[derive(Debug, Clone)]
pub struct WindowOutcome {
    /// Its segments, in order.
    pub segments: Vec<Segment>,
    /// Mel frames of the window the decoded text covers; the next window starts there.
    pub consumed: usize,
    /// The window held no speech.
    pub silent: bool,
}

/// Texts Whisper produces over silence or music, learnt from subtitle credits.
const HALLUCINATIONS: &[&str] = &[
    "thank you.",
    "thank you",
    "thanks for watching!",
    "thanks for watching.",
    "thank you for watching.",
    "thank you for watching!",
    "please subscribe to my channel.",
    "subtitles by the amara.org community",
    "you",
    "bye.",
    "bye!",
    "...",
];

fn rms(samples: &[f32]) -> f32 {
    if samples.is_empty() {
        return 0.0;
    }
    (samples.iter().map(|s| s * s).sum::<f32>() / samples.len() as f32).sqrt()
}

impl WhisperEngine {
    /// Decodes a window, retrying at the next temperature while the output looks
    /// degenerate (compression ratio, mean log-probability). `first` is an attempt
    /// at the first temperature already made elsewhere (a decoder pool).
    pub fn decode_with_fallback(
        &self,
        audio: &Tensor,
        base: &DecodeOptions,
        o: &TranscribeOptions,
        mut first: Option<DecodeResult>,
    ) -> Result<DecodeResult> {
        let mut last = None;
        for &t in &o.temperatures {
            let opts = DecodeOptions {
                temperature: t,
                ..base.clone()
            };
            let r = match first.take() {
                Some(r) => r,
                None => decode(&self.model, &self.tokenizer, audio, &opts)?,
            };
            let mut fallback = o
                .compression_ratio_threshold
                .is_some_and(|th| r.compression_ratio > th)
                || o.logprob_threshold.is_some_and(|th| r.avg_logprob < th);
            if o.no_speech_threshold
                .is_some_and(|th| r.no_speech_prob > th)
                && o.logprob_threshold.is_some_and(|th| r.avg_logprob < th)
            {
                fallback = false;
            }
            let done = !fallback;
            last = Some(r);
            if done {
                break;
            }
        }
        last.ok_or_else(|| ModelError::Input("no temperatures to decode with".into()))
    }

    /// Transcribes 16 kHz mono samples. `progress` gets the fraction done.
    pub fn transcribe(
        &self,
        samples: &[f32],
        o: &TranscribeOptions,
        progress: &mut dyn FnMut(f32),
    ) -> Result<Transcript> {
        if samples.is_empty() {
            return Err(ModelError::Input("the audio is empty".into()));
        }
        let duration = samples.len() as f32 / SAMPLE_RATE as f32;
        let t0 = std::time::Instant::now();
        let mel = self.mel.compute(samples, CHUNK_SAMPLES)?;
        tracing::debug!(mel_ms = t0.elapsed().as_millis() as u64, "log-mel");
        let mel = mel.to_tensor(&self.device)?;
        let content_frames = samples.len() / HOP_LENGTH;

        let mut prompt_text = String::new();
        if let Some(p) = &o.initial_prompt {
            prompt_text.push_str(p.trim());
        }
        if !o.hotwords.is_empty() {
            if !prompt_text.is_empty() {
                prompt_text.push(' ');
            }
            prompt_text.push_str(&o.hotwords.join(", "));
        }
        let mut all_tokens: Vec<u32> = if prompt_text.is_empty() {
            Vec::new()
        } else {
            self.tokenizer.encode(&format!(" {prompt_text}"))?
        };
        let mut prompt_reset = 0usize;
        let mut segments: Vec<Segment> = Vec::new();
        let mut seek = 0usize;
        let mut language = o.language.clone();
        while seek < content_frames {
            progress(seek as f32 / content_frames as f32);
            let time_offset = (seek * HOP_LENGTH) as f32 / SAMPLE_RATE as f32;
            let segment_size = CHUNK_FRAMES.min(content_frames - seek);
            let audio = self.encode_window(&mel, seek)?;
            if language.is_none() {
                let probs = detect_language(&self.model, &self.tokenizer, &audio)?;
                language = probs.first().map(|(c, _)| c.clone());
            }
            let lang = language.clone().unwrap_or_else(|| "en".into());
            let base = DecodeOptions {
                task: o.task,
                language: Some(lang.clone()),
                beam_size: o.beam_size,
                best_of: o.best_of,
                patience: o.patience,
                prompt: all_tokens[prompt_reset..].to_vec(),
                ..DecodeOptions::default()
            };
            let t0 = std::time::Instant::now();
            let mut r = self.decode_with_fallback(&audio, &base, o, None)?;
            if !base.prompt.is_empty() && self.skips_speech(&r.tokens) {
                // Conditioned on text that already holds these words, Whisper can jump
                // over repeated speech; the same window without the prompt does not.
                tracing::debug!(
                    seek,
                    "segment far slower than speech; decoding again without the prompt"
                );
                let fresh = DecodeOptions {
                    prompt: Vec::new(),
                    ..base.clone()
                };
                r = self.decode_with_fallback(&audio, &fresh, o, None)?;
            }
            tracing::debug!(
                seek,
                decode_ms = t0.elapsed().as_millis() as u64,
                tokens = r.tokens.len(),
                temperature = r.temperature,
                "decoded window"
            );
            let previous_seek = seek;
            let quiet = |a: f32, b: f32| {
                let a = ((a * SAMPLE_RATE as f32) as usize).min(samples.len());
                let b = ((b * SAMPLE_RATE as f32) as usize).clamp(a, samples.len());
                rms(&samples[a..b]) < 0.01
            };
            let out =
                self.finish_window(&r, &audio, time_offset, segment_size, &quiet, &lang, o)?;
            seek += out.consumed;
            if out.silent {
                continue;
            }
            let new_segments = out.segments;
            for mut s in new_segments {
                s.id = segments.len();
                all_tokens.extend(&s.tokens);
                segments.push(s);
            }
            if !o.condition_on_previous_text || r.temperature > 0.5 {
                prompt_reset = all_tokens.len();
            }
            if seek <= previous_seek {
                seek = previous_seek + segment_size;
            }
        }
        progress(1.0);
        Ok(Transcript {
            language: language.unwrap_or_else(|| "en".into()),
            segments,
            duration,
        })
    }

    /// Turns one decoded window into segments: drops it when it is silence,
    /// cuts it at timestamp pairs, drops known hallucinations over quiet audio
    /// (`quiet(start_s, end_s)` judges the span), times words when asked, and
    /// says how many mel frames of the window the text covers.
    #[allow(clippy::too_many_arguments)]
    pub fn finish_window(
        &self,
        r: &DecodeResult,
        audio: &Tensor,
        time_offset: f32,
        segment_size: usize,
        quiet: &dyn Fn(f32, f32) -> bool,
        lang: &str,
        o: &TranscribeOptions,
    ) -> Result<WindowOutcome> {
        let tb = self.tokenizer.specials.timestamp_begin;
        let consumed;
        if let Some(th) = o.no_speech_threshold {
            let silent =
                r.no_speech_prob > th && !o.logprob_threshold.is_some_and(|lt| r.avg_logprob > lt);
            if silent {
                return Ok(WindowOutcome {
                    segments: Vec::new(),
                    consumed: segment_size,
                    silent: true,
                });
            }
        }
        let tokens = &r.tokens;
        let is_ts: Vec<bool> = tokens.iter().map(|t| *t >= tb).collect();
        let single_ending = is_ts.len() >= 2 && !is_ts[is_ts.len() - 2] && is_ts[is_ts.len() - 1]
            || is_ts.len() == 1 && is_ts[0];
        let mut cuts: Vec<usize> = (1..tokens.len())
            .filter(|&i| is_ts[i - 1] && is_ts[i])
            .collect();
        let mut current: Vec<(f32, f32, Vec<u32>)> = Vec::new();
        let ts = |t: u32| (t - tb) as f32 * 0.02;
        if !cuts.is_empty() {
            if single_ending {
                cuts.push(tokens.len());
            }
            let mut last = 0;
            for &c in &cuts {
                let slice = &tokens[last..c];
                if let (Some(&a), Some(&b)) = (slice.first(), slice.last())
                    && a >= tb
                    && b >= tb
                {
                    current.push((time_offset + ts(a), time_offset + ts(b), slice.to_vec()));
                }
                last = c;
            }
            consumed = if single_ending {
                segment_size
            } else {
                (tokens[last - 1] - tb) as usize * 2
            };
        } else {
            let mut dur = segment_size as f32 * HOP_LENGTH as f32 / SAMPLE_RATE as f32;
            if let Some(&t) = tokens.iter().rev().find(|t| **t >= tb)
                && t != tb
            {
                dur = ts(t);
            }
            current.push((time_offset, time_offset + dur, tokens.clone()));
            consumed = segment_size;
        }
        let mut new_segments: Vec<Segment> = Vec::new();
        for (start, end, toks) in current {
            let text = self.tokenizer.decode(&toks)?;
            if start == end || text.trim().is_empty() {
                continue;
            }
            let known = HALLUCINATIONS.contains(&text.trim().to_lowercase().as_str());
            if known && (quiet(start, end) || r.no_speech_prob > 0.3) {
                tracing::debug!(text = %text, "dropped a known hallucination over quiet audio");
                continue;
            }
            new_segments.push(Segment {
                id: 0,
                start,
                end,
                text,
                tokens: toks,
                temperature: r.temperature,
                avg_logprob: r.avg_logprob,
                compression_ratio: r.compression_ratio,
                no_speech_prob: r.no_speech_prob,
                words: Vec::new(),
            });
        }
        if o.word_timestamps && !new_segments.is_empty() {
            let text_tokens: Vec<u32> = new_segments
                .iter()
                .flat_map(|s| {
                    s.tokens
                        .iter()
                        .copied()
                        .filter(|t| *t < self.tokenizer.specials.eot)
                })
                .collect();
            let prefix = self.sot_sequence(o.task, lang)?;
            let frames = (segment_size).min(CHUNK_FRAMES);
            let words = align(
                &self.model,
                &self.tokenizer,
                audio,
                &prefix,
                &text_tokens,
                frames,
                lang,
            )?;
            let mut it = words.into_iter().peekable();
            for s in &mut new_segments {
                let n_text = s
                    .tokens
                    .iter()
                    .filter(|t| **t < self.tokenizer.specials.eot)
                    .count();
                let mut taken = 0;
                while taken < n_text {
                    let Some(w) = it.next() else { break };
                    taken += self.tokenizer.encode(&w.word).map_or(1, |t| t.len().max(1));
                    let start = (time_offset + w.start).max(s.start).min(s.end);
                    let end = (time_offset + w.end).max(start).min(s.end);
                    s.words.push(TimedWord { start, end, ..w });
                }
            }
        }
        Ok(WindowOutcome {
            segments: new_segments,
            consumed,
            silent: false,
        })
    }

    /// Whether a decoded window has a timestamped segment that covers far more
    /// time than its words need (over 10 s at over 1 s per word), the mark of
    /// speech the decoder jumped over.
    pub fn skips_speech(&self, tokens: &[u32]) -> bool {
        let tb = self.tokenizer.specials.timestamp_begin;
        let mut start: Option<u32> = None;
        let mut text: Vec<u32> = Vec::new();
        for &t in tokens {
            if t < tb {
                text.push(t);
                continue;
            }
            match start {
                Some(a) if !text.is_empty() => {
                    let secs = t.saturating_sub(a) as f32 * 0.02;
                    let words = self
                        .tokenizer
                        .decode(&text)
                        .map_or(0, |s| s.split_whitespace().count())
                        .max(1);
                    if secs > 10.0 && secs / words as f32 > 1.0 {
                        return true;
                    }
                    start = None;
                    text.clear();
                }
                _ => start = Some(t),
            }
        }
        false
    }

    /// `<|startoftranscript|>` with language and task tokens, as decoding starts.
    pub fn sot_sequence(&self, task: Task, language: &str) -> Result<Vec<u32>> {
        let s = &self.tokenizer.specials;
        let mut v = vec![s.sot];
        if self.tokenizer.multilingual {
            v.push(
                self.tokenizer
                    .language_token(language)
                    .ok_or_else(|| ModelError::Input(format!("unknown language {language:?}")))?,
            );
            v.push(match task {
                Task::Transcribe => s.transcribe,
                Task::Translate => s.translate,
            });
        }
        Ok(v)
    }
}
