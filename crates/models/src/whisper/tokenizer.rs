//! Whisper's tokenizer: BPE text plus the special tokens that steer decoding.

use std::path::Path;

use crate::error::{ModelError, Result};

/// Token ids that decoding needs, read from the tokenizer itself.
#[derive(Debug, Clone)]
pub struct Specials {
    /// `<|endoftext|>`
    pub eot: u32,
    /// `<|startoftranscript|>`
    pub sot: u32,
    /// `<|translate|>`
    pub translate: u32,
    /// `<|transcribe|>`
    pub transcribe: u32,
    /// `<|startoflm|>`
    pub sot_lm: u32,
    /// `<|startofprev|>`
    pub sot_prev: u32,
    /// `<|nospeech|>` (`<|nocaptions|>` in older vocabularies)
    pub no_speech: u32,
    /// `<|notimestamps|>`
    pub no_timestamps: u32,
    /// `<|0.00|>`; every id from here is a timestamp in 20 ms steps.
    pub timestamp_begin: u32,
}

/// Tokenizer of a Whisper checkpoint.
pub struct WhisperTokenizer {
    inner: tokenizers::Tokenizer,
    /// Special token ids.
    pub specials: Specials,
    /// (code, token id) of every language the vocabulary knows, in id order.
    pub languages: Vec<(String, u32)>,
    /// Whether the model was trained on many languages.
    pub multilingual: bool,
}

impl std::fmt::Debug for WhisperTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhisperTokenizer")
            .field("specials", &self.specials)
            .field("languages", &self.languages.len())
            .finish()
    }
}

impl WhisperTokenizer {
    /// Loads `tokenizer.json`.
    pub fn load(path: &Path, multilingual: bool) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ModelError::Load(format!("{}: {e}", path.display())))?;
        let id = |t: &str| {
            inner.token_to_id(t).ok_or_else(|| {
                ModelError::Load(format!("{}: no special token {t}", path.display()))
            })
        };
        let no_speech = id("<|nospeech|>").or_else(|_| id("<|nocaptions|>"))?;
        let sot = id("<|startoftranscript|>")?;
        let translate = id("<|translate|>")?;
        let no_timestamps = id("<|notimestamps|>")?;
        let languages = (sot + 1..translate)
            .filter_map(|i| {
                let t = inner.id_to_token(i)?;
                let code = t.strip_prefix("<|")?.strip_suffix("|>")?;
                Some((code.to_owned(), i))
            })
            .collect();
        Ok(Self {
            specials: Specials {
                eot: id("<|endoftext|>")?,
                sot,
                translate,
                transcribe: id("<|transcribe|>")?,
                sot_lm: id("<|startoflm|>")?,
                sot_prev: id("<|startofprev|>")?,
                no_speech,
                no_timestamps,
                timestamp_begin: no_timestamps + 1,
            },
            languages,
            multilingual,
            inner,
        })
    }

    /// Token id of a language code, e.g. `en`.
    pub fn language_token(&self, code: &str) -> Option<u32> {
        self.languages
            .iter()
            .find(|(c, _)| c == code)
            .map(|(_, id)| *id)
    }

    /// Language code of a language token.
    pub fn language_code(&self, token: u32) -> Option<&str> {
        self.languages
            .iter()
            .find(|(_, id)| *id == token)
            .map(|(c, _)| c.as_str())
    }

    /// Text tokens of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Input(format!("cannot tokenize {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of tokens, ignoring special and timestamp tokens.
    pub fn decode(&self, tokens: &[u32]) -> Result<String> {
        let text: Vec<u32> = tokens
            .iter()
            .copied()
            .filter(|t| *t < self.specials.eot)
            .collect();
        self.inner
            .decode(&text, true)
            .map_err(|e| ModelError::Input(format!("cannot detokenize: {e}")))
    }

    /// The raw bytes-as-text of one token (with its leading space, if any).
    pub fn token_text(&self, token: u32) -> String {
        self.decode(&[token]).unwrap_or_default()
    }

    /// Tokens that would print as a non-speech symbol; Whisper never emits them
    /// unless the checkpoint's own list says otherwise.
    pub fn is_timestamp(&self, token: u32) -> bool {
        token >= self.specials.timestamp_begin
    }
}

/// Language codes multilingual Whisper checkpoints know, in token order.
pub const LANGUAGES: &[&str] = &[
    "en", "zh", "de", "es", "ru", "ko", "fr", "ja", "pt", "tr", "pl", "ca", "nl", "ar", "sv", "it",
    "id", "hi", "fi", "vi", "he", "uk", "el", "ms", "cs", "ro", "da", "hu", "ta", "no", "th", "ur",
    "hr", "bg", "lt", "la", "mi", "ml", "cy", "sk", "te", "fa", "lv", "bn", "sr", "az", "sl", "kn",
    "et", "mk", "br", "eu", "is", "hy", "ne", "mn", "bs", "kk", "sq", "sw", "gl", "mr", "pa", "si",
    "km", "sn", "yo", "so", "af", "oc", "ka", "be", "tg", "sd", "gu", "am", "yi", "lo", "uz", "fo",
    "ht", "ps", "tk", "nn", "mt", "sa", "lb", "my", "bo", "tl", "mg", "as", "tt", "haw", "ln",
    "ha", "ba", "jw", "su", "yue",
];

/// Position of `code` in [`LANGUAGES`], when Whisper knows it.
pub fn language_code_known(code: &str) -> Option<usize> {
    LANGUAGES.iter().position(|l| *l == code)
}
