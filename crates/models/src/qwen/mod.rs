//! Text translation with a Qwen2.5 instruct model in GGUF (quantised) form.
//!
//! The GGUF file carries everything: weights, hyper-parameters and the
//! byte-level BPE tokenizer (tokens and merges in its metadata), from which a
//! `tokenizers` tokenizer is rebuilt here. Prompts use the model's ChatML format.

use std::io::{Read, Seek};
use std::path::Path;

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use candle_core::Device;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{ModelError, Result};

pub mod lm;
pub mod pieces;
pub mod prompt;

pub use lm::{Cache, QwenLm};

/// Qwen2's pre-tokenisation regex (from its tokenizer configuration).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Block formats requantised to Q8_0 at load. In candle, Q5_0's CPU
/// product has no SIMD kernel: one row through Qwen2.5-0.5B's `ffn_up`
/// (Q5_0) takes 4.5 ms against 0.41 ms as Q8_0, its `ffn_down` (Q6_K)
/// 1.30 against 0.29 ms. Q4_K's kernel is fast, but as Q8_0 the file's
/// last twelve Q4_K matrices run through [`crate::q8`] with the rest: a
/// prompt's rows share each weight block, and the product uses the cores
/// where the fleet serves (candle's own quantised kernels then run on the
/// calling thread only).
const REQUANTISED: [GgmlDType; 5] = [
    GgmlDType::Q4K,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q6K,
];

/// The GGUF rewritten in memory with its [`REQUANTISED`] tensors requantised
/// to Q8_0 (8 bits per weight; finer than the 4–6 it replaces, so the
/// weights change by well under one step of their original grid), or `None`
/// when it holds none.
fn requantized<R: Read + Seek>(
    ct: &gguf_file::Content,
    r: &mut R,
) -> candle_core::Result<Option<Vec<u8>>> {
    if !ct
        .tensor_infos
        .values()
        .any(|t| REQUANTISED.contains(&t.ggml_dtype))
    {
        return Ok(None);
    }
    let t0 = std::time::Instant::now();
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    let mut changed = 0usize;
    for name in names {
        let mut t = ct.tensor(r, name, &Device::Cpu)?;
        if REQUANTISED.contains(&t.dtype()) {
            t = QTensor::quantize(&t.dequantize(&Device::Cpu)?, GgmlDType::Q8_0)?;
            changed += 1;
        }
        tensors.push((name.as_str(), t));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> =
        ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    // Sized up front: growing a half-gigabyte buffer copies it over and over.
    let data: usize = refs.iter().map(|(_, t)| t.storage_size_in_bytes()).sum();
    let mut out = std::io::Cursor::new(Vec::with_capacity(
        data + ct.tensor_data_offset as usize + 64 * refs.len(),
    ));
    gguf_file::write(&mut out, &metadata, &refs)?;
    tracing::info!(
        tensors = changed,
        took_ms = t0.elapsed().as_millis() as u64,
        "requantised Q4_K/Q4_1/Q5_0/Q5_1/Q6_K tensors to Q8_0 for the CPU's SIMD kernels"
    );
    Ok(Some(out.into_inner()))
}

/// English names of the languages prompts mention, by ISO 639-1 code.
pub fn language_name(code: &str) -> Option<&'static str> {
    Some(match code {
        "en" => "English",
        "zh" => "Simplified Chinese",
        "de" => "German",
        "fr" => "French",
        "es" => "Spanish",
        "it" => "Italian",
        "pt" => "Portuguese",
        "ru" => "Russian",
        "ja" => "Japanese",
        "ko" => "Korean",
        "ar" => "Arabic",
        "nl" => "Dutch",
        "pl" => "Polish",
        "tr" => "Turkish",
        "vi" => "Vietnamese",
        "th" => "Thai",
        "id" => "Indonesian",
        "hi" => "Hindi",
        "uk" => "Ukrainian",
        "sv" => "Swedish",
        "cs" => "Czech",
        _ => return None,
    })
}

fn md_strings(ct: &gguf_file::Content, key: &str) -> Result<Vec<String>> {
    let v = ct
        .metadata
        .get(key)
        .ok_or_else(|| ModelError::Load(format!("GGUF has no {key}")))?;
    v.to_vec()
        .map_err(|e| ModelError::Load(format!("{key}: {e}")))?
        .iter()
        .map(|x| {
            x.to_string()
                .cloned()
                .map_err(|e| ModelError::Load(format!("{key}: {e}")))
        })
        .collect()
}

/// Rebuilds the byte-level BPE tokenizer stored in GGUF metadata.
pub fn tokenizer_from_gguf(ct: &gguf_file::Content) -> Result<Tokenizer> {
    let tokens = md_strings(ct, "tokenizer.ggml.tokens")?;
    let merges = md_strings(ct, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = ct
        .metadata
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.iter().filter_map(|x| x.to_i32().ok()).collect())
        .unwrap_or_default();
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .filter_map(|m| m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| ModelError::Load(format!("GGUF tokenizer: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    let split = Split::new(
        SplitPattern::Regex(QWEN2_SPLIT.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| ModelError::Load(format!("GGUF tokenizer regex: {e}")))?;
    tok.with_pre_tokenizer(Some(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, false, false).into(),
    ])));
    tok.with_decoder(Some(ByteLevel::default()));
    // Control tokens (type 3) such as <|im_start|> are matched whole, never split.
    let specials: Vec<AddedToken> = tokens
        .iter()
        .enumerate()
        .filter(|(i, t)| types.get(*i) == Some(&3) || (t.starts_with("<|") && t.ends_with("|>")))
        .map(|(_, t)| AddedToken::from(t.clone(), true))
        .collect();
    tok.add_special_tokens(specials)
        .map_err(|e| ModelError::Load(format!("GGUF tokenizer special tokens: {e}")))?;
    Ok(tok)
}

/// A loaded Qwen2 chat model used as a translator.
pub struct Translator {
    model: QwenLm,
    tokenizer: Tokenizer,
    stop: Vec<u32>,
    /// Tokens whose text holds a line break.
    newline: HashSet<u32>,
    /// Wall-clock time one caption's translation may take, all attempts.
    time_budget: Duration,
    /// Keys and values of prompt prefixes seen (instruction and examples of
    /// a language pair and framing), by their text.
    prefixes: HashMap<String, Prefix>,
    /// Prefix lookups so far: each kept prefix's last use on this clock.
    prefix_clock: u64,
    /// Live sessions' conversations, by session id.
    conversations: HashMap<String, Conversation>,
    /// Counts calls, to find the least recently used conversation.
    clock: u64,
    /// The tokens that end a turn (`<|im_end|>` and its line break).
    turn_end: Vec<u32>,
}

/// Conversations kept at most, one per live session translated here; past
/// it the least recently used is dropped (about 8-12 MB each for the 0.5B
/// model: three captions, their translations and the turn being made, at
/// 24.6 KB of keys and values per token).
pub const MAX_CONVERSATIONS: usize = 32;

/// A live session's captions as one conversation with the model: the
/// instruction and examples (shared by every session of the language
/// pair), then each caption a user turn and its translation the
/// assistant's reply. The keys and values of the turns so far are kept, so
/// a caption pays for its own tokens only, and the session's earlier
/// captions and their translations are its context. The oldest turns are
/// dropped from the cache as new ones come (at most
/// [`prompt::MAX_CONTEXT`] kept besides the newest).
struct Conversation {
    /// Source (when known) and target language.
    pair: (Option<String>, String),
    /// Everything run so far, up to the last reply's last token fed.
    cache: Cache,
    /// Tokens of the last reply not yet in the cache, and the turn's end.
    pending: Vec<u32>,
    /// Own entries of each finished turn in the cache, oldest first.
    turns: VecDeque<usize>,
    /// Where the newest turn starts among the cache's own entries.
    open: usize,
    /// The newest caption's text.
    last: String,
    /// When it was last used, by [`Translator::clock`].
    used: u64,
}

impl Conversation {
    /// Whether `spec` continues this conversation: a caption of its context
    /// is the one translated here last (or ends with it: a session's
    /// context holds whole utterances, translated here piece by piece).
    /// Captions after it that never reached the conversation (skipped as
    /// behind) are left out of it; the conversation goes on.
    fn continues(&self, spec: &prompt::Spec<'_>) -> bool {
        let last = self.last.trim();
        !last.is_empty()
            && spec.context.iter().any(|c| c.trim_end().ends_with(last))
            && self.pair.0.as_deref() == spec.source
            && self.pair.1 == spec.target
    }
}

/// What a live session's kept conversation holds
/// ([`Translator::conversation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversationState {
    /// Finished turns held besides the newest (at most
    /// [`prompt::MAX_CONTEXT`]).
    pub turns: usize,
    /// Key/value entries held, the shared prefix included.
    pub entries: usize,
    /// Positions used: entries held plus those dropped.
    pub positions: usize,
    /// Bytes of the conversation's own entries (the prefix is shared).
    pub bytes: usize,
}

/// The first attempt at a live caption ([`Translator::live_first`]).
#[derive(Debug)]
pub enum LiveFirst {
    /// Translated (or failed on its own: an unsupported language, a prompt
    /// too long).
    Done(Result<Translated>),
    /// The first output failed the checks: retry with
    /// [`Translator::live_retry`].
    Retry(LiveRetry),
}

/// A live caption to retry: its session's conversation up to the reply,
/// and the first output.
pub struct LiveRetry {
    session: String,
    conversation: Conversation,
    first: String,
    tokens: usize,
    deadline: Instant,
}

impl std::fmt::Debug for LiveRetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveRetry")
            .field("session", &self.session)
            .field("first", &self.first)
            .finish()
    }
}

/// A reply being decoded greedily.
struct Seq {
    cache: Cache,
    out: Vec<u32>,
    /// How many of `out` the cache holds.
    fed: usize,
    next: u32,
    left: usize,
    until: Until,
    done: bool,
}

/// Tokens one reply may take at most, whatever the source's length: a
/// caption (or a piece of a long text, see [`pieces`]) translates in far
/// fewer; a reply that runs on repeats itself.
pub const MAX_REPLY_TOKENS: usize = 384;

/// Tokens a reply to a source of `source_tokens` may take.
pub fn reply_budget(source_tokens: usize) -> usize {
    (source_tokens * 3 + 32).min(MAX_REPLY_TOKENS)
}

/// Wall-clock time one caption's translation may take by default, over
/// all its attempts: past it the reply in progress ends and the caption is
/// judged on what came, so no caption holds the translation thread for
/// long (see [`Translator::with_time_budget`]).
pub const DEFAULT_TIME_BUDGET: Duration = Duration::from_secs(15);

/// When a reply ends, besides the model's end-of-turn tokens.
#[derive(Debug, Clone, Copy)]
pub struct Until {
    /// Tokens generated at most.
    pub tokens: usize,
    /// End at the first line break after some text: a caption's
    /// translation is the first line of the reply, and what a model adds
    /// after it is commentary, not worth decoding.
    pub one_line: bool,
    /// End by this time, whatever else.
    pub deadline: Option<Instant>,
}

impl Until {
    /// At most `tokens` tokens, any number of lines, no deadline.
    pub fn tokens(tokens: usize) -> Self {
        Self {
            tokens,
            one_line: false,
            deadline: None,
        }
    }

    fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// Prompt prefixes whose keys and values are kept (about 10 MB each for
/// the 0.5B model's few-shot prefix); past it the least recently used is
/// dropped.
const MAX_PREFIXES: usize = 16;

/// A kept prompt prefix and when it was last used.
struct Prefix {
    cache: Cache,
    used: u64,
}

/// Drops the entries of `map` with the smallest `used` until at most
/// `keep` are left.
fn drop_least_used<V>(map: &mut HashMap<String, V>, keep: usize, used: impl Fn(&V) -> u64) {
    while map.len() > keep {
        let Some(oldest) = map
            .iter()
            .min_by_key(|(_, v)| used(v))
            .map(|(k, _)| k.clone())
        else {
            break;
        };
        map.remove(&oldest);
    }
}

impl std::fmt::Debug for Translator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Translator")
            .field("model", &self.model)
            .field("stop", &self.stop)
            .field("prefixes", &self.prefixes.len())
            .finish()
    }
}

fn render(turns: &[prompt::Turn]) -> String {
    turns
        .iter()
        .map(|t| format!("<|im_start|>{}\n{}<|im_end|>\n", t.role, t.content))
        .collect()
}

impl Translator {
    /// Loads a Qwen2 GGUF file, its [`REQUANTISED`] block formats
    /// requantised to Q8_0.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::load_with(path, device, true, lm::Products::default())
    }

    /// Loads a Qwen2 GGUF file with its tensors as stored (for comparison).
    pub fn load_as_stored(path: &Path, device: &Device) -> Result<Self> {
        Self::load_with(path, device, false, lm::Products::default())
    }

    /// Loads a Qwen2 GGUF file, requantised as [`Self::load`] does or as
    /// stored, its Q8_0 products computed by `products` (the benchmarks
    /// compare the kernels on the same weights).
    pub fn load_with(
        path: &Path,
        device: &Device,
        requantize: bool,
        products: lm::Products,
    ) -> Result<Self> {
        let mut f = std::fs::File::open(path)
            .map_err(|e| ModelError::Load(format!("{}: {e}", path.display())))?;
        Self::from_reader(&mut f, path, device, requantize, products)
    }

    fn from_reader<R: Read + Seek>(
        r: &mut R,
        path: &Path,
        device: &Device,
        requantize: bool,
        products: lm::Products,
    ) -> Result<Self> {
        let ct = gguf_file::Content::read(r)
            .map_err(|e| ModelError::Load(format!("{}: not a GGUF file: {e}", path.display())))?;
        let arch = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_default();
        if arch != "qwen2" {
            return Err(ModelError::Load(format!(
                "{}: architecture {arch:?} is not qwen2",
                path.display()
            )));
        }
        let tokenizer = tokenizer_from_gguf(&ct)?;
        let load = |e: candle_core::Error| ModelError::Load(format!("{}: {e}", path.display()));
        let buf = if requantize {
            requantized(&ct, r).map_err(load)?
        } else {
            None
        };
        let in_file = |e: ModelError| ModelError::Load(format!("{}: {e}", path.display()));
        let model = match buf {
            Some(buf) => {
                let mut c = std::io::Cursor::new(buf);
                let ct = gguf_file::Content::read(&mut c).map_err(load)?;
                QwenLm::from_gguf_with(&ct, &mut c, device, products).map_err(in_file)?
            }
            None => QwenLm::from_gguf_with(&ct, r, device, products).map_err(in_file)?,
        };
        let stop = ["<|im_end|>", "<|endoftext|>"]
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect();
        // Byte-level BPE writes the line feed byte as 'Ċ'.
        let newline = tokenizer
            .get_vocab(true)
            .into_iter()
            .filter(|(t, _)| t.contains('Ċ') || t.contains('\n'))
            .map(|(_, id)| id)
            .collect();
        Self {
            model,
            tokenizer,
            stop,
            newline,
            time_budget: DEFAULT_TIME_BUDGET,
            prefixes: HashMap::new(),
            prefix_clock: 0,
            conversations: HashMap::new(),
            clock: 0,
            turn_end: Vec::new(),
        }
        .with_turn_end()
    }

    fn with_turn_end(mut self) -> Result<Self> {
        self.turn_end = self.encode("<|im_end|>\n")?;
        Ok(self)
    }

    /// Sets the wall-clock time one caption's translation may take (see
    /// [`DEFAULT_TIME_BUDGET`]).
    pub fn with_time_budget(mut self, budget: Duration) -> Self {
        self.time_budget = budget;
        self
    }

    /// Whether `out`, the reply so far ending in a line-break token, has
    /// finished its first non-empty line.
    fn line_done(&self, out: &[u32]) -> Result<bool> {
        let text = self
            .tokenizer
            .decode(out, true)
            .map_err(|e| ModelError::Input(format!("cannot detokenize: {e}")))?;
        Ok(text.trim_start().contains('\n'))
    }

    /// When a reply translating `source` ends: its [`reply_budget`], its
    /// first line when `one_line`, `deadline`.
    fn reply_until(
        &self,
        source: &str,
        one_line: bool,
        deadline: Option<Instant>,
    ) -> Result<Until> {
        Ok(Until {
            tokens: reply_budget(self.encode(source)?.len()),
            one_line,
            deadline,
        })
    }

    /// Whether a reply `out` whose last token is `last` ends under `until`:
    /// at the end of its line where it takes one, or where it has gone
    /// round in a loop ([`loops_back`]): a greedy reply that repeats itself
    /// would repeat to its token budget, holding every reply batched with it.
    fn ends(&self, out: &[u32], last: u32, until: &Until) -> Result<bool> {
        Ok(loops_back(out)
            || (until.one_line && self.newline.contains(&last) && self.line_done(out)?))
    }

    /// The model.
    pub fn model(&self) -> &QwenLm {
        &self.model
    }

    /// Token ids of `text` (special tokens recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ModelError::Input(format!("cannot tokenize: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// The cache after the prompt prefix `text`, from the kept ones or run now.
    fn prefix_cache(&mut self, text: &str) -> Result<Cache> {
        self.prefix_clock += 1;
        let now = self.prefix_clock;
        if let Some(p) = self.prefixes.get_mut(text) {
            p.used = now;
            return Ok(p.cache.clone());
        }
        let mut cache = self.model.new_cache();
        let ids = self.encode(text)?;
        if !ids.is_empty() {
            self.model.forward(&ids, &mut cache)?;
        }
        let cache = cache.share();
        drop_least_used(&mut self.prefixes, MAX_PREFIXES - 1, |p| p.used);
        self.prefixes.insert(
            text.to_owned(),
            Prefix {
                cache: cache.clone(),
                used: now,
            },
        );
        Ok(cache)
    }

    /// Runs a ChatML conversation up to the assistant's reply: its first
    /// `fixed` turns from the kept prefixes, the rest now. Returns the cache,
    /// the next token's logits and how many positions are left for the reply.
    fn prefill(
        &mut self,
        turns: &[prompt::Turn],
        fixed: usize,
    ) -> Result<(Cache, candle_core::Tensor, usize)> {
        let fixed = fixed.min(turns.len());
        let prefix = render(&turns[..fixed]);
        let rest = format!("{}<|im_start|>assistant\n", render(&turns[fixed..]));
        let mut cache = self.prefix_cache(&prefix)?;
        let ids = self.encode(&rest)?;
        let room = lm::MAX_POSITIONS.saturating_sub(cache.len() + ids.len());
        let logits = self.model.forward(&ids, &mut cache)?;
        Ok((cache, logits, room))
    }

    /// Runs a ChatML conversation greedily and returns the assistant's
    /// reply and how many tokens it took. The first `fixed` turns' keys and
    /// values are kept and reused by later conversations that start with them.
    pub fn chat_turns(
        &mut self,
        turns: &[prompt::Turn],
        fixed: usize,
        until: Until,
    ) -> Result<(String, usize)> {
        let (cache, logits, room) = self.prefill(turns, fixed)?;
        let mut seq = [self.seq(cache, &logits, until, room)?];
        self.decode(&mut seq)?;
        Ok((self.text_of(&seq[0].out)?, seq[0].out.len()))
    }

    /// Runs a one-question ChatML conversation greedily and returns the
    /// assistant's reply.
    pub fn chat(&mut self, system: &str, user: &str, max_new_tokens: usize) -> Result<String> {
        let turns = [
            prompt::Turn {
                role: "system",
                content: system.to_owned(),
            },
            prompt::Turn {
                role: "user",
                content: user.to_owned(),
            },
        ];
        Ok(self.chat_turns(&turns, 1, Until::tokens(max_new_tokens))?.0)
    }

    /// One attempt at a translation in the given framing, its output as the
    /// model wrote it (first line only: a translation of a caption is one
    /// line, and what follows a line break is commentary).
    pub fn attempt(
        &mut self,
        style: prompt::Style,
        spec: &prompt::Spec<'_>,
    ) -> Result<(String, usize)> {
        self.attempt_until(style, spec, None)
    }

    /// [`Self::attempt`], ended by `deadline`.
    fn attempt_until(
        &mut self,
        style: prompt::Style,
        spec: &prompt::Spec<'_>,
        deadline: Option<Instant>,
    ) -> Result<(String, usize)> {
        if language_name(spec.target).is_none() {
            return Err(ModelError::Input(format!(
                "target language {:?} is not supported for translation",
                spec.target
            )));
        }
        if spec.text.trim().is_empty() {
            return Ok((String::new(), 0));
        }
        // The plain framing's reply is taken whole (the baseline).
        let until = self.reply_until(spec.text, style != prompt::Style::Plain, deadline)?;
        let t = prompt::turns(style, spec);
        let (text, tokens) = self.chat_turns(&t.turns, t.fixed, until)?;
        let text = match style {
            prompt::Style::Plain => text,
            _ => clean(&text, spec.target),
        };
        Ok((text, tokens))
    }

    /// Translates a text of any length: cut into lines and sentences
    /// ([`pieces::split`]), each translated as a caption with the ones
    /// before it as context, joined back with the source's line breaks.
    /// Fails (empty text, the failure named) when a piece fails.
    pub fn translate_long(&mut self, spec: &prompt::Spec<'_>) -> Result<Translated> {
        let mut long = pieces::LongText::new(spec);
        loop {
            if let Some(t) = long.step(self)? {
                return Ok(t);
            }
        }
    }

    /// Translates one text with no context or glossary (see [`Self::translate`]).
    pub fn translate_text(
        &mut self,
        text: &str,
        source: Option<&str>,
        target: &str,
    ) -> Result<Translated> {
        self.translate(&prompt::Spec {
            text,
            source,
            target,
            context: &[],
            glossary: &[],
        })
    }

    /// Beam search over the reply to a ChatML conversation: up to `beams`
    /// finished replies, best first by mean token log-probability. The
    /// beams step together as one batch.
    pub fn chat_beams(
        &mut self,
        turns: &[prompt::Turn],
        fixed: usize,
        beams: usize,
        until: Until,
    ) -> Result<(Vec<String>, usize)> {
        let beams = beams.clamp(1, MAX_BEAMS);
        let (cache, first, room) = self.prefill(turns, fixed)?;
        // (tokens, summed log-probability, cache after all but the last token)
        let mut live: Vec<(Vec<u32>, f32, Cache)> = vec![(Vec::new(), 0.0, cache)];
        let mut logits = vec![log_softmax(&first)?];
        let mut done: Vec<(Vec<u32>, f32)> = Vec::new();
        let mut generated = 0;
        for step in 0..until.tokens.min(room) {
            let mut cands: Vec<(usize, u32, f32)> = Vec::new();
            for (i, lp) in logits.iter().enumerate() {
                for (tok, l) in top_k(lp, beams) {
                    cands.push((i, tok, live[i].1 + l));
                }
            }
            cands.sort_by(|a, b| b.2.total_cmp(&a.2));
            let mut next: Vec<(Vec<u32>, f32, Cache)> = Vec::new();
            for (i, tok, score) in cands {
                if next.len() + done.len() >= beams {
                    break;
                }
                let mut toks = live[i].0.clone();
                if self.stop.contains(&tok) {
                    done.push((toks, score));
                    continue;
                }
                toks.push(tok);
                if self.ends(&toks, tok, &until)? {
                    done.push((toks, score));
                    continue;
                }
                next.push((toks, score, live[i].2.clone()));
            }
            if next.is_empty()
                || done.len() >= beams
                || step + 1 == until.tokens.min(room)
                || until.expired()
            {
                done.extend(next.into_iter().map(|(t, s, _)| (t, s)));
                break;
            }
            let last: Vec<u32> = next
                .iter()
                .map(|(t, _, _)| *t.last().unwrap_or(&0))
                .collect();
            generated += last.len();
            let mut caches: Vec<&mut Cache> = next.iter_mut().map(|(_, _, c)| c).collect();
            let out = self.model.step_batch(&last, &mut caches)?;
            logits = (0..last.len())
                .map(|i| log_softmax(&out.get(i)?))
                .collect::<Result<_>>()?;
            live = next;
        }
        done.sort_by(|a, b| {
            let norm = |(t, s): &(Vec<u32>, f32)| s / (t.len().max(1) as f32);
            norm(b).total_cmp(&norm(a))
        });
        let texts = done
            .iter()
            .map(|(t, _)| self.text_of(t))
            .collect::<Result<Vec<_>>>()?;
        Ok((texts, generated))
    }

    /// A reply to decode after a prompt run into `cache`, whose last
    /// position's logits are `logits`, with `room` positions left.
    fn seq(
        &self,
        cache: Cache,
        logits: &candle_core::Tensor,
        until: Until,
        room: usize,
    ) -> Result<Seq> {
        let next = QwenLm::argmax(logits)?;
        let left = until.tokens.min(room);
        Ok(Seq {
            cache,
            out: Vec::new(),
            fed: 0,
            next,
            left,
            until,
            done: left == 0 || self.stop.contains(&next),
        })
    }

    /// Decodes every reply of `seqs` greedily to its end, the unfinished
    /// ones taking their next token together in one batched step.
    fn decode(&self, seqs: &mut [Seq]) -> Result<()> {
        loop {
            let mut active: Vec<&mut Seq> = seqs.iter_mut().filter(|s| !s.done).collect();
            if active.is_empty() {
                return Ok(());
            }
            for s in active.iter_mut() {
                s.out.push(s.next);
                s.left -= 1;
                if self.ends(&s.out, s.next, &s.until)? || s.until.expired() {
                    s.done = true;
                }
            }
            active.retain(|s| !s.done);
            if active.is_empty() {
                return Ok(());
            }
            let tokens: Vec<u32> = active.iter().map(|s| s.next).collect();
            let mut caches: Vec<&mut Cache> = active.iter_mut().map(|s| &mut s.cache).collect();
            let logits = self.model.step_batch(&tokens, &mut caches)?;
            for (i, s) in active.into_iter().enumerate() {
                s.fed = s.out.len();
                s.next = QwenLm::argmax(&logits.get(i)?)?;
                s.done = s.left == 0 || self.stop.contains(&s.next);
            }
        }
    }

    fn text_of(&self, out: &[u32]) -> Result<String> {
        let text = self
            .tokenizer
            .decode(out, true)
            .map_err(|e| ModelError::Input(format!("cannot detokenize: {e}")))?;
        Ok(text.trim().to_owned())
    }

    /// Opens the next turn of `session`'s conversation for `spec`: the
    /// conversation kept when `spec` continues it, else a new one from the
    /// pair's shared prefix with `spec`'s context in the prompt. Returns it
    /// with the tokens still to run before the reply.
    fn open_turn(
        &mut self,
        session: &str,
        spec: &prompt::Spec<'_>,
    ) -> Result<(Conversation, Vec<u32>)> {
        let kept = self
            .conversations
            .remove(session)
            .filter(|c| c.continues(spec));
        let tail =
            |t: &prompt::Turns| format!("{}<|im_start|>assistant\n", render(&t.turns[t.fixed..]));
        if let Some(mut c) = kept {
            // The earlier captions are the conversation's own turns now.
            let t = prompt::turns(
                prompt::Style::Chat,
                &prompt::Spec {
                    context: &[],
                    ..*spec
                },
            );
            let mut ids = std::mem::take(&mut c.pending);
            // The newest turn ends after its pending tokens: finished now.
            let end = c.cache.own_entries() + ids.len();
            c.turns.push_back(end - c.open);
            c.open = end;
            while c.turns.len() > prompt::MAX_CONTEXT {
                let n = c.turns.pop_front().unwrap_or(0);
                c.cache.drop_front(n);
                c.open -= n;
            }
            ids.extend(self.encode(&tail(&t))?);
            if c.cache.len() + ids.len() + MAX_REPLY_TOKENS <= lm::MAX_POSITIONS {
                return Ok((c, ids));
            }
            // Out of positions: a new conversation, as below.
        }
        let t = prompt::turns(prompt::Style::Chat, spec);
        let cache = self.prefix_cache(&Self::live_prefix(spec.source, spec.target))?;
        let ids = self.encode(&tail(&t))?;
        Ok((
            Conversation {
                pair: (spec.source.map(str::to_owned), spec.target.to_owned()),
                cache,
                pending: Vec::new(),
                turns: VecDeque::new(),
                open: 0,
                last: String::new(),
                used: 0,
            },
            ids,
        ))
    }

    /// Translates captions of live sessions, each given with its session's
    /// id, one caption per session at most: each caption continues its
    /// session's conversation ([`Conversation`]; a new one, with the
    /// caption's context in its prompt, when it does not continue the one
    /// kept), the prompts run one by one and the replies decode together.
    /// A reply that passes the checks stays in its conversation; one that
    /// fails goes through [`Self::translate`]'s retries on its own. An
    /// empty session id keeps no conversation. A caption's failure (an
    /// unsupported language, a prompt too long) is its own.
    pub fn translate_live(
        &mut self,
        items: &[(&str, prompt::Spec<'_>)],
    ) -> Result<Vec<Result<Translated>>> {
        let firsts = self.live_first(items)?;
        Ok(firsts
            .into_iter()
            .zip(items)
            .map(|(f, (_, spec))| match f {
                LiveFirst::Done(r) => r,
                LiveFirst::Retry(r) => self.live_retry(r, spec),
            })
            .collect())
    }

    /// The first attempt of [`Self::translate_live`]: each caption done
    /// (passed, or failed on its own), or to retry with
    /// [`Self::live_retry`] because its first output failed the checks.
    /// A caller with others waiting answers the done ones first.
    pub fn live_first(&mut self, items: &[(&str, prompt::Spec<'_>)]) -> Result<Vec<LiveFirst>> {
        let deadline = Instant::now() + self.time_budget;
        self.clock += 1;
        let mut out: Vec<Option<LiveFirst>> = items.iter().map(|_| None).collect();
        let mut open = Vec::new();
        let mut seqs = Vec::new();
        for (i, (session, spec)) in items.iter().enumerate() {
            if language_name(spec.target).is_none() {
                out[i] = Some(LiveFirst::Done(Err(ModelError::Input(format!(
                    "target language {:?} is not supported for translation",
                    spec.target
                )))));
                continue;
            }
            if spec.text.trim().is_empty() {
                out[i] = Some(LiveFirst::Done(Ok(Translated::passed(String::new(), 0, 0))));
                continue;
            }
            let prompt = self.open_turn(session, spec).and_then(|(mut c, ids)| {
                let until = self.reply_until(spec.text, true, Some(deadline))?;
                let room = lm::MAX_POSITIONS.saturating_sub(c.cache.len() + ids.len());
                let logits = self.model.forward(&ids, &mut c.cache)?;
                // The conversation keeps the cache up to the reply, for a
                // reply made by a retry; the first attempt decodes on a copy
                // (of the conversation's own entries; the prefix is shared).
                let cache = c.cache.clone();
                Ok((c, self.seq(cache, &logits, until, room)?))
            });
            match prompt {
                Ok((c, s)) => {
                    open.push((i, c));
                    seqs.push(s);
                }
                Err(e) => out[i] = Some(LiveFirst::Done(Err(e))),
            }
        }
        self.decode(&mut seqs)?;
        for ((i, mut c), s) in open.into_iter().zip(seqs) {
            let (session, spec) = &items[i];
            let text = clean(&self.text_of(&s.out)?, spec.target);
            if judge(spec, &text).is_some() {
                tracing::debug!(output = %text, "live translation failed its checks");
                out[i] = Some(LiveFirst::Retry(LiveRetry {
                    session: session.to_string(),
                    conversation: c,
                    first: text,
                    tokens: s.out.len(),
                    deadline,
                }));
                continue;
            }
            // The conversation goes on after the reply as decoded.
            c.cache = s.cache;
            c.pending = s.out[s.fed..].to_vec();
            self.go_on(session, spec, c);
            out[i] = Some(LiveFirst::Done(Ok(Translated::passed(
                text,
                1,
                s.out.len(),
            ))));
        }
        Ok(out
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    LiveFirst::Done(Err(ModelError::Input("a caption was lost".into())))
                })
            })
            .collect())
    }

    /// The retries of a live caption (`spec`, as given to
    /// [`Self::live_first`]) whose first output failed its checks; a
    /// retry's translation becomes its conversation's reply.
    pub fn live_retry(&mut self, retry: LiveRetry, spec: &prompt::Spec<'_>) -> Result<Translated> {
        let LiveRetry {
            session,
            mut conversation,
            first,
            tokens,
            deadline,
        } = retry;
        let mut r = self.translate_retries(spec, &first, deadline)?;
        r.tokens += tokens;
        if r.failure.is_none() {
            conversation.pending = self.encode(&r.text)?;
            self.go_on(&session, spec, conversation);
        }
        Ok(r)
    }

    /// Keeps conversation `c` of `session` after its reply to `spec`, the
    /// reply's last tokens in `c.pending` (none for an empty session id).
    fn go_on(&mut self, session: &str, spec: &prompt::Spec<'_>, mut c: Conversation) {
        if session.is_empty() {
            return;
        }
        c.pending.extend_from_slice(&self.turn_end);
        c.last = spec.text.to_owned();
        c.used = self.clock;
        self.keep(session, c);
    }

    /// The text of the live prompt's shared prefix from `source` into
    /// `target`: its instruction and examples.
    fn live_prefix(source: Option<&str>, target: &str) -> String {
        let t = prompt::turns(
            prompt::Style::Chat,
            &prompt::Spec {
                text: "",
                source,
                target,
                context: &[],
                glossary: &[],
            },
        );
        render(&t.turns[..t.fixed])
    }

    /// Computes and keeps the shared prefix of live captions from `source`
    /// into `target` now (about 250 tokens for the pairs with examples), so
    /// the first caption of the pair does not wait for it. An unsupported
    /// target is left alone: its captions fail on their own.
    pub fn warm(&mut self, source: Option<&str>, target: &str) -> Result<()> {
        if language_name(target).is_none() {
            return Ok(());
        }
        self.prefix_cache(&Self::live_prefix(source, target))
            .map(|_| ())
    }

    /// Whether the shared prefix of live captions from `source` into
    /// `target` is kept.
    pub fn is_warm(&self, source: Option<&str>, target: &str) -> bool {
        self.prefixes
            .contains_key(&Self::live_prefix(source, target))
    }

    /// Keeps `session`'s conversation, dropping the least recently used
    /// beyond [`MAX_CONVERSATIONS`].
    fn keep(&mut self, session: &str, c: Conversation) {
        self.conversations.insert(session.to_owned(), c);
        drop_least_used(&mut self.conversations, MAX_CONVERSATIONS, |c| c.used);
    }

    /// Drops `session`'s conversation (its session ended).
    pub fn forget(&mut self, session: &str) {
        self.conversations.remove(session);
    }

    /// What `session`'s kept conversation holds, if one is kept.
    pub fn conversation(&self, session: &str) -> Option<ConversationState> {
        self.conversations.get(session).map(|c| ConversationState {
            turns: c.turns.len(),
            entries: c.cache.entries(),
            positions: c.cache.len(),
            bytes: c.cache.own_bytes(),
        })
    }

    /// Sessions whose conversations are kept.
    pub fn conversations(&self) -> usize {
        self.conversations.len()
    }

    /// Translates a caption: greedily in the [`prompt::Style::Chat`]
    /// framing first; when the output fails a check (answered,
    /// untranslated, wrong language, truncated, overlong; see
    /// `nexus_eval::translation::check`) or drops a glossary term the source
    /// holds, a beam search over the same prompt without the context,
    /// taking the best reply that passes; then greedily in the
    /// [`prompt::Style::Strict`] framing, also without it.
    /// When all fail, the result carries no text and names the failure.
    pub fn translate(&mut self, spec: &prompt::Spec<'_>) -> Result<Translated> {
        if spec.text.trim().is_empty() {
            return Ok(Translated::passed(String::new(), 0, 0));
        }
        let deadline = Instant::now() + self.time_budget;
        let (text, tokens) = self.attempt_until(prompt::Style::Chat, spec, Some(deadline))?;
        if judge(spec, &text).is_none() {
            return Ok(Translated::passed(text, 1, tokens));
        }
        let mut r = self.translate_retries(spec, &text, deadline)?;
        r.tokens += tokens;
        Ok(r)
    }

    /// The retries after a first output `first` failed its checks, each
    /// begun only before `deadline` and ended by it.
    fn translate_retries(
        &mut self,
        spec: &prompt::Spec<'_>,
        first: &str,
        deadline: Instant,
    ) -> Result<Translated> {
        let mut failure = judge(spec, first);
        tracing::debug!(output = %first, failure = ?failure, "greedy translation failed its checks");
        let out_of_time = || {
            let late = Instant::now() >= deadline;
            if late {
                tracing::debug!("translation out of time");
            }
            late
        };
        if out_of_time() {
            return Ok(Translated::failed(failure, 1, 0));
        }
        // The retries leave the context out: earlier captions in the source
        // language (in the prompt or as the conversation) can draw a small
        // model into copying the caption.
        let bare = prompt::Spec {
            context: &[],
            ..*spec
        };
        let t = prompt::turns(prompt::Style::Chat, &bare);
        let until = self.reply_until(spec.text, true, Some(deadline))?;
        let (candidates, mut tokens) = self.chat_beams(&t.turns, t.fixed, RETRY_BEAMS, until)?;
        for c in candidates {
            let c = clean(&c, spec.target);
            match judge(spec, &c) {
                None => return Ok(Translated::passed(c, 2, tokens)),
                Some(f) => {
                    tracing::debug!(output = %c, failure = ?f, "beam candidate failed its checks")
                }
            }
        }
        if out_of_time() {
            return Ok(Translated::failed(failure, 2, tokens));
        }
        let (text, n) = self.attempt_until(prompt::Style::Strict, &bare, Some(deadline))?;
        tokens += n;
        match judge(spec, &text) {
            None => return Ok(Translated::passed(text, 3, tokens)),
            Some(f) => {
                tracing::debug!(output = %text, failure = ?f, "strict translation failed its checks");
                failure = Some(f);
            }
        }
        Ok(Translated::failed(failure, 3, tokens))
    }
}

/// Tokens a loop's repeated runs span together at least before a reply is
/// taken to loop: a token 24 times, a pair 12 times, a run of 8 or more
/// tokens 3 times.
const LOOP_SPAN: usize = 24;
/// The longest run, in tokens, whose repetition ends a reply.
const LOOP_MAX_RUN: usize = 32;

/// Whether `out` ends in a run of tokens repeated back to back until the
/// repeats span [`LOOP_SPAN`] tokens, at least three of them (runs of up
/// to [`LOOP_MAX_RUN`] tokens). The text-level check
/// (`nexus_eval::translation::check`) then finds such a reply overlong.
fn loops_back(out: &[u32]) -> bool {
    (1..=LOOP_MAX_RUN).any(|run| {
        let repeats = LOOP_SPAN.div_ceil(run).max(3);
        let span = run * repeats;
        span <= out.len() && {
            let tail = &out[out.len() - span..];
            let unit = &tail[span - run..];
            tail.chunks_exact(run).all(|c| c == unit)
        }
    })
}

/// Beams of a retry.
const RETRY_BEAMS: usize = 4;
/// Beams [`Translator::chat_beams`] runs at most.
pub const MAX_BEAMS: usize = 8;

fn log_softmax(logits: &candle_core::Tensor) -> Result<Vec<f32>> {
    let v: Vec<f32> = logits.to_dtype(candle_core::DType::F32)?.to_vec1()?;
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + v.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
    Ok(v.into_iter().map(|x| x - lse).collect())
}

fn top_k(lp: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &x) in lp.iter().enumerate() {
        if best.len() < k || x > best[best.len() - 1].1 {
            let at = best.partition_point(|b| b.1 >= x);
            best.insert(at, (i as u32, x));
            best.truncate(k);
        }
    }
    best
}

/// A checked translation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translated {
    /// The translation; empty when it failed.
    pub text: String,
    /// Why no acceptable translation came out (`answered`, `untranslated`,
    /// `wrong_language`, `truncated`, `overlong`, `glossary`), or `None`.
    pub failure: Option<&'static str>,
    /// Attempts made: 1 greedy, 2 after the beam search, 3 after the
    /// strict prompt (0 for an empty text).
    pub attempts: u32,
    /// Tokens generated over all attempts.
    pub tokens: usize,
}

impl Translated {
    /// A translation that passed its checks.
    pub fn passed(text: String, attempts: u32, tokens: usize) -> Self {
        Self {
            text,
            failure: None,
            attempts,
            tokens,
        }
    }

    /// No translation and no attempt: the caption was skipped for `reason`
    /// (for example, a live caption that waited too long for the model).
    pub fn skipped(reason: &'static str) -> Self {
        Self {
            text: String::new(),
            failure: Some(reason),
            attempts: 0,
            tokens: 0,
        }
    }

    /// No translation: every attempt failed, the last for `failure`.
    fn failed(failure: Option<Fault>, attempts: u32, tokens: usize) -> Self {
        Self {
            text: String::new(),
            failure: failure.map(Fault::as_str),
            attempts,
            tokens,
        }
    }
}

/// Why `output` is no acceptable translation of the caption in `spec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Check(nexus_eval::translation::Failure),
    Glossary,
}

impl Fault {
    fn as_str(self) -> &'static str {
        match self {
            Fault::Check(f) => f.as_str(),
            Fault::Glossary => "glossary",
        }
    }
}

fn judge(spec: &prompt::Spec<'_>, output: &str) -> Option<Fault> {
    let source = spec
        .source
        .or_else(|| nexus_eval::langid::identify(spec.text))
        .unwrap_or("");
    if let Some(f) = nexus_eval::translation::check(spec.text, output, source, spec.target) {
        return Some(Fault::Check(f));
    }
    let lower_out = output.to_lowercase();
    let dropped = prompt::glossary_terms(spec)
        .iter()
        .any(|t| !lower_out.contains(&t.to_lowercase()));
    dropped.then_some(Fault::Glossary)
}

/// The translation line of a reply: the first non-empty line, without a
/// "German:" label or quotes wrapped around it.
fn clean(reply: &str, target: &str) -> String {
    let line = reply
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let mut line = line;
    if let Some(name) = language_name(target)
        && let Some(rest) = line.strip_prefix(name)
        && let Some(rest) = rest.strip_prefix(':')
    {
        line = rest.trim_start();
    }
    for (open, close) in [('"', '"'), ('“', '”'), ('«', '»'), ('„', '“'), ('「', '」')]
    {
        if let Some(inner) = line.strip_prefix(open).and_then(|l| l.strip_suffix(close))
            && !inner.contains(open)
        {
            line = inner;
        }
    }
    line.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(text: &'a str, glossary: &'a [String]) -> prompt::Spec<'a> {
        prompt::Spec {
            text,
            source: Some("en"),
            target: "de",
            context: &[],
            glossary,
        }
    }

    #[test]
    fn outputs_are_judged_by_the_checks_and_the_glossary() {
        let gl = vec!["Kubeflow".to_string(), "Helm".to_string()];
        let s = spec("Can Priya deploy Kubeflow today?", &gl);
        assert_eq!(judge(&s, "Kann Priya Kubeflow heute deployen?"), None);
        // Helm is not in the caption: its absence is no fault.
        assert_eq!(
            judge(&s, "Kann Priya Kubeflow-Pipelines heute ausrollen?"),
            None
        );
        assert_eq!(
            judge(&s, "Kann Priya den Dienst heute ausrollen?"),
            Some(Fault::Glossary)
        );
        assert_eq!(
            judge(&s, "Ja, Priya kann Kubeflow heute deployen."),
            Some(Fault::Check(nexus_eval::translation::Failure::Answered))
        );
        assert_eq!(Fault::Glossary.as_str(), "glossary");
    }

    #[test]
    fn replies_are_cleaned_to_their_translation_line() {
        assert_eq!(
            clean("German: „Guten Morgen.“\nNote: formal.", "de"),
            "Guten Morgen."
        );
        assert_eq!(clean("\n\"Hallo zusammen\"", "de"), "Hallo zusammen");
        assert_eq!(clean("「早上好」", "zh"), "早上好");
        assert_eq!(clean("Simplified Chinese: 早上好", "zh"), "早上好");
    }

    /// A reply ends where it has gone round: a run of 8 tokens three times,
    /// one token 24 times; fewer repeats, or a repeat with anything between,
    /// go on.
    #[test]
    fn a_reply_that_loops_back_ends() {
        let clause: Vec<u32> = (100..108).collect();
        let mut out = vec![1, 2, 3];
        for _ in 0..2 {
            out.extend(&clause);
        }
        assert!(!loops_back(&out), "two repeats");
        out.extend(&clause);
        assert!(loops_back(&out), "three repeats of eight tokens");
        out.push(7);
        assert!(!loops_back(&out), "the repeat is no longer the end");
        assert!(!loops_back(&[5; 23]));
        assert!(loops_back(&[5; 24]));
        let pair: Vec<u32> = [8, 9].repeat(11);
        assert!(!loops_back(&pair), "a pair eleven times");
        assert!(loops_back(&[8, 9].repeat(12)));
        assert!(!loops_back(&[]));
        let long: Vec<u32> = (0..33).collect();
        assert!(
            !loops_back(&long.repeat(3)),
            "runs past 32 tokens are not looked for"
        );
    }

    /// The maps of kept prefixes and conversations drop their least
    /// recently used entries, one at a time, down to the bound.
    #[test]
    fn the_least_used_entries_go_first() {
        let mut m: HashMap<String, u64> = [("a", 5), ("b", 2), ("c", 9), ("d", 1)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        drop_least_used(&mut m, 4, |v| *v);
        assert_eq!(m.len(), 4, "within the bound: nothing dropped");
        drop_least_used(&mut m, 2, |v| *v);
        let mut left: Vec<_> = m.keys().cloned().collect();
        left.sort();
        assert_eq!(left, ["a", "c"]);
        drop_least_used(&mut m, 0, |v| *v);
        assert!(m.is_empty());
    }

    #[test]
    fn replies_are_budgeted_by_source_length_up_to_a_cap() {
        assert_eq!(reply_budget(0), 32);
        assert_eq!(reply_budget(10), 62);
        assert_eq!(reply_budget(100_000), MAX_REPLY_TOKENS);
    }

    #[test]
    fn top_k_keeps_the_largest_in_order() {
        assert_eq!(
            top_k(&[0.1, 0.5, -1.0, 0.7, 0.5], 3),
            vec![(3, 0.7), (1, 0.5), (4, 0.5)]
        );
        let lp = log_softmax(&candle_core::Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap())
            .unwrap();
        let sum: f32 = lp.iter().map(|x| x.exp()).sum();
        assert!((sum - 1.0).abs() < 1e-5);
    }
}
