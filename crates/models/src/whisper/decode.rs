//! Decoding one 30 s window, after OpenAI's `decoding.py`: the prompt and
//! task tokens, logit filters (blank and symbol suppression, timestamp rules),
//! greedy or sampled search with best-of, beam search with patience, and the
//! length-normalised ranking of candidates.

use std::collections::HashMap;

use candle_core::{IndexOp, Tensor};

use super::model::{DecoderState, Whisper};
use super::tokenizer::WhisperTokenizer;
use crate::error::{ModelError, Result};

/// Transcribe in the spoken language, or translate into English.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Speech → text in the same language.
    Transcribe,
    /// Speech → English text.
    Translate,
}

/// How to decode one window.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// What to produce.
    pub task: Task,
    /// Spoken language code; `None` detects it (multilingual models only).
    pub language: Option<String>,
    /// 0 is deterministic (greedy or beam); above 0 samples.
    pub temperature: f32,
    /// Beams at temperature 0; 1 is greedy.
    pub beam_size: usize,
    /// Beam search stops after `beam_size * patience` finished candidates.
    pub patience: f32,
    /// Independent samples at temperature > 0; the best is kept.
    pub best_of: usize,
    /// Emit no timestamp tokens.
    pub without_timestamps: bool,
    /// Latest time the first timestamp may take, in seconds.
    pub max_initial_timestamp: f32,
    /// Text tokens that precede the window (previous text, user prompt, hotwords).
    pub prompt: Vec<u32>,
    /// Most tokens to sample.
    pub sample_len: usize,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            task: Task::Transcribe,
            language: None,
            temperature: 0.0,
            beam_size: 5,
            patience: 1.0,
            best_of: 5,
            without_timestamps: false,
            max_initial_timestamp: 1.0,
            prompt: Vec::new(),
            sample_len: 224,
            seed: 0x5eed,
        }
    }
}

/// Widest beam (and most samples per temperature) a decode runs: each beam
/// holds its own KV cache, so the width bounds a request's memory and time.
pub const MAX_BEAM_SIZE: u32 = 16;

/// The chosen hypothesis of a window.
#[derive(Debug, Clone)]
pub struct DecodeResult {
    /// Sampled tokens, timestamps included, without the final end-of-text.
    pub tokens: Vec<u32>,
    /// Text of the tokens.
    pub text: String,
    /// Language the window was decoded in.
    pub language: String,
    /// Sum of token log-probabilities.
    pub sum_logprob: f32,
    /// Mean log-probability per token (counting end-of-text).
    pub avg_logprob: f32,
    /// Probability of `<|nospeech|>` at the start.
    pub no_speech_prob: f32,
    /// Temperature used.
    pub temperature: f32,
    /// Text bytes over their zlib-compressed bytes; high means repetitive.
    pub compression_ratio: f32,
}

/// Bytes of `text` over bytes of its zlib compression (as Python's `zlib.compress`).
pub fn compression_ratio(text: &str) -> f32 {
    use std::io::Write;
    if text.is_empty() {
        return 0.0;
    }
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(6));
    let _ = enc.write_all(text.as_bytes());
    let n = enc.finish().map_or(1, |v| v.len().max(1));
    text.len() as f32 / n as f32
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|l| l - lse).collect()
}

fn logsumexp(xs: &[f32]) -> f32 {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    max + xs.iter().map(|x| (x - max).exp()).sum::<f32>().ln()
}

/// A small deterministic generator for sampling (SplitMix64).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Logit filters shared by every search.
struct Filters {
    suppress: Vec<u32>,
    blank: Vec<u32>,
    eot: u32,
    no_timestamps: u32,
    timestamp_begin: u32,
    timestamps: bool,
    max_initial: usize,
}

impl Filters {
    fn new(model: &Whisper, tok: &WhisperTokenizer, opts: &DecodeOptions) -> Result<Self> {
        let s = &tok.specials;
        let mut suppress: Vec<u32> = model
            .config
            .suppress_tokens
            .iter()
            .filter_map(|t| u32::try_from(*t).ok())
            .collect();
        suppress.extend([
            s.transcribe,
            s.translate,
            s.sot,
            s.sot_prev,
            s.sot_lm,
            s.no_speech,
        ]);
        suppress.sort_unstable();
        suppress.dedup();
        let mut blank = tok.encode(" ")?;
        blank.push(s.eot);
        Ok(Self {
            suppress,
            blank,
            eot: s.eot,
            no_timestamps: s.no_timestamps,
            timestamp_begin: s.timestamp_begin,
            timestamps: !opts.without_timestamps,
            max_initial: (opts.max_initial_timestamp / 0.02).round() as usize,
        })
    }

    /// Applies every filter to `logits` given the tokens sampled so far.
    fn apply(&self, logits: &mut [f32], sampled: &[u32]) {
        let ninf = f32::NEG_INFINITY;
        let vocab = logits.len();
        if sampled.is_empty() {
            for &t in &self.blank {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = ninf;
                }
            }
        }
        for &t in &self.suppress {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = ninf;
            }
        }
        if !self.timestamps {
            return;
        }
        let tb = self.timestamp_begin as usize;
        if tb >= vocab {
            return;
        }
        logits[self.no_timestamps as usize] = ninf;
        let is_ts = |t: &u32| *t >= self.timestamp_begin;
        let last_ts = sampled.last().is_some_and(is_ts);
        let penult_ts = sampled.len() < 2 || is_ts(&sampled[sampled.len() - 2]);
        if last_ts {
            if penult_ts {
                logits[tb..].fill(ninf);
            } else {
                logits[..self.eot as usize].fill(ninf);
            }
        }
        if let Some(&last) = sampled.iter().rev().find(|t| is_ts(t)) {
            let floor = if last_ts && !penult_ts {
                last
            } else {
                last + 1
            } as usize;
            logits[tb..floor.min(vocab)].fill(ninf);
        }
        if sampled.is_empty() {
            logits[..tb].fill(ninf);
            let last_allowed = tb + self.max_initial;
            if last_allowed + 1 < vocab {
                logits[last_allowed + 1..].fill(ninf);
            }
        }
        let lp = log_softmax(logits);
        let ts = logsumexp(&lp[tb..]);
        let text = lp[..tb].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if ts > text {
            logits[..tb].fill(ninf);
        }
    }
}

/// The `<|startofprev|> prompt <|startoftranscript|> <|lang|> <|task|>` prefix and
/// the index of `<|startoftranscript|>` in it.
fn initial_tokens(
    model: &Whisper,
    tok: &WhisperTokenizer,
    opts: &DecodeOptions,
    language: &str,
) -> Result<(Vec<u32>, usize)> {
    let s = &tok.specials;
    let mut init = Vec::new();
    if !opts.prompt.is_empty() {
        let keep = model.config.max_target_positions / 2 - 1;
        init.push(s.sot_prev);
        init.extend(&opts.prompt[opts.prompt.len().saturating_sub(keep)..]);
    }
    let sot_index = init.len();
    init.push(s.sot);
    if tok.multilingual {
        let lang = tok.language_token(language).ok_or_else(|| {
            ModelError::Input(format!("language {language:?} is not one this model knows"))
        })?;
        init.push(lang);
        init.push(match opts.task {
            Task::Transcribe => s.transcribe,
            Task::Translate => s.translate,
        });
    } else if opts.task == Task::Translate {
        return Err(ModelError::Input(
            "this English-only model cannot translate; use a multilingual model".into(),
        ));
    }
    if opts.without_timestamps {
        init.push(s.no_timestamps);
    }
    Ok((init, sot_index))
}

/// Probabilities of each language for encoded audio (1, S, D), most likely first.
pub fn detect_language(
    model: &Whisper,
    tok: &WhisperTokenizer,
    audio: &Tensor,
) -> Result<Vec<(String, f32)>> {
    if !tok.multilingual || tok.languages.is_empty() {
        return Ok(vec![("en".into(), 1.0)]);
    }
    let mut state = model.decoder.start(audio)?;
    let t = Tensor::new(&[[tok.specials.sot]], audio.device())?;
    let logits: Vec<f32> = model
        .decoder
        .forward(&t, &mut state, false)?
        .logits
        .i((0, 0))?
        .to_vec1()?;
    let lang_logits: Vec<f32> = tok
        .languages
        .iter()
        .map(|(_, id)| logits[*id as usize])
        .collect();
    let lp = log_softmax(&lang_logits);
    let mut probs: Vec<(String, f32)> = tok
        .languages
        .iter()
        .zip(lp)
        .map(|((c, _), l)| (c.clone(), l.exp()))
        .collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(probs)
}

fn rank(candidates: &[(Vec<u32>, f32)]) -> usize {
    candidates
        .iter()
        .enumerate()
        .max_by(|a, b| {
            let sa = a.1.1 / a.1.0.len().max(1) as f32;
            let sb = b.1.1 / b.1.0.len().max(1) as f32;
            sa.total_cmp(&sb)
        })
        .map_or(0, |(i, _)| i)
}

fn last_logits(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let t = logits.dim(1)?;
    Ok(logits.i((.., t - 1))?.to_vec2()?)
}

/// One greedy decoding (temperature 0, one beam) advanced a token at a time,
/// so a decoder pool can put many of them, from different sessions and at
/// different lengths, into one forward pass per step ([`step_batch`]).
pub struct GreedySequence {
    state: DecoderState,
    filters: Filters,
    language: String,
    tokens: Vec<u32>,
    sum_logprob: f32,
    no_speech_prob: f32,
    logits: Vec<f32>,
    remaining: usize,
    max_positions: usize,
    eot: u32,
    done: bool,
}

impl std::fmt::Debug for GreedySequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GreedySequence")
            .field("tokens", &self.tokens.len())
            .field("done", &self.done)
            .finish()
    }
}

impl GreedySequence {
    /// Detects the language when `opts` leaves it open, feeds the prompt and
    /// start-of-transcript tokens, and waits for the first [`advance`](Self::advance).
    pub fn start(
        model: &Whisper,
        tok: &WhisperTokenizer,
        audio: &Tensor,
        opts: &DecodeOptions,
    ) -> Result<Self> {
        if opts.temperature != 0.0 || opts.beam_size > 1 {
            return Err(ModelError::Input(
                "a greedy sequence needs temperature 0 and one beam".into(),
            ));
        }
        let language = match &opts.language {
            Some(l) => l.clone(),
            None if tok.multilingual => detect_language(model, tok, audio)?
                .first()
                .map_or_else(|| "en".to_string(), |(c, _)| c.clone()),
            None => "en".into(),
        };
        let (init, sot_index) = initial_tokens(model, tok, opts, &language)?;
        let filters = Filters::new(model, tok, opts)?;
        let mut state = model.decoder.start(audio)?;
        let first = model.decoder.forward_at(
            &Tensor::new(init.as_slice(), audio.device())?.unsqueeze(0)?,
            &mut state,
            false,
            Some(&[sot_index as u32, init.len() as u32 - 1]),
        )?;
        let no_speech_prob = {
            let l: Vec<f32> = first.logits.i((0, 0))?.to_vec1()?;
            log_softmax(&l)[tok.specials.no_speech as usize].exp()
        };
        let logits = last_logits(&first.logits)?.remove(0);
        let max_positions = model.config.max_target_positions;
        Ok(Self {
            state,
            filters,
            language,
            tokens: Vec::new(),
            sum_logprob: 0.0,
            no_speech_prob,
            logits,
            remaining: opts
                .sample_len
                .min(max_positions.saturating_sub(init.len())),
            max_positions,
            eot: tok.specials.eot,
            done: false,
        })
    }

    /// Picks the next token from the pending logits. Returns the token to feed
    /// the model next, or `None` once the sequence is complete.
    pub fn advance(&mut self) -> Option<u32> {
        if self.done {
            return None;
        }
        if self.remaining == 0 {
            self.done = true;
            return None;
        }
        self.filters.apply(&mut self.logits, &self.tokens);
        // The most likely token and its log-probability, without a softmaxed copy.
        let t = self
            .logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(self.eot, |(i, _)| i as u32);
        self.sum_logprob += self.logits[t as usize] - logsumexp(&self.logits);
        self.tokens.push(t);
        self.remaining -= 1;
        if t == self.eot || self.remaining == 0 || self.state.len() + 1 > self.max_positions {
            self.done = true;
            return None;
        }
        Some(t)
    }

    /// Whether decoding ended.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Tokens sampled so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The result, once done (or cut short by the caller).
    pub fn finish(mut self, tok: &WhisperTokenizer) -> Result<DecodeResult> {
        if let Some(p) = self.tokens.iter().position(|t| *t == self.eot) {
            self.tokens.truncate(p);
        }
        let text = tok.decode(&self.tokens)?;
        Ok(DecodeResult {
            avg_logprob: self.sum_logprob / (self.tokens.len() + 1) as f32,
            compression_ratio: compression_ratio(&text),
            tokens: self.tokens,
            text,
            language: self.language,
            sum_logprob: self.sum_logprob,
            no_speech_prob: self.no_speech_prob,
            temperature: 0.0,
        })
    }
}

/// Feeds `tokens[j]` to `seqs[j]` in one batched forward pass and stores each
/// sequence's next logits.
pub fn step_batch(model: &Whisper, seqs: &mut [&mut GreedySequence], tokens: &[u32]) -> Result<()> {
    let mut states: Vec<&mut DecoderState> = seqs.iter_mut().map(|s| &mut s.state).collect();
    let logits: Vec<Vec<f32>> = model.decoder.step_batch(tokens, &mut states)?.to_vec2()?;
    for (s, l) in seqs.iter_mut().zip(logits) {
        s.logits = l;
    }
    Ok(())
}

/// Decodes one window of encoded audio (1, S, D).
pub fn decode(
    model: &Whisper,
    tok: &WhisperTokenizer,
    audio: &Tensor,
    opts: &DecodeOptions,
) -> Result<DecodeResult> {
    if opts.temperature == 0.0 && opts.beam_size <= 1 {
        let mut seq = GreedySequence::start(model, tok, audio, opts)?;
        while let Some(t) = seq.advance() {
            step_batch(model, &mut [&mut seq], &[t])?;
        }
        return seq.finish(tok);
    }
    let language = match &opts.language {
        Some(l) => l.clone(),
        None if tok.multilingual => detect_language(model, tok, audio)?
            .first()
            .map_or_else(|| "en".to_string(), |(c, _)| c.clone()),
        None => "en".into(),
    };
    let (init, sot_index) = initial_tokens(model, tok, opts, &language)?;
    let filters = Filters::new(model, tok, opts)?;
    let eot = tok.specials.eot;
    let device = audio.device();
    let sample_len = opts
        .sample_len
        .min(model.config.max_target_positions.saturating_sub(init.len()));

    let mut state = model.decoder.start(audio)?;
    let first = model.decoder.forward_at(
        &Tensor::new(init.as_slice(), device)?.unsqueeze(0)?,
        &mut state,
        false,
        Some(&[sot_index as u32, init.len() as u32 - 1]),
    )?;
    let no_speech_prob = {
        let l: Vec<f32> = first.logits.i((0, 0))?.to_vec1()?;
        log_softmax(&l)[tok.specials.no_speech as usize].exp()
    };
    let first_logits = last_logits(&first.logits)?.remove(0);

    let beam = opts.temperature == 0.0 && opts.beam_size > 1;
    let n = if beam {
        opts.beam_size
    } else if opts.temperature > 0.0 {
        opts.best_of.max(1)
    } else {
        1
    };
    let mut rng = Rng(opts.seed);
    // Each live sequence: sampled tokens and summed log-probability.
    let mut seqs: Vec<(Vec<u32>, f32)> = vec![(Vec::new(), 0.0); n];
    let mut finished: Vec<(Vec<u32>, f32)> = Vec::new();
    let max_candidates = ((opts.beam_size as f32 * opts.patience).round() as usize).max(1);
    if n > 1 {
        state.select(&vec![0u32; n])?;
    }
    let mut step_logits: Vec<Vec<f32>> = vec![first_logits; n];

    for _ in 0..sample_len {
        if beam {
            let mut scores: HashMap<Vec<u32>, (f32, usize)> = HashMap::new();
            for (i, ((seq, sum), logits)) in seqs.iter().zip(step_logits.iter_mut()).enumerate() {
                filters.apply(logits, seq);
                let lp = log_softmax(logits);
                let mut idx: Vec<usize> = (0..lp.len()).collect();
                let k = opts.beam_size + 1;
                idx.select_nth_unstable_by(k, |a, b| lp[*b].total_cmp(&lp[*a]));
                for &t in &idx[..k] {
                    if lp[t] == f32::NEG_INFINITY {
                        continue;
                    }
                    let mut cand = seq.clone();
                    cand.push(t as u32);
                    let score = sum + lp[t];
                    scores.entry(cand).or_insert((score, i));
                }
            }
            let mut ordered: Vec<(Vec<u32>, (f32, usize))> = scores.into_iter().collect();
            ordered.sort_by(|a, b| b.1.0.total_cmp(&a.1.0).then_with(|| a.0.cmp(&b.0)));
            let mut next = Vec::new();
            let mut sources = Vec::new();
            let mut newly_finished = Vec::new();
            for (cand, (score, src)) in ordered {
                if cand.last() == Some(&eot) {
                    newly_finished.push((cand, score));
                } else {
                    next.push((cand, score));
                    sources.push(src as u32);
                    if next.len() == opts.beam_size {
                        break;
                    }
                }
            }
            for f in newly_finished {
                if finished.len() >= max_candidates {
                    break;
                }
                finished.push(f);
            }
            if finished.len() >= max_candidates || next.is_empty() {
                break;
            }
            state.select(&sources)?;
            seqs = next;
        } else {
            let mut all_done = true;
            for ((seq, sum), logits) in seqs.iter_mut().zip(step_logits.iter_mut()) {
                if seq.last() == Some(&eot) {
                    continue;
                }
                filters.apply(logits, seq);
                let lp = log_softmax(logits);
                let t = if opts.temperature > 0.0 {
                    let scaled: Vec<f32> = logits.iter().map(|l| l / opts.temperature).collect();
                    let p: Vec<f32> = log_softmax(&scaled).iter().map(|x| x.exp()).collect();
                    let mut r = rng.next_f32();
                    let mut pick = eot as usize;
                    for (i, pi) in p.iter().enumerate() {
                        if *pi > 0.0 {
                            pick = i;
                            if r < *pi {
                                break;
                            }
                            r -= pi;
                        }
                    }
                    pick
                } else {
                    lp.iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .map_or(eot as usize, |(i, _)| i)
                };
                *sum += lp[t];
                seq.push(t as u32);
                if t as u32 != eot {
                    all_done = false;
                }
            }
            if all_done {
                break;
            }
        }
        let last: Vec<u32> = seqs
            .iter()
            .map(|(s, _)| s.last().copied().unwrap_or(eot))
            .collect();
        if state.len() + 1 > model.config.max_target_positions {
            break;
        }
        let out = model.decoder.forward(
            &Tensor::new(last.as_slice(), device)?.unsqueeze(1)?,
            &mut state,
            false,
        )?;
        step_logits = last_logits(&out.logits)?;
    }

    let mut candidates = if beam {
        if finished.is_empty() {
            seqs.clone()
        } else {
            finished
        }
    } else {
        seqs
    };
    for (seq, _) in &mut candidates {
        if let Some(p) = seq.iter().position(|t| *t == eot) {
            seq.truncate(p);
        }
    }
    let best = rank(&candidates);
    let (tokens, sum_logprob) = candidates.swap_remove(best);
    let text = tok.decode(&tokens)?;
    Ok(DecodeResult {
        avg_logprob: sum_logprob / (tokens.len() + 1) as f32,
        compression_ratio: compression_ratio(&text),
        tokens,
        text,
        language,
        sum_logprob,
        no_speech_prob,
        temperature: opts.temperature,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_ratio_flags_repetition() {
        let normal = compression_ratio(
            "And Mr. John Dashwood had then leisure to consider how much there might be.",
        );
        let looped = compression_ratio(&"Thank you. ".repeat(20));
        assert!(normal < 1.5, "{normal}");
        assert!(looped > 2.4, "{looped}");
    }

    #[test]
    fn log_softmax_normalises() {
        let lp = log_softmax(&[1.0, 2.0, f32::NEG_INFINITY]);
        let total: f32 = lp.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert_eq!(lp[2], f32::NEG_INFINITY);
    }

    #[test]
    fn timestamp_rules_follow_whisper() {
        let f = Filters {
            suppress: vec![],
            blank: vec![5],
            eot: 10,
            no_timestamps: 11,
            timestamp_begin: 12,
            timestamps: true,
            max_initial: 2,
        };
        let fresh = || vec![0.0f32; 20];
        // First token: a timestamp no later than max_initial.
        let mut l = fresh();
        f.apply(&mut l, &[]);
        assert!(l[..12].iter().all(|x| x.is_infinite()));
        assert!(l[12..15].iter().all(|x| x.is_finite()) && l[15..].iter().all(|x| x.is_infinite()));
        // After text then one timestamp: timestamp (not earlier) or end-of-text only.
        // End-of-text is made likely so the timestamp-mass rule leaves it alone.
        let mut l = fresh();
        l[10] = 5.0;
        f.apply(&mut l, &[12, 3, 14]);
        assert!(l[..10].iter().all(|x| x.is_infinite()) && l[10].is_finite());
        assert!(l[12..14].iter().all(|x| x.is_infinite()) && l[14].is_finite());
        // After a pair of timestamps: text next, no timestamp.
        let mut l = fresh();
        f.apply(&mut l, &[12, 3, 14, 14]);
        assert!(l[12..].iter().all(|x| x.is_infinite()));
        assert!(l[3].is_finite());
        // When timestamps together outweigh every text token, text is suppressed.
        let mut l = fresh();
        f.apply(&mut l, &[12, 3, 14]);
        assert!(l[..12].iter().all(|x| x.is_infinite()));
    }
}
