//! Scoring transcripts and translations against references.
//!
//! Translations: [`mt`] holds chrF and BLEU as sacreBLEU computes them,
//! [`langid`] tells the language of a short text, and [`translation`] the
//! caption test set and the failure checks the translator also runs on
//! itself.
//!
//! [`normalize_english`] follows the spirit of Whisper's `EnglishTextNormalizer`
//! so that formatting choices (case, punctuation, "ten" vs "10", "Mr." vs
//! "mister", hyphens) do not count as recognition errors; [`wer`] and [`cer`]
//! are edit distances over words and characters. Both systems in a comparison
//! go through the same normaliser.

pub mod der;
pub mod langid;
pub mod meetings;
pub mod mt;
pub mod sentences;
pub mod translation;

/// Edit-distance totals; rates are `errors / reference_len`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorCounts {
    /// Substitutions + deletions + insertions.
    pub errors: usize,
    /// Length of the reference.
    pub reference_len: usize,
}

impl ErrorCounts {
    /// Error rate, 0 for an empty reference with an empty hypothesis.
    pub fn rate(&self) -> f64 {
        if self.reference_len == 0 {
            return if self.errors == 0 { 0.0 } else { 1.0 };
        }
        self.errors as f64 / self.reference_len as f64
    }
}

impl std::ops::Add for ErrorCounts {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            errors: self.errors + o.errors,
            reference_len: self.reference_len + o.reference_len,
        }
    }
}

impl std::iter::Sum for ErrorCounts {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), |a, b| a + b)
    }
}

fn levenshtein<T: PartialEq>(r: &[T], h: &[T]) -> usize {
    let mut prev: Vec<usize> = (0..=h.len()).collect();
    let mut cur = vec![0; h.len() + 1];
    for (i, a) in r.iter().enumerate() {
        cur[0] = i + 1;
        for (j, b) in h.iter().enumerate() {
            let sub = prev[j] + usize::from(a != b);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[h.len()]
}

/// Word errors of `hypothesis` against `reference`, after English normalisation.
pub fn wer(reference: &str, hypothesis: &str) -> ErrorCounts {
    let r = normalize_english(reference);
    let h = normalize_english(hypothesis);
    let r: Vec<&str> = r.split_whitespace().collect();
    let h: Vec<&str> = h.split_whitespace().collect();
    ErrorCounts {
        errors: levenshtein(&r, &h),
        reference_len: r.len(),
    }
}

/// Character errors (for Chinese and other unspaced scripts), ignoring
/// whitespace and punctuation.
pub fn cer(reference: &str, hypothesis: &str) -> ErrorCounts {
    let keep = |s: &str| -> Vec<char> {
        s.chars()
            .filter(|c| !c.is_whitespace() && !is_punct(*c))
            .flat_map(char::to_lowercase)
            .collect()
    };
    let (r, h) = (keep(reference), keep(hypothesis));
    ErrorCounts {
        errors: levenshtein(&r, &h),
        reference_len: r.len(),
    }
}

fn is_punct(c: char) -> bool {
    c.is_ascii_punctuation() || "，。！？、；：“”‘’（）《》…—·「」".contains(c)
}

/// English number words 0–19.
pub const UNITS: &[&str] = &[
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
];
/// English tens (index × 10), empty below twenty.
pub const TENS: &[&str] = &[
    "", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
];

fn number_word(w: &str) -> Option<u64> {
    if let Some(i) = UNITS.iter().position(|u| *u == w) {
        return Some(i as u64);
    }
    TENS.iter()
        .position(|t| !t.is_empty() && *t == w)
        .map(|i| i as u64 * 10)
}

/// Rewrites spelled-out numbers ("twenty one", "two hundred and five") as digits.
fn numbers_to_digits(words: Vec<String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let mut total: u64 = 0;
        let mut current: u64 = 0;
        let mut j = i;
        let mut any = false;
        while j < words.len() {
            let w = words[j].as_str();
            if let Some(n) = number_word(w) {
                // "twenty one" adds; "one two" is two numbers.
                if any && !current.is_multiple_of(10) && n < 10
                    || any && current >= 10 && n >= 10 && !current.is_multiple_of(100)
                {
                    break;
                }
                current += n;
                any = true;
            } else if any && w == "hundred" {
                current = current.max(1) * 100;
            } else if any && (w == "thousand" || w == "million") {
                let scale = if w == "thousand" { 1_000 } else { 1_000_000 };
                total += current.max(1) * scale;
                current = 0;
            } else if any
                && w == "and"
                && j + 1 < words.len()
                && number_word(&words[j + 1]).is_some()
            {
                // "hundred and five"
            } else {
                break;
            }
            j += 1;
        }
        if any {
            out.push((total + current).to_string());
            i = j;
        } else {
            out.push(words[i].clone());
            i += 1;
        }
    }
    out
}

/// Lower-cases, expands common abbreviations, turns spelled numbers into
/// digits, splits hyphenated words, and drops punctuation and fillers.
pub fn normalize_english(text: &str) -> String {
    let lower = text.to_lowercase().replace(['-', '—', '–'], " ");
    let mut words: Vec<String> = Vec::new();
    for raw in lower.split_whitespace() {
        let w: String = raw
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == '\'' || *c == '.' || *c == '%')
            .collect();
        let w = w.trim_matches(|c| c == '\'' || c == '.').to_string();
        let w = match w.as_str() {
            "mr" => "mister".to_string(),
            "mrs" => "missus".to_string(),
            "dr" => "doctor".to_string(),
            "st" => "saint".to_string(),
            "ok" | "okay" => "okay".to_string(),
            "%" => "percent".to_string(),
            _ => w,
        };
        let w = w.replace('.', "");
        if w.is_empty() || matches!(w.as_str(), "uh" | "um" | "hmm" | "mm" | "mhm" | "ah" | "er") {
            continue;
        }
        words.push(w);
    }
    numbers_to_digits(words).join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_is_not_an_error() {
        assert_eq!(
            wer("go forward ten meters", "Go forward 10 meters.").errors,
            0
        );
        assert_eq!(
            wer(
                "and mister john dashwood had then leisure",
                "And Mr. John Dashwood had then leisure"
            )
            .errors,
            0
        );
        assert_eq!(
            wer(
                "he was not an ill disposed young man",
                "He was not an ill-disposed young man."
            )
            .errors,
            0
        );
        assert_eq!(
            normalize_english("Twenty-one, two hundred and five!"),
            "21 205"
        );
        assert_eq!(normalize_english("one two three"), "1 2 3");
    }

    #[test]
    fn errors_are_counted() {
        let e = wer("the cat sat on the mat", "the cat sat on mat today");
        assert_eq!((e.errors, e.reference_len), (2, 6));
        assert!((e.rate() - 1.0 / 3.0).abs() < 1e-12);
        let total: ErrorCounts = [wer("a b", "a"), wer("c d", "c d")].into_iter().sum();
        assert_eq!((total.errors, total.reference_len), (1, 4));
        assert_eq!(wer("", "").rate(), 0.0);
    }

    #[test]
    fn cer_for_chinese() {
        let e = cer("向前走十米。", "向前走十米");
        assert_eq!(e.errors, 0);
        let e = cer("向前走十米", "向后走十米");
        assert_eq!((e.errors, e.reference_len), (1, 5));
    }
}
