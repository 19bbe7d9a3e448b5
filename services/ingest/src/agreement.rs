//! Stable interim text by local agreement: a word is committed once two
//! consecutive hypotheses of an utterance agree on it and every word before it.
//! Committed words are never taken back while the utterance runs, so interim
//! captions grow instead of flickering; the final result is authoritative.

/// Agreement state of one utterance.
#[derive(Debug, Default, Clone)]
pub struct Agreement {
    committed: Vec<String>,
    previous: Vec<String>,
}

fn norm(w: &str) -> String {
    w.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

impl Agreement {
    /// Takes a new hypothesis; returns the text to show and its stability (the
    /// committed share of its words).
    pub fn update(&mut self, hypothesis: &str) -> (String, f32) {
        let words: Vec<String> = hypothesis.split_whitespace().map(str::to_owned).collect();
        let agreed = self
            .previous
            .iter()
            .zip(&words)
            .take_while(|(a, b)| norm(a) == norm(b))
            .count();
        // Only words past the committed ones are added: two hypotheses that agree
        // with each other but not with committed words never rewrite those.
        if agreed > self.committed.len() {
            let n = self.committed.len();
            self.committed.extend_from_slice(&words[n..agreed]);
        }
        self.previous = words.clone();
        let tail = words.get(self.committed.len()..).unwrap_or(&[]);
        let shown: Vec<&str> = self
            .committed
            .iter()
            .chain(tail)
            .map(String::as_str)
            .collect();
        let stability = if shown.is_empty() {
            0.0
        } else {
            self.committed.len() as f32 / shown.len() as f32
        };
        (shown.join(" "), stability)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_words_never_flicker() {
        let mut a = Agreement::default();
        assert_eq!(a.update("the quick"), ("the quick".into(), 0.0));
        // Two hypotheses agree on "the quick": committed.
        let (t, s) = a.update("the quick brown");
        assert_eq!(t, "the quick brown");
        assert!((s - 2.0 / 3.0).abs() < 1e-6);
        // A revision that rewrites committed words keeps them; only the tail changes.
        let (t, _) = a.update("a quick brow fox");
        assert_eq!(t, "the quick brow fox");
        let (t, s) = a.update("the quick brown fox jumps");
        assert_eq!(t, "the quick brown fox jumps");
        assert!(s < 1.0);
    }

    #[test]
    fn agreeing_revisions_never_rewrite_committed_words() {
        let mut a = Agreement::default();
        a.update("the quick");
        a.update("the quick brown");
        a.update("a quick brown fox");
        // The two latest agree on "a quick brown fox": "brown fox" join the
        // committed words, and "the" stays.
        let (t, s) = a.update("a quick brown fox jumps");
        assert_eq!(t, "the quick brown fox jumps");
        assert!((s - 4.0 / 5.0).abs() < 1e-6);
    }

    #[test]
    fn punctuation_and_case_do_not_break_agreement() {
        let mut a = Agreement::default();
        a.update("Hello, world");
        let (_, s) = a.update("hello world.");
        assert_eq!(s, 1.0);
    }
}
