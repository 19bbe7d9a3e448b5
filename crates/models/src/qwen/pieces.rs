//! Long texts cut into caption-sized pieces for translation, and the
//! translated pieces joined back. The translator reads one line per reply
//! (a caption's translation; what follows is commentary), so a text of
//! several lines or sentences is translated piece by piece: every line
//! survives, each decode stays short, and the translation thread can take a
//! live caption between two pieces of a long text.

use super::prompt::{MAX_CONTEXT, Spec};
use super::{Translated, Translator};
use crate::error::Result;

/// A piece longer than this (a run-on sentence, text without punctuation)
/// is cut at its last space before the limit, or at a character boundary.
pub const MAX_PIECE_BYTES: usize = 400;

/// How a piece follows the one before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joint {
    /// In the same line, after a space where the target language writes one.
    Space,
    /// After this many line breaks (blank lines kept).
    Lines(usize),
}

/// Sentence ends: a piece ends after one of these (followed by a space or
/// the end of the line in Latin script; anywhere for the full-width forms).
const ENDS: [char; 3] = ['.', '?', '!'];
const FULL_WIDTH_ENDS: [char; 4] = ['。', '？', '！', '；'];

/// Cuts `text` into pieces at line breaks, sentence ends and, within a
/// sentence longer than [`MAX_PIECE_BYTES`], spaces. Each piece is trimmed
/// and non-empty; the first one's joint is `Lines(n)` for the blank lines
/// before it (0 when none), and text of whitespace only gives no pieces.
pub fn split(text: &str) -> Vec<(Joint, &str)> {
    let mut out = Vec::new();
    let mut breaks = 0;
    for line in text.split('\n') {
        let mut first = true;
        for s in sentences(line) {
            for piece in cut(s) {
                let joint = if first {
                    Joint::Lines(breaks)
                } else {
                    Joint::Space
                };
                out.push((joint, piece));
                first = false;
            }
        }
        breaks = if first { breaks + 1 } else { 1 };
    }
    out
}

/// The sentences of one line, trimmed, without empty ones.
fn sentences(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut chars = line.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let end = i + c.len_utf8();
        let ends = FULL_WIDTH_ENDS.contains(&c)
            || (ENDS.contains(&c)
                && chars
                    .peek()
                    .is_none_or(|(_, n)| n.is_whitespace() || *n == '"' || *n == '”'));
        if ends {
            // Closing quotes stay with their sentence.
            let mut end = end;
            while let Some((j, q)) = chars.peek().copied() {
                if matches!(q, '"' | '”' | '」' | '』' | ')' | '）') {
                    end = j + q.len_utf8();
                    chars.next();
                } else {
                    break;
                }
            }
            out.push(line[start..end].trim());
            start = end;
        }
    }
    out.push(line[start..].trim());
    out.retain(|s| !s.is_empty());
    out
}

/// One sentence in pieces of at most [`MAX_PIECE_BYTES`].
fn cut(mut s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    while s.len() > MAX_PIECE_BYTES {
        let mut at = MAX_PIECE_BYTES;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        // At the last space before the limit, when it leaves a real piece.
        if let Some(sp) = s[..at].rfind(char::is_whitespace)
            && sp > MAX_PIECE_BYTES / 4
        {
            at = sp;
        }
        out.push(s[..at].trim());
        s = s[at..].trim_start();
    }
    if !s.trim().is_empty() {
        out.push(s.trim());
    }
    out
}

/// Joins translated pieces with the joints [`split`] gave their sources:
/// spaces between the pieces of a line (none for a target written without
/// spaces), and the line breaks of the source.
pub fn join<S: AsRef<str>>(pieces: &[(Joint, S)], target: &str) -> String {
    let space = if crate::whisper::align::written_without_spaces(target) {
        ""
    } else {
        " "
    };
    let mut out = String::new();
    for (i, (joint, text)) in pieces.iter().enumerate() {
        match joint {
            Joint::Space if i > 0 => out.push_str(space),
            Joint::Space => {}
            Joint::Lines(n) => out.extend(std::iter::repeat_n('\n', *n)),
        }
        out.push_str(text.as_ref());
    }
    out
}

/// A long text being translated piece by piece: each piece with the
/// pieces before it (after the caller's context) as context, the glossary
/// throughout. A piece that fails its checks fails the text, whose
/// translation is then empty and names the failure.
#[derive(Debug, Clone)]
pub struct LongText {
    pieces: Vec<(Joint, String)>,
    translated: Vec<(Joint, String)>,
    source: Option<String>,
    target: String,
    context: Vec<String>,
    glossary: Vec<String>,
    result: Translated,
}

impl LongText {
    /// `spec`'s text, cut into pieces.
    pub fn new(spec: &Spec<'_>) -> Self {
        Self {
            pieces: split(spec.text)
                .into_iter()
                .map(|(j, p)| (j, p.to_owned()))
                .collect(),
            translated: Vec::new(),
            source: spec.source.map(str::to_owned),
            target: spec.target.to_owned(),
            context: spec.context.to_vec(),
            glossary: spec.glossary.to_vec(),
            result: Translated::passed(String::new(), 0, 0),
        }
    }

    /// Translates the next piece; the text's translation once none is left
    /// or one failed.
    pub fn step(&mut self, model: &mut Translator) -> Result<Option<Translated>> {
        let k = self.translated.len();
        if let Some((joint, text)) = self.pieces.get(k) {
            // The last pieces before this one (after the caller's context).
            let before = self.context.len() + k;
            let context: Vec<String> = self
                .context
                .iter()
                .chain(self.pieces[..k].iter().map(|(_, p)| p))
                .skip(before.saturating_sub(MAX_CONTEXT))
                .cloned()
                .collect();
            let t = model.translate(&Spec {
                text,
                source: self.source.as_deref(),
                target: &self.target,
                context: &context,
                glossary: &self.glossary,
            })?;
            self.result.attempts = self.result.attempts.max(t.attempts);
            self.result.tokens += t.tokens;
            self.result.failure = t.failure;
            self.translated.push((*joint, t.text));
        }
        if self.result.failure.is_none() && self.translated.len() < self.pieces.len() {
            return Ok(None);
        }
        let mut r = self.result.clone();
        if r.failure.is_none() {
            r.text = join(&self.translated, &self.target);
        }
        Ok(Some(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_split_at_lines_and_sentences_and_join_back() {
        let text = "Hello there. Can you hear me?\n\nNext item!\nEnd";
        let p = split(text);
        assert_eq!(
            p,
            vec![
                (Joint::Lines(0), "Hello there."),
                (Joint::Space, "Can you hear me?"),
                (Joint::Lines(2), "Next item!"),
                (Joint::Lines(1), "End"),
            ]
        );
        assert_eq!(join(&p, "de"), text);
        // Leading blank lines are kept; trailing ones and whitespace are not pieces.
        let p = split("\n  \nOne. Two.  \n\n");
        assert_eq!(p[0], (Joint::Lines(2), "One."));
        assert_eq!(p.len(), 2);
        assert!(split(" \n\t\n").is_empty());
        assert!(split("").is_empty());
    }

    #[test]
    fn decimal_points_and_closing_quotes_do_not_end_sentences_early() {
        let p = split("It costs 3.50 euros. He said \"stop.\" Then left");
        let texts: Vec<_> = p.iter().map(|(_, t)| *t).collect();
        assert_eq!(
            texts,
            vec!["It costs 3.50 euros.", "He said \"stop.\"", "Then left"]
        );
    }

    #[test]
    fn chinese_splits_at_full_width_ends_and_joins_without_spaces() {
        let p = split("你好。你能听到我吗？好的");
        let texts: Vec<_> = p.iter().map(|(_, t)| *t).collect();
        assert_eq!(texts, vec!["你好。", "你能听到我吗？", "好的"]);
        let back: Vec<(Joint, &str)> = p.iter().map(|(j, _)| (*j, "x")).collect();
        assert_eq!(join(&back, "zh"), "xxx");
        assert_eq!(join(&back, "en"), "x x x");
    }

    #[test]
    fn long_sentences_are_cut_within_the_limit_on_char_boundaries() {
        let words = "word ".repeat(300);
        for p in split(&words) {
            assert!(p.1.len() <= MAX_PIECE_BYTES && !p.1.is_empty());
            assert!(!p.1.starts_with(' ') && !p.1.ends_with(' '));
        }
        // No spaces at all, multi-byte characters: cut on a boundary.
        let emoji = "😀".repeat(500);
        let p = split(&emoji);
        assert!(p.len() >= 5);
        assert!(p.iter().all(|(_, t)| t.len() <= MAX_PIECE_BYTES));
        assert_eq!(p.iter().map(|(_, t)| *t).collect::<String>(), emoji);
        assert!(p[1..].iter().all(|(j, _)| *j == Joint::Space));
    }
}
