//! Machine translation scores: chrF and BLEU over a corpus, computed the
//! way sacreBLEU 2.x computes them with its defaults, so figures compare with
//! published ones (tests pin values sacreBLEU 2.6.0 printed for the same
//! sentences).
//!
//! - chrF: character n-grams of order 1–6 with whitespace removed, β = 2;
//!   statistics summed over the corpus, precision and recall averaged over
//!   the orders that occur, then combined.
//! - BLEU: word n-grams of order 1–4 after the `13a` tokeniser (the `zh`
//!   tokeniser for Chinese, Japanese and Korean targets, which splits CJK
//!   characters apart), clipped counts summed over the corpus, brevity
//!   penalty, no smoothing needed unless an order has no match (then the
//!   `exp` smoothing sacreBLEU uses by default).

use std::collections::HashMap;
use std::sync::OnceLock;

const CHAR_ORDER: usize = 6;
const BETA: f64 = 2.0;
const BLEU_ORDER: usize = 4;

fn ngram_counts<T: std::hash::Hash + Eq + Clone>(items: &[T], n: usize) -> HashMap<&[T], usize> {
    let mut m = HashMap::new();
    if items.len() >= n {
        for w in items.windows(n) {
            *m.entry(w).or_insert(0) += 1;
        }
    }
    m
}

fn matches<T: std::hash::Hash + Eq>(hyp: &HashMap<&[T], usize>, r: &HashMap<&[T], usize>) -> usize {
    hyp.iter()
        .map(|(g, c)| (*c).min(r.get(g).copied().unwrap_or(0)))
        .sum()
}

/// Corpus chrF (0–100) of `hypotheses` against one reference each.
pub fn chrf<S: AsRef<str>, R: AsRef<str>>(hypotheses: &[S], references: &[R]) -> f64 {
    // [hyp, ref, match] per order, summed over the corpus.
    let mut stats = [[0usize; 3]; CHAR_ORDER];
    for (h, r) in hypotheses.iter().zip(references) {
        let h: Vec<char> = h.as_ref().chars().filter(|c| !c.is_whitespace()).collect();
        let r: Vec<char> = r.as_ref().chars().filter(|c| !c.is_whitespace()).collect();
        for (n, s) in stats.iter_mut().enumerate() {
            let (hc, rc) = (ngram_counts(&h, n + 1), ngram_counts(&r, n + 1));
            s[0] += hc.values().sum::<usize>();
            s[1] += rc.values().sum::<usize>();
            s[2] += matches(&hc, &rc);
        }
    }
    let (mut prec, mut rec, mut orders) = (0.0, 0.0, 0usize);
    for [nh, nr, nm] in stats {
        if nh > 0 && nr > 0 {
            prec += nm as f64 / nh as f64;
            rec += nm as f64 / nr as f64;
            orders += 1;
        }
    }
    if orders == 0 {
        return 0.0;
    }
    let (p, r) = (prec / orders as f64, rec / orders as f64);
    let f = BETA * BETA;
    if p + r == 0.0 {
        0.0
    } else {
        100.0 * (1.0 + f) * p * r / (f * p + r)
    }
}

/// The `13a` tokeniser's rules (mteval-v13a, as sacreBLEU writes them).
fn rules_13a() -> &'static [(regex::Regex, &'static str)] {
    static RULES: OnceLock<Vec<(regex::Regex, &'static str)>> = OnceLock::new();
    RULES.get_or_init(|| {
        [
            (r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", " $1 "),
            (r"([^0-9])([\.,])", "$1 $2 "),
            (r"([\.,])([^0-9])", " $1 $2"),
            (r"([0-9])(-)", "$1 $2 "),
        ]
        .into_iter()
        .map(|(re, to)| (regex::Regex::new(re).expect("valid 13a rule"), to))
        .collect()
    })
}

fn post_tokenize(line: &str) -> Vec<String> {
    let mut s = line.to_owned();
    for (re, to) in rules_13a() {
        s = re.replace_all(&s, *to).into_owned();
    }
    s.split_whitespace().map(str::to_owned).collect()
}

/// Words of `line` after the `13a` tokeniser.
pub fn tokenize_13a(line: &str) -> Vec<String> {
    let mut l = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if l.contains('&') {
        l = l
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    post_tokenize(&format!(" {l} "))
}

/// Whether sacreBLEU's `zh` tokeniser splits `c` off as a character of its
/// own. Its table's two five-digit entries (`\u20000`, `\u2f800`) read in
/// Python as a four-digit code point followed by "0", so they cover
/// U+2000–U+2A6D and U+2F80–U+2FA1: copied as they behave.
fn zh_char(c: char) -> bool {
    const RANGES: [(u32, u32); 22] = [
        (0x3400, 0x4db5),
        (0x4e00, 0x9fa5),
        (0x9fa6, 0x9fbb),
        (0xf900, 0xfa2d),
        (0xfa30, 0xfa6a),
        (0xfa70, 0xfad9),
        (0x2000, 0x2a6d),
        (0x2f80, 0x2fa1),
        (0xff00, 0xffef),
        (0x2e80, 0x2eff),
        (0x3000, 0x303f),
        (0x31c0, 0x31ef),
        (0x2f00, 0x2fdf),
        (0x2ff0, 0x2fff),
        (0x3100, 0x312f),
        (0x31a0, 0x31bf),
        (0xfe10, 0xfe1f),
        (0xfe30, 0xfe4f),
        (0x2600, 0x26ff),
        (0x2700, 0x27bf),
        (0x3200, 0x32ff),
        (0x3300, 0x33ff),
    ];
    let u = c as u32;
    RANGES.iter().any(|&(a, b)| (a..=b).contains(&u))
}

/// Words of `line` after sacreBLEU's `zh` tokeniser.
pub fn tokenize_zh(line: &str) -> Vec<String> {
    let mut s = String::with_capacity(line.len() * 3);
    for c in line.trim().chars() {
        if zh_char(c) {
            s.push(' ');
            s.push(c);
            s.push(' ');
        } else {
            s.push(c);
        }
    }
    post_tokenize(&s)
}

/// Corpus BLEU (0–100); `target` picks the tokeniser (`zh`, `ja`, `ko`:
/// the `zh` one; any other: `13a`).
pub fn bleu<S: AsRef<str>, R: AsRef<str>>(hypotheses: &[S], references: &[R], target: &str) -> f64 {
    let tok: fn(&str) -> Vec<String> = if matches!(target, "zh" | "ja" | "ko") {
        tokenize_zh
    } else {
        tokenize_13a
    };
    let (mut hyp_len, mut ref_len) = (0usize, 0usize);
    let mut correct = [0usize; BLEU_ORDER];
    let mut total = [0usize; BLEU_ORDER];
    for (h, r) in hypotheses.iter().zip(references) {
        let (h, r) = (tok(h.as_ref()), tok(r.as_ref()));
        hyp_len += h.len();
        ref_len += r.len();
        for n in 0..BLEU_ORDER {
            let (hc, rc) = (ngram_counts(&h, n + 1), ngram_counts(&r, n + 1));
            correct[n] += matches(&hc, &rc);
            total[n] += h.len().saturating_sub(n);
        }
    }
    if hyp_len == 0 {
        return 0.0;
    }
    // sacreBLEU's default `exp` smoothing: an order without a match counts
    // 1 / 2^k (k-th such order) instead of zero.
    let mut smooth = 1.0;
    let mut log_sum = 0.0;
    for n in 0..BLEU_ORDER {
        if total[n] == 0 {
            // Hypotheses shorter than n words: sacreBLEU leaves the order out
            // of the mean only under effective-order; by default it scores 0.
            return 0.0;
        }
        let p = if correct[n] == 0 {
            smooth *= 2.0;
            100.0 / (smooth * total[n] as f64)
        } else {
            100.0 * correct[n] as f64 / total[n] as f64
        };
        log_sum += p.ln();
    }
    let bp = if hyp_len < ref_len {
        (1.0 - ref_len as f64 / hyp_len as f64).exp()
    } else {
        1.0
    };
    bp * (log_sum / BLEU_ORDER as f64).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Values printed by sacreBLEU 2.6.0 for the same lists:
    // sacrebleu.corpus_chrf(hyps, [refs]).score and
    // sacrebleu.corpus_bleu(hyps, [refs], tokenize=...).score
    const HYP_DE: [&str; 4] = [
        "Ja, ich kann dich klar hören.",
        "Die Wetter war froh.",
        "Der Train zum Berlin ist spät.",
        "Schick mir den Bericht bis Freitag, bitte.",
    ];
    const REF_DE: [&str; 4] = [
        "Kannst du mich jetzt gut hören?",
        "Das Wetter war kalt.",
        "Der Zug nach Berlin hat Verspätung.",
        "Schick mir den Bericht bis Freitag.",
    ];
    const HYP_ZH: [&str; 3] = [
        "你现在能清楚地听到我吗？",
        "会议明天上午9点在大房间开始。",
        "我们从Oracle迁移到PostgreSQL—很快。",
    ];
    const REF_ZH: [&str; 3] = [
        "你现在能听清楚我说话吗？",
        "会议明天早上九点在大会议室开始。",
        "我们正在从Oracle迁移到PostgreSQL。",
    ];

    #[test]
    fn chrf_matches_sacrebleu() {
        assert!(
            (chrf(&HYP_DE, &REF_DE) - SACRE_CHRF_DE).abs() < 1e-6,
            "{}",
            chrf(&HYP_DE, &REF_DE)
        );
        assert!(
            (chrf(&HYP_ZH, &REF_ZH) - SACRE_CHRF_ZH).abs() < 1e-6,
            "{}",
            chrf(&HYP_ZH, &REF_ZH)
        );
        assert_eq!(chrf(&["abc"], &["abc"]), 100.0);
        assert_eq!(chrf(&[""], &["abc"]), 0.0);
    }

    #[test]
    fn bleu_matches_sacrebleu() {
        let de = bleu(&HYP_DE, &REF_DE, "de");
        assert!((de - SACRE_BLEU_DE).abs() < 1e-6, "{de}");
        let zh = bleu(&HYP_ZH, &REF_ZH, "zh");
        assert!((zh - SACRE_BLEU_ZH).abs() < 1e-6, "{zh}");
        assert!((bleu(&REF_DE, &REF_DE, "de") - 100.0).abs() < 1e-9);
    }

    #[test]
    fn tokenisers_match_sacrebleu() {
        assert_eq!(
            tokenize_13a("It costs 250,000 euros (approx.), e.g. at 3-4 p.m."),
            SACRE_13A.split(' ').collect::<Vec<_>>()
        );
        assert_eq!(
            tokenize_zh("我们从Oracle迁移到PostgreSQL—很快, 3.5%。"),
            SACRE_ZH.split(' ').collect::<Vec<_>>()
        );
    }

    const SACRE_CHRF_DE: f64 = 48.018470816199596;
    const SACRE_CHRF_ZH: f64 = 53.29376505800154;
    const SACRE_BLEU_DE: f64 = 24.981216163165737;
    const SACRE_BLEU_ZH: f64 = 37.33278295741092;
    const SACRE_13A: &str = "It costs 250,000 euros ( approx . ) , e . g . at 3 - 4 p . m .";
    const SACRE_ZH: &str = "我 们 从 Oracle 迁 移 到 PostgreSQL — 很 快 , 3.5 % 。";
}
