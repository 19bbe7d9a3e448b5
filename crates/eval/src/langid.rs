//! Which language a short text is in, from its script and, for Latin
//! script, from the function words and letters it uses: enough to tell a
//! translation that stayed in its source language, or went to a third one,
//! from a good one. It answers `None` when the text gives no evidence (names,
//! numbers, "OK"), and callers must then not count the text as wrong.

/// Languages [`identify`] can answer, by ISO 639-1 code.
pub const LANGUAGES: [&str; 21] = [
    "en", "de", "es", "fr", "it", "pt", "nl", "sv", "pl", "cs", "tr", "id", "vi", "zh", "ja", "ko",
    "ru", "uk", "ar", "th", "hi",
];

/// Frequent short words, unambiguous enough to vote for one language.
const WORDS: [(&str, &[&str]); 13] = [
    (
        "en",
        &[
            "the", "and", "is", "are", "you", "we", "to", "of", "it", "that", "this", "for",
            "with", "be", "have", "has", "was", "were", "will", "can", "do", "does", "did", "not",
            "what", "who", "when", "where", "why", "how", "please", "thank", "thanks", "yes", "my",
            "your", "our", "they", "he", "she", "me", "us", "let's", "i", "i'm", "don't", "there",
            "here", "at", "on", "from", "would", "could", "should", "about", "just", "again",
            "very", "good", "morning", "next", "if", "all", "everyone",
        ],
    ),
    (
        "de",
        &[
            "der",
            "die",
            "das",
            "und",
            "ist",
            "sind",
            "war",
            "waren",
            "ich",
            "du",
            "wir",
            "ihr",
            "sie",
            "nicht",
            "ein",
            "eine",
            "einen",
            "mit",
            "für",
            "auf",
            "zu",
            "zum",
            "zur",
            "den",
            "dem",
            "des",
            "bitte",
            "danke",
            "ja",
            "nein",
            "wann",
            "wer",
            "wie",
            "warum",
            "wo",
            "was",
            "haben",
            "hat",
            "hast",
            "kann",
            "kannst",
            "können",
            "wird",
            "werden",
            "noch",
            "schon",
            "auch",
            "heute",
            "morgen",
            "uns",
            "mir",
            "dich",
            "dir",
            "mich",
            "sich",
            "nach",
            "von",
            "bei",
            "aus",
            "im",
            "am",
            "gut",
            "guten",
            "vielen",
            "dank",
            "nächste",
            "nächsten",
            "alle",
            "eure",
            "euer",
            "unser",
            "unsere",
            "dein",
            "deine",
            "jetzt",
            "diese",
            "dieser",
            "es",
            "wenn",
            "dass",
            "oder",
            "aber",
        ],
    ),
    (
        "es",
        &[
            "el",
            "la",
            "los",
            "las",
            "y",
            "es",
            "son",
            "de",
            "del",
            "que",
            "en",
            "un",
            "una",
            "por",
            "para",
            "con",
            "no",
            "sí",
            "se",
            "lo",
            "le",
            "nos",
            "mi",
            "tu",
            "su",
            "qué",
            "quién",
            "cuándo",
            "dónde",
            "cómo",
            "cuánto",
            "cuántas",
            "cuántos",
            "gracias",
            "favor",
            "muy",
            "más",
            "está",
            "están",
            "estamos",
            "hay",
            "hoy",
            "mañana",
            "buenos",
            "buenas",
            "siguiente",
            "todos",
            "todo",
            "ahora",
            "tiene",
            "tienes",
            "puedes",
            "podemos",
            "vamos",
            "pero",
            "también",
            "al",
            "este",
            "esta",
            "eso",
        ],
    ),
    (
        "fr",
        &[
            "le",
            "la",
            "les",
            "et",
            "est",
            "sont",
            "je",
            "tu",
            "il",
            "elle",
            "nous",
            "vous",
            "ils",
            "de",
            "du",
            "des",
            "un",
            "une",
            "pour",
            "avec",
            "dans",
            "sur",
            "ne",
            "pas",
            "oui",
            "non",
            "merci",
            "bonjour",
            "qui",
            "quand",
            "où",
            "pourquoi",
            "comment",
            "c'est",
            "ce",
            "cette",
            "mais",
            "aussi",
            "très",
            "plus",
            "suis",
            "avez",
            "avons",
            "au",
            "aux",
            "s'il",
            "vous",
            "plaît",
            "aujourd'hui",
            "demain",
        ],
    ),
    (
        "it",
        &[
            "il",
            "lo",
            "la",
            "gli",
            "le",
            "e",
            "è",
            "sono",
            "di",
            "del",
            "della",
            "che",
            "un",
            "una",
            "per",
            "con",
            "non",
            "sì",
            "grazie",
            "prego",
            "chi",
            "quando",
            "dove",
            "perché",
            "come",
            "questo",
            "questa",
            "molto",
            "più",
            "oggi",
            "domani",
            "ci",
            "siamo",
            "abbiamo",
            "buongiorno",
            "anche",
            "ma",
        ],
    ),
    (
        "pt",
        &[
            "o", "a", "os", "as", "e", "é", "são", "de", "do", "da", "dos", "das", "que", "um",
            "uma", "para", "com", "não", "sim", "obrigado", "obrigada", "quem", "quando", "onde",
            "porque", "como", "muito", "mais", "hoje", "amanhã", "você", "nós", "em", "no", "na",
            "está", "estão", "tem", "bom", "dia", "também", "mas",
        ],
    ),
    (
        "nl",
        &[
            "de",
            "het",
            "een",
            "en",
            "is",
            "zijn",
            "ik",
            "jij",
            "je",
            "wij",
            "we",
            "niet",
            "van",
            "voor",
            "met",
            "op",
            "dat",
            "die",
            "dit",
            "wat",
            "wie",
            "wanneer",
            "waar",
            "waarom",
            "hoe",
            "ja",
            "nee",
            "dank",
            "bedankt",
            "alstublieft",
            "graag",
            "vandaag",
            "morgen",
            "ook",
            "maar",
            "heb",
            "hebben",
            "kunnen",
            "kun",
            "u",
            "ons",
            "onze",
        ],
    ),
    (
        "sv",
        &[
            "och", "är", "jag", "du", "vi", "ni", "det", "den", "en", "ett", "inte", "för", "med",
            "på", "att", "som", "vad", "vem", "när", "var", "varför", "hur", "ja", "nej", "tack",
            "idag", "i", "morgon", "också", "men", "har", "kan", "vill",
        ],
    ),
    (
        "pl",
        &[
            "i",
            "w",
            "z",
            "na",
            "nie",
            "jest",
            "są",
            "to",
            "że",
            "się",
            "do",
            "od",
            "dla",
            "co",
            "kto",
            "kiedy",
            "gdzie",
            "dlaczego",
            "jak",
            "tak",
            "dziękuję",
            "proszę",
            "dzisiaj",
            "jutro",
            "mamy",
            "możesz",
            "czy",
            "ale",
            "też",
        ],
    ),
    (
        "cs",
        &[
            "a", "v", "je", "jsou", "to", "že", "se", "na", "ne", "ano", "do", "od", "pro", "co",
            "kdo", "kdy", "kde", "proč", "jak", "děkuji", "prosím", "dnes", "zítra", "máme",
            "můžeš", "ale", "také",
        ],
    ),
    (
        "tr",
        &[
            "ve",
            "bir",
            "bu",
            "şu",
            "da",
            "de",
            "ne",
            "kim",
            "ne",
            "zaman",
            "nerede",
            "neden",
            "nasıl",
            "evet",
            "hayır",
            "teşekkürler",
            "lütfen",
            "bugün",
            "yarın",
            "için",
            "ile",
            "var",
            "yok",
            "mı",
            "mi",
            "ama",
            "çok",
        ],
    ),
    (
        "id",
        &[
            "dan",
            "yang",
            "ini",
            "itu",
            "adalah",
            "saya",
            "kamu",
            "kami",
            "kita",
            "tidak",
            "di",
            "ke",
            "dari",
            "untuk",
            "dengan",
            "apa",
            "siapa",
            "kapan",
            "mana",
            "mengapa",
            "bagaimana",
            "ya",
            "terima",
            "kasih",
            "tolong",
            "hari",
            "besok",
            "juga",
            "tetapi",
        ],
    ),
    (
        "vi",
        &[
            "và", "là", "của", "có", "không", "tôi", "bạn", "chúng", "ta", "này", "đó", "cho",
            "với", "gì", "ai", "khi", "nào", "đâu", "sao", "cảm", "ơn", "hôm", "nay", "mai",
            "được", "những", "một",
        ],
    ),
];

/// Letters that only some Latin-script languages use, with the language
/// they point at.
const LETTERS: [(char, &str); 32] = [
    ('ä', "de"),
    ('ö', "de"),
    ('ü', "de"),
    ('ß', "de"),
    ('ñ', "es"),
    ('¿', "es"),
    ('¡', "es"),
    ('ç', "fr"),
    ('ê', "fr"),
    ('è', "fr"),
    ('œ', "fr"),
    ('ã', "pt"),
    ('õ', "pt"),
    ('ł', "pl"),
    ('ą', "pl"),
    ('ę', "pl"),
    ('ś', "pl"),
    ('ź', "pl"),
    ('ż', "pl"),
    ('ě', "cs"),
    ('ř', "cs"),
    ('ů', "cs"),
    ('ğ', "tr"),
    ('ş', "tr"),
    ('ı', "tr"),
    ('ơ', "vi"),
    ('ư', "vi"),
    ('đ', "vi"),
    ('ạ', "vi"),
    ('ả', "vi"),
    ('å', "sv"),
    ('ì', "it"),
];

#[derive(Default)]
struct Scripts {
    latin: usize,
    han: usize,
    kana: usize,
    hangul: usize,
    cyrillic: usize,
    ukrainian: usize,
    arabic: usize,
    thai: usize,
    devanagari: usize,
}

fn scripts(text: &str) -> Scripts {
    let mut s = Scripts::default();
    for c in text.chars() {
        match c as u32 {
            0x3040..=0x30ff | 0x31f0..=0x31ff => s.kana += 1,
            0x3400..=0x4dbf | 0x4e00..=0x9fff | 0xf900..=0xfaff => s.han += 1,
            0xac00..=0xd7af | 0x1100..=0x11ff | 0x3130..=0x318f => s.hangul += 1,
            0x0400..=0x04ff => {
                s.cyrillic += 1;
                if matches!(c, 'і' | 'ї' | 'є' | 'ґ' | 'І' | 'Ї' | 'Є' | 'Ґ') {
                    s.ukrainian += 1;
                }
            }
            0x0600..=0x06ff => s.arabic += 1,
            0x0e00..=0x0e7f => s.thai += 1,
            0x0900..=0x097f => s.devanagari += 1,
            _ if c.is_alphabetic() => s.latin += 1,
            _ => {}
        }
    }
    s
}

/// The language of `text`, or `None` without enough evidence.
pub fn identify(text: &str) -> Option<&'static str> {
    let s = scripts(text);
    // A Han or kana character carries about as much as a short word: three
    // Latin letters' worth, so names and product words in Latin letters
    // inside a Chinese sentence do not outvote it.
    let cjk = 3 * (s.han + s.kana);
    let others = [
        (3 * s.hangul, "ko"),
        (s.cyrillic, if s.ukrainian > 0 { "uk" } else { "ru" }),
        (s.arabic, "ar"),
        (s.thai, "th"),
        (s.devanagari, "hi"),
    ];
    let (best_other, other_lang) = others.iter().copied().max_by_key(|(n, _)| *n)?;
    if cjk > 0 && cjk >= s.latin && cjk >= best_other {
        return Some(if s.kana > 0 { "ja" } else { "zh" });
    }
    if best_other > 0 && best_other >= s.latin {
        return Some(other_lang);
    }
    if s.latin == 0 {
        return None;
    }
    latin(text)
}

fn latin(text: &str) -> Option<&'static str> {
    let lower = text.to_lowercase();
    let mut score: Vec<(f64, &'static str)> = WORDS.iter().map(|(l, _)| (0.0, *l)).collect();
    let words: Vec<&str> = lower
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .filter(|w| !w.is_empty())
        .collect();
    for w in &words {
        // A word several languages share splits its vote among them.
        let owners: Vec<usize> = WORDS
            .iter()
            .enumerate()
            .filter(|(_, (_, ws))| ws.contains(w))
            .map(|(i, _)| i)
            .collect();
        for &i in &owners {
            score[i].0 += 1.0 / owners.len() as f64;
        }
    }
    for c in lower.chars() {
        if let Some((_, l)) = LETTERS.iter().find(|(x, _)| *x == c)
            && let Some(s) = score.iter_mut().find(|(_, x)| x == l)
        {
            s.0 += 0.75;
        }
    }
    score.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (best, lang) = score[0];
    let second = score[1].0;
    // One shared word is no evidence; a clear lead is.
    (best >= 1.0 && best >= second * 1.5 + 0.25).then_some(lang)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_the_test_set_languages_apart() {
        for (text, lang) in [
            ("Can you hear me clearly now?", "en"),
            ("Ja, ich kann dich klar hören.", "de"),
            ("Kannst du mich jetzt gut hören?", "de"),
            ("¿Me oyes bien ahora?", "es"),
            ("Vielen Dank.", "de"),
            ("Muchas gracias.", "es"),
            ("Thank you very much.", "en"),
            ("你现在能听清楚我说话吗？", "zh"),
            ("我们正在从Oracle迁移到PostgreSQL。", "zh"),
            ("会議は明日の九時に始まります。", "ja"),
            ("회의는 내일 아홉 시에 시작합니다.", "ko"),
            ("Встреча начнётся завтра в девять.", "ru"),
            ("Зустріч почнеться завтра о дев'ятій, і всі прийдуть.", "uk"),
            ("La réunion commence demain à neuf heures.", "fr"),
            ("Die Wetter war froh.", "de"),
            ("El tiempo fue frío y ventoso toda la semana.", "es"),
        ] {
            assert_eq!(identify(text), Some(lang), "{text}");
        }
    }

    #[test]
    fn no_evidence_is_no_answer() {
        for text in ["", "OK.", "2048", "Microsoft", "PostgreSQL 16", "..."] {
            assert_eq!(identify(text), None, "{text}");
        }
    }
}
