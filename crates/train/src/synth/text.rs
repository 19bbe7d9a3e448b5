//! The text the voices read: a public-domain source cut into utterances of
//! a speakable length, at sentence boundaries first and clause boundaries
//! when a sentence is too long.
//!
//! The default source is the King James Version of the Bible (1611, public
//! domain), as Debian's `bible-kjv-text` package ships it; `scripts/fetch-text.sh`
//! fetches the pinned package and writes its text with the package's own
//! reader. Any other text works one passage per line ([`TextFormat::Lines`]).

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{Result, TrainError, io};

/// How a text file is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextFormat {
    /// The `bible` program's listing: `Book chapter` headings, then one
    /// verse per line, its number first.
    Bible,
    /// One passage per line; blank lines are skipped.
    Lines,
}

impl std::str::FromStr for TextFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "bible" => Ok(Self::Bible),
            "lines" => Ok(Self::Lines),
            _ => Err(format!("text format {s:?}: expected `bible` or `lines`")),
        }
    }
}

/// Utterances cut from a text file, with what identifies the file.
#[derive(Debug, Clone)]
pub struct TextSource {
    /// The file's name.
    pub name: String,
    /// SHA-256 of the file's bytes (hex).
    pub sha256: String,
    /// Utterances in the file's order.
    pub utterances: Vec<String>,
}

impl TextSource {
    /// Reads `path` and cuts its passages into utterances of
    /// `min_words..=max_words` words.
    pub fn read(
        path: &Path,
        format: TextFormat,
        min_words: usize,
        max_words: usize,
    ) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(io(path))?;
        let text = String::from_utf8_lossy(&bytes);
        let passages = match format {
            TextFormat::Bible => bible_verses(&text),
            TextFormat::Lines => text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect(),
        };
        let utterances: Vec<String> = passages
            .iter()
            .flat_map(|p| utterances(p, min_words, max_words))
            .collect();
        if utterances.is_empty() {
            return Err(TrainError::Config(format!(
                "{}: no utterance of {min_words}..={max_words} words in {} passages (is the format right?)",
                path.display(),
                passages.len()
            )));
        }
        Ok(Self {
            name: path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            sha256: hex::encode(Sha256::digest(&bytes)),
            utterances,
        })
    }
}

/// The verses of the `bible` program's listing, cleaned for reading aloud:
/// small capitals spelt `LORD` become `Lord`.
pub fn bible_verses(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|line| {
            let t = line.trim_start();
            let digits = t.chars().take_while(char::is_ascii_digit).count();
            // A verse line is indented and starts with its number.
            if digits == 0 || t.len() == line.len() {
                return None;
            }
            let rest = t[digits..].trim();
            (!rest.is_empty()).then(|| title_case_capitals(rest))
        })
        .collect()
}

/// Words written in capitals (two letters or more) in title case.
fn title_case_capitals(text: &str) -> String {
    text.split(' ')
        .map(|w| {
            let letters: Vec<char> = w.chars().filter(|c| c.is_alphabetic()).collect();
            if letters.len() >= 2 && letters.iter().all(|c| c.is_uppercase()) {
                let mut out = String::with_capacity(w.len());
                let mut first = true;
                for c in w.chars() {
                    if c.is_alphabetic() {
                        if first {
                            out.push(c);
                            first = false;
                        } else {
                            out.extend(c.to_lowercase());
                        }
                    } else {
                        out.push(c);
                    }
                }
                out
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where a piece of a passage ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Boundary {
    Clause,
    Sentence,
}

/// Pieces of a passage ending at punctuation followed by a space (or the end).
fn pieces(passage: &str) -> Vec<(String, Boundary)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = passage.chars().peekable();
    while let Some(c) = chars.next() {
        cur.push(c);
        let at_gap = chars.peek().is_none_or(|n| n.is_whitespace());
        let boundary = match c {
            '.' | '?' | '!' => Some(Boundary::Sentence),
            ',' | ';' | ':' => Some(Boundary::Clause),
            _ => None,
        };
        if let (Some(b), true) = (boundary, at_gap) {
            if !cur.trim().is_empty() {
                out.push((cur.trim().to_string(), b));
            }
            cur.clear();
        }
    }
    if !cur.trim().is_empty() {
        out.push((cur.trim().to_string(), Boundary::Sentence));
    }
    out
}

/// Utterances of `min_words..=max_words` words from one passage: sentences
/// (or runs of them) where they fit, clauses of a longer sentence otherwise.
/// A clause longer than `max_words` on its own is left out.
pub fn utterances(passage: &str, min_words: usize, max_words: usize) -> Vec<String> {
    let words = |s: &str| s.split_whitespace().count();
    let mut out = Vec::new();
    let mut cur: Vec<String> = Vec::new();
    let mut n = 0usize;
    for (piece, boundary) in pieces(passage) {
        let w = words(&piece);
        if n + w > max_words {
            if n >= min_words {
                out.push(cur.join(" "));
            }
            cur.clear();
            n = 0;
            if w > max_words {
                continue;
            }
        }
        cur.push(piece);
        n += w;
        if boundary == Boundary::Sentence && n >= min_words {
            out.push(cur.join(" "));
            cur.clear();
            n = 0;
        }
    }
    if n >= min_words {
        out.push(cur.join(" "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = "\nGenesis 1\n\n   1 In the beginning God created the heaven and the earth.\n   2 And the earth was without form, and void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.\n\nJohn 11\n\n  35 Jesus wept.\n  36 Then said the Jews, Behold how he loved him!\n  37 And the LORD said, I AM.\n";

    #[test]
    fn bible_listing_gives_its_verses() {
        let v = bible_verses(LISTING);
        assert_eq!(v.len(), 5, "{v:?}");
        assert_eq!(
            v[0],
            "In the beginning God created the heaven and the earth."
        );
        assert_eq!(v[2], "Jesus wept.");
        assert_eq!(v[4], "And the Lord said, I Am.");
    }

    #[test]
    fn utterances_keep_sentences_and_cut_long_ones_at_clauses() {
        let v = bible_verses(LISTING);
        // Two sentences of 16 and 12 words: each alone.
        let u = utterances(&v[1], 4, 20);
        assert_eq!(
            u,
            [
                "And the earth was without form, and void; and darkness was upon the face of the deep.",
                "And the Spirit of God moved upon the face of the waters."
            ]
        );
        // At most 8 words: the first sentence is cut at its clauses.
        let u = utterances(&v[1], 3, 8);
        assert_eq!(u[0], "And the earth was without form, and void;");
        assert!(
            u.iter()
                .all(|s| (3..=8).contains(&s.split_whitespace().count())),
            "{u:?}"
        );
        // Too short for the minimum: left out.
        assert!(utterances(&v[2], 3, 20).is_empty());
        // Short sentences run together up to the maximum.
        assert_eq!(
            utterances("Go. Come here. Sit down now.", 4, 10),
            ["Go. Come here. Sit down now."]
        );
    }

    #[test]
    fn every_utterance_is_within_bounds_and_nothing_is_invented() {
        let text = "One two three, four five six seven eight nine ten eleven twelve thirteen; fourteen. Fifteen sixteen seventeen eighteen nineteen twenty twentyone twentytwo twentythree twentyfour twentyfive twentysix.";
        for (lo, hi) in [(1, 3), (2, 5), (3, 12), (1, 40)] {
            let u = utterances(text, lo, hi);
            for s in &u {
                let n = s.split_whitespace().count();
                assert!(n >= lo && n <= hi, "{lo}..={hi}: {s:?}");
                assert!(text.contains(s.as_str()), "{s:?}");
            }
        }
    }

    #[test]
    fn reads_a_file_and_names_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kjv.txt");
        std::fs::write(&p, LISTING).unwrap();
        let s = TextSource::read(&p, TextFormat::Bible, 3, 20).unwrap();
        assert_eq!(s.name, "kjv.txt");
        assert_eq!(s.sha256.len(), 64);
        assert_eq!(s.utterances.len(), 5, "{:?}", s.utterances);
        let err = TextSource::read(&p, TextFormat::Bible, 50, 60).unwrap_err();
        assert!(
            err.to_string().contains("no utterance of 50..=60 words"),
            "{err}"
        );
    }
}
