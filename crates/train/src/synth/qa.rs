//! Spoken questions whose answers a rule can check: small sums, products
//! and differences, what comes after a number, a weekday or a month. They
//! are the spoken-question samples of the synthesised data and the test of
//! NEXUS-mini's spoken-QA behaviour.

use crate::rng::Rng;

const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A number in words (0–199), as a speaker says it.
pub fn number_words(n: u32) -> String {
    use nexus_eval::{TENS, UNITS};
    match n {
        0..=19 => UNITS[n as usize].to_string(),
        20..=99 => {
            let (t, u) = (n / 10, n % 10);
            if u == 0 {
                TENS[t as usize].to_string()
            } else {
                format!("{}-{}", TENS[t as usize], UNITS[u as usize])
            }
        }
        100 => "one hundred".into(),
        _ => format!("one hundred and {}", number_words(n - 100)),
    }
}

/// A question and the answer a rule accepts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Question {
    /// What the voice says.
    pub question: String,
    /// The answer, as a word or words (`twelve`, `Tuesday`).
    pub answer: String,
}

impl Question {
    /// Whether `reply` gives this answer: the answer's words, or its number
    /// in digits, appear in the reply (case and punctuation aside), and no
    /// other number does.
    pub fn accepts(&self, reply: &str) -> bool {
        let norm = |s: &str| {
            s.to_lowercase()
                .chars()
                .map(|c| if c.is_alphanumeric() { c } else { ' ' })
                .collect::<String>()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        let reply = format!(" {} ", norm(reply));
        let answer = norm(&self.answer);
        let digits = (0..200u32)
            .find(|n| norm(&number_words(*n)) == answer)
            .map(|n| n.to_string());
        let said = reply.contains(&format!(" {answer} "))
            || digits
                .as_ref()
                .is_some_and(|d| reply.contains(&format!(" {d} ")));
        if !said {
            return false;
        }
        // Another number in the reply makes it ambiguous.
        let other_digits = reply
            .split_whitespace()
            .filter(|w| w.chars().all(|c| c.is_ascii_digit()))
            .any(|w| Some(w) != digits.as_deref());
        !other_digits
    }
}

/// A question drawn from `rng`.
pub fn question(rng: &mut Rng) -> Question {
    let n = |rng: &mut Rng, hi: usize| rng.below(hi + 1) as u32;
    let (question, answer) = match rng.below(6) {
        0 => {
            let (a, b) = (n(rng, 12), n(rng, 12));
            (
                format!("What is {} plus {}?", number_words(a), number_words(b)),
                number_words(a + b),
            )
        }
        1 => {
            let (a, b) = (n(rng, 20), n(rng, 20));
            let (a, b) = (a.max(b), a.min(b));
            (
                format!("What is {} minus {}?", number_words(a), number_words(b)),
                number_words(a - b),
            )
        }
        2 => {
            let (a, b) = (n(rng, 10), n(rng, 10));
            (
                format!("What is {} times {}?", number_words(a), number_words(b)),
                number_words(a * b),
            )
        }
        3 => {
            let a = n(rng, 98);
            (
                format!("What number comes after {}?", number_words(a)),
                number_words(a + 1),
            )
        }
        4 => {
            let d = rng.below(DAYS.len());
            (
                format!("Which day of the week comes after {}?", DAYS[d]),
                DAYS[(d + 1) % DAYS.len()].to_string(),
            )
        }
        _ => {
            let m = rng.below(MONTHS.len());
            (
                format!("Which month comes after {}?", MONTHS[m]),
                MONTHS[(m + 1) % MONTHS.len()].to_string(),
            )
        }
    };
    Question { question, answer }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_as_spoken() {
        assert_eq!(number_words(7), "seven");
        assert_eq!(number_words(40), "forty");
        assert_eq!(number_words(63), "sixty-three");
        assert_eq!(number_words(100), "one hundred");
        assert_eq!(number_words(112), "one hundred and twelve");
    }

    #[test]
    fn questions_have_the_right_answers() {
        let mut r = Rng::new(5);
        let mut kinds = std::collections::BTreeSet::new();
        for _ in 0..300 {
            let q = question(&mut r);
            kinds.insert(
                q.question
                    .split_whitespace()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" "),
            );
            let w: Vec<&str> = q.question.trim_end_matches('?').split(' ').collect();
            let num = |s: &str| (0..200).find(|n| number_words(*n) == s).unwrap();
            match (w[0], w.get(3)) {
                ("What", Some(&"plus")) => {
                    assert_eq!(q.answer, number_words(num(w[2]) + num(w[4])))
                }
                ("What", Some(&"minus")) => {
                    assert_eq!(q.answer, number_words(num(w[2]) - num(w[4])))
                }
                ("What", Some(&"times")) => {
                    assert_eq!(q.answer, number_words(num(w[2]) * num(w[4])))
                }
                _ => {}
            }
        }
        assert!(kinds.len() >= 5, "{kinds:?}");
        let q = Question {
            question: "Which day of the week comes after Sunday?".into(),
            answer: "Monday".into(),
        };
        assert_eq!(question(&mut Rng::new(9)), question(&mut Rng::new(9)));
        assert!(q.accepts("Monday."));
        assert!(q.accepts("The day after Sunday is monday!"));
        assert!(!q.accepts("Tuesday"));
    }

    #[test]
    fn answers_in_digits_or_words_pass_and_other_numbers_fail() {
        let q = Question {
            question: "What is seven plus five?".into(),
            answer: "twelve".into(),
        };
        assert!(q.accepts("Twelve."));
        assert!(!q.accepts("7 + 5 = 12"));
        assert!(q.accepts("The answer is 12."));
        assert!(!q.accepts("The answer is 13."));
        assert!(!q.accepts("12 or 13"));
        let q = Question {
            question: "What number comes after sixty-two?".into(),
            answer: "sixty-three".into(),
        };
        assert!(q.accepts("Sixty-three"));
        assert!(q.accepts("sixty three"));
        assert!(q.accepts("63"));
    }
}
