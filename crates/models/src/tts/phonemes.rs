//! Text → IPA phonemes with espeak-ng, as Piper's voices were trained:
//! sentence by sentence, clause by clause, the clause's punctuation kept
//! after its phonemes and clauses joined by a space.

use std::process::Command;

use crate::error::{ModelError, Result};

/// Clause-ending punctuation Piper keeps as phonemes.
const CLAUSE_END: [char; 6] = ['.', ',', ';', ':', '!', '?'];
/// Punctuation that ends a sentence.
const SENTENCE_END: [char; 3] = ['.', '!', '?'];

/// A sentence's clauses: text and the punctuation that closed each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sentence {
    /// (clause text, its closing punctuation or none).
    pub clauses: Vec<(String, Option<char>)>,
}

/// Splits text into sentences of clauses.
pub fn sentences(text: &str) -> Vec<Sentence> {
    let mut out = Vec::new();
    let mut clauses = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let ends = CLAUSE_END.contains(&c) && chars.peek().is_none_or(|n| n.is_whitespace());
        if ends {
            if !cur.trim().is_empty() {
                clauses.push((cur.trim().to_string(), Some(c)));
            }
            cur.clear();
            if SENTENCE_END.contains(&c) && !clauses.is_empty() {
                out.push(Sentence {
                    clauses: std::mem::take(&mut clauses),
                });
            }
        } else if c == '\n' && chars.peek() == Some(&'\n') {
            if !cur.trim().is_empty() {
                clauses.push((cur.trim().to_string(), None));
            }
            cur.clear();
            if !clauses.is_empty() {
                out.push(Sentence {
                    clauses: std::mem::take(&mut clauses),
                });
            }
        } else {
            cur.push(c);
        }
    }
    if !cur.trim().is_empty() {
        clauses.push((cur.trim().to_string(), None));
    }
    if !clauses.is_empty() {
        out.push(Sentence { clauses });
    }
    out
}

/// IPA of one sentence for `voice` (e.g. `en-us`), by the `espeak-ng` program.
pub fn phonemize(sentence: &Sentence, voice: &str) -> Result<String> {
    let mut parts = Vec::new();
    for (text, punct) in &sentence.clauses {
        let out = Command::new("espeak-ng")
            .args(["-q", "--ipa", "-v", voice, "--"])
            .arg(text)
            .output()
            .map_err(|e| {
                ModelError::Input(format!(
                    "running espeak-ng for phonemes: {e}; install the espeak-ng package"
                ))
            })?;
        if !out.status.success() {
            return Err(ModelError::Input(format!(
                "espeak-ng failed on {text:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        // One line per sentence espeak-ng sees; a clause is read as one.
        let ipa: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        let mut p = ipa.join(" ");
        if let Some(c) = punct {
            p.push(*c);
        }
        parts.push(p);
    }
    Ok(parts.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_splits_into_sentences_of_clauses() {
        let s = sentences("Hello there, world. How are you? Fine 3.5 times");
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[0].clauses,
            vec![
                ("Hello there".into(), Some(',')),
                ("world".into(), Some('.'))
            ]
        );
        assert_eq!(s[1].clauses, vec![("How are you".into(), Some('?'))]);
        assert_eq!(s[2].clauses, vec![("Fine 3.5 times".into(), None)]);
        assert!(sentences("  ").is_empty());
    }
}
