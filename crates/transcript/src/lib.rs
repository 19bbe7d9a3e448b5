//! Transcripts as users receive them.
//!
//! Owns the neutral [`Transcript`] shape (segments with optional word timings)
//! and its file formats: plain text, JSON, verbose JSON (OpenAI's
//! `verbose_json`), SubRip and WebVTT. The CLI, the HTTP API and batch jobs all
//! write through here, so one fix reaches every output.

use serde::{Deserialize, Serialize};

/// A timed word.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Word {
    /// The word as spoken, with its leading space.
    pub word: String,
    /// Start, seconds.
    pub start: f64,
    /// End, seconds.
    pub end: f64,
    /// Confidence (0..1).
    pub probability: f64,
    /// Who said it (`Speaker 1`, ...), when the transcript was diarized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speaker: Option<String>,
}

/// A timed stretch of text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    /// Position in the transcript.
    pub id: usize,
    /// Start, seconds.
    pub start: f64,
    /// End, seconds.
    pub end: f64,
    /// Text.
    pub text: String,
    /// The decoder's figures (tokens, temperature, log-probability,
    /// compression ratio), when the model reports them; omitted otherwise,
    /// never written as zeros.
    #[serde(flatten)]
    pub decoding: Option<Decoding>,
    /// Probability the segment holds no speech, when the model reports one
    /// (Whisper); omitted otherwise, never written as zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_speech_prob: Option<f64>,
    /// Word timings, when asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub words: Vec<Word>,
    /// The text in the requested target language, when translated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub translation: Option<String>,
    /// Why the segment could not be translated (`answered`, `untranslated`,
    /// ...), when a translation was asked for and none passed the checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub translation_failure: Option<String>,
    /// Who spoke (`Speaker 1`, ...), when the transcript was diarized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speaker: Option<String>,
}

/// How the decoder arrived at a segment's text (OpenAI's verbose_json fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decoding {
    /// Model tokens.
    pub tokens: Vec<u32>,
    /// Temperature of the attempt that was kept.
    pub temperature: f64,
    /// Mean token log-probability.
    pub avg_logprob: f64,
    /// Text compression ratio (repetition indicator).
    pub compression_ratio: f64,
}

impl Segment {
    /// What to show: the translation when there is one; the text marked
    /// [`UNTRANSLATED`] when its translation failed; else the text.
    pub fn display_text(&self) -> std::borrow::Cow<'_, str> {
        match (&self.translation, &self.translation_failure) {
            (_, Some(_)) => format!("{UNTRANSLATED} {}", self.text.trim()).into(),
            (Some(t), None) => t.as_str().into(),
            (None, None) => self.text.as_str().into(),
        }
    }
}

/// The name of speaker `index` (from 0) in every output: `Speaker 1`, ...
pub fn speaker_name(index: usize) -> String {
    format!("Speaker {}", index + 1)
}

/// Marks a caption shown in its own language because no translation of it
/// passed the checks.
pub const UNTRANSLATED: &str = "[untranslated]";

/// A whole transcript.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transcript {
    /// `transcribe` or `translate`.
    pub task: String,
    /// Language of the text (ISO 639-1).
    pub language: String,
    /// Audio duration, seconds.
    pub duration: f64,
    /// Segments in time order.
    pub segments: Vec<Segment>,
    /// Language of the segments' translations, when translated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_language: Option<String>,
}

// The one format type behind the HTTP API's `response_format`, `nexus
// transcribe --format`, the gRPC jobs' `OutputFormat` (mapped in nexus-proto)
// and the operator's CRD, which spells the names in camelCase (`verboseJson`).
/// A transcript format: plain text, JSON, verbose JSON (segments and words
/// with times), SubRip or WebVTT subtitles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum Format {
    /// The text, one segment per line.
    Text,
    /// `{"text": …}` (OpenAI's `json`), with language and segments.
    Json,
    /// Everything, OpenAI's `verbose_json` layout.
    VerboseJson,
    /// SubRip subtitles.
    Srt,
    /// WebVTT subtitles.
    Vtt,
}

/// An unknown format name.
#[derive(Debug, thiserror::Error)]
#[error("unknown format {0:?}; use text, json, verbose_json, srt or vtt")]
pub struct UnknownFormat(pub String);

impl std::str::FromStr for Format {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "text" | "txt" => Format::Text,
            "json" => Format::Json,
            "verbose_json" => Format::VerboseJson,
            "srt" => Format::Srt,
            "vtt" | "webvtt" => Format::Vtt,
            other => return Err(UnknownFormat(other.to_owned())),
        })
    }
}

impl Format {
    /// The file a transcript of this format is stored as (in an output
    /// ConfigMap, for one).
    pub fn file_name(self) -> &'static str {
        match self {
            Format::Text => "transcript.txt",
            Format::Json => "transcript.json",
            Format::VerboseJson => "transcript.verbose.json",
            Format::Srt => "transcript.srt",
            Format::Vtt => "transcript.vtt",
        }
    }

    /// MIME type of the rendered output.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; charset=utf-8",
            Format::Json | Format::VerboseJson => "application/json",
            Format::Srt => "application/x-subrip",
            Format::Vtt => "text/vtt; charset=utf-8",
        }
    }
}

fn timestamp(seconds: f64, decimal: char) -> String {
    cue_timestamp((seconds.max(0.0) * 1000.0).round() as u64, decimal)
}

/// A subtitle time, `HH:MM:SS` then `decimal` (`,` for SubRip, `.` for
/// WebVTT) and milliseconds.
pub fn cue_timestamp(ms: u64, decimal: char) -> String {
    format!(
        "{:02}:{:02}:{:02}{decimal}{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// A cue's text: one line, no blank lines (which would end the cue), no `-->`.
pub fn cue_text(text: &str) -> String {
    text.trim()
        .replace("-->", "->")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

impl Transcript {
    /// Labels every word and segment with the speaker `speaker_at` gives for
    /// its time span (seconds), and splits a segment where its words change
    /// speaker, at the word boundary. Split parts take their words' text and
    /// times; their decoder figures (which were for the whole) are dropped.
    /// A translated segment is not split (its translation has no word
    /// times): it takes the speaker of most of its words. Segments are
    /// renumbered.
    pub fn apply_speakers(&mut self, speaker_at: impl Fn(f64, f64) -> Option<usize>) {
        let mut out = Vec::with_capacity(self.segments.len());
        for mut seg in std::mem::take(&mut self.segments) {
            for w in &mut seg.words {
                w.speaker = speaker_at(w.start, w.end).map(speaker_name);
            }
            let translated = seg.translation.is_some() || seg.translation_failure.is_some();
            let runs = runs_by(&seg.words, |w| w.speaker.clone());
            if runs.len() <= 1 || translated {
                seg.speaker = most(seg.words.iter().filter_map(|w| w.speaker.clone()))
                    .or_else(|| speaker_at(seg.start, seg.end).map(speaker_name));
                out.push(seg);
                continue;
            }
            for run in runs {
                let words = seg.words[run].to_vec();
                let text: String = words.iter().map(|w| w.word.as_str()).collect();
                out.push(Segment {
                    id: 0,
                    start: words.first().map_or(seg.start, |w| w.start),
                    end: words.last().map_or(seg.end, |w| w.end),
                    text,
                    decoding: None,
                    no_speech_prob: seg.no_speech_prob,
                    speaker: words.first().and_then(|w| w.speaker.clone()),
                    words,
                    translation: None,
                    translation_failure: None,
                });
            }
        }
        for (i, s) in out.iter_mut().enumerate() {
            s.id = i;
        }
        self.segments = out;
    }

    /// The whole text, translated when a translation was asked for.
    pub fn text(&self) -> String {
        let unspaced = matches!(self.target_language.as_deref(), Some("zh" | "ja" | "th"));
        self.segments
            .iter()
            .map(|s| s.display_text().trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
            .join(if unspaced { "" } else { " " })
    }

    /// Renders the transcript in `format`.
    pub fn render(&self, format: Format) -> String {
        let shown = || {
            self.segments
                .iter()
                .filter(|s| !cue_text(&s.display_text()).is_empty())
        };
        match format {
            Format::Text => {
                let mut out = shown()
                    .map(|s| format!("{}{}", prefix(s), s.display_text().trim()))
                    .collect::<Vec<_>>()
                    .join("\n");
                out.push('\n');
                out
            }
            Format::Json => serde_json::json!({
                "text": self.text(),
                "language": self.target_language.as_deref().unwrap_or(&self.language),
                "duration": self.duration,
                "segments": self.segments.iter().map(|s| {
                    let mut v = serde_json::json!({
                        "id": s.id, "start": s.start, "end": s.end, "text": s.display_text().trim(),
                    });
                    if let Some(who) = &s.speaker {
                        v["speaker"] = who.clone().into();
                    }
                    v
                }).collect::<Vec<_>>(),
            })
            .to_string(),
            Format::VerboseJson => {
                let words: Vec<&Word> = self.segments.iter().flat_map(|s| &s.words).collect();
                let mut v = serde_json::json!({
                    "task": self.task,
                    "language": self.language,
                    "duration": self.duration,
                    "text": self.text(),
                    "segments": self.segments,
                });
                if let Some(t) = &self.target_language {
                    v["target_language"] = t.clone().into();
                }
                if !words.is_empty() {
                    v["words"] = serde_json::to_value(words).unwrap_or_default();
                }
                v.to_string()
            }
            Format::Srt => shown()
                .enumerate()
                .map(|(n, s)| {
                    format!(
                        "{}\n{} --> {}\n{}{}\n\n",
                        n + 1,
                        timestamp(s.start, ','),
                        timestamp(s.end, ','),
                        prefix(s),
                        cue_text(&s.display_text())
                    )
                })
                .collect(),
            Format::Vtt => {
                let mut out = String::from("WEBVTT\n\n");
                for s in shown() {
                    // A voice span names the speaker (`<v Speaker 1>`); the
                    // cue text is escaped as WebVTT requires inside one.
                    let text = cue_text(&s.display_text());
                    let text = match &s.speaker {
                        Some(who) => format!("<v {}>{}", vtt_escape(who), vtt_escape(&text)),
                        None => text,
                    };
                    out.push_str(&format!(
                        "{} --> {}\n{text}\n\n",
                        timestamp(s.start, '.'),
                        timestamp(s.end, '.'),
                    ));
                }
                out
            }
        }
    }
}

/// `Speaker 1: ` before a diarized segment in text and SubRip.
fn prefix(s: &Segment) -> String {
    s.speaker
        .as_deref()
        .map(|w| format!("{w}: "))
        .unwrap_or_default()
}

fn vtt_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Index ranges of consecutive `items` with one `key`: where a diarized
/// transcript (or a recognition result) is split between speakers.
pub fn runs_by<T, K: PartialEq>(items: &[T], key: impl Fn(&T) -> K) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, it) in items.iter().enumerate() {
        match runs.last_mut() {
            Some(r) if key(&items[r.start]) == key(it) => r.end = i + 1,
            _ => runs.push(i..i + 1),
        }
    }
    runs
}

/// The most frequent of `items` (a segment's speaker is its words' most
/// frequent one).
pub fn most<T: PartialEq>(items: impl IntoIterator<Item = T>) -> Option<T> {
    let mut counts: Vec<(T, usize)> = Vec::new();
    for it in items {
        match counts.iter_mut().find(|(n, _)| *n == it) {
            Some((_, c)) => *c += 1,
            None => counts.push((it, 1)),
        }
    }
    counts.into_iter().max_by_key(|(_, c)| *c).map(|(n, _)| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Transcript {
        let seg = |id, start, end, text: &str| Segment {
            id,
            start,
            end,
            text: text.into(),
            decoding: Some(Decoding {
                tokens: vec![50364, 1037],
                temperature: 0.0,
                avg_logprob: -0.2,
                compression_ratio: 1.1,
            }),
            no_speech_prob: Some(0.01),
            words: vec![],
            translation: None,
            translation_failure: None,
            speaker: None,
        };
        let mut t = Transcript {
            task: "transcribe".into(),
            language: "en".into(),
            duration: 3725.5,
            segments: vec![
                seg(0, 0.0, 2.5, " Go forward."),
                seg(1, 3661.042, 3662.0, " Ten --> meters\n\nnow"),
            ],
            target_language: None,
        };
        t.segments[0].words = vec![Word {
            word: " Go".into(),
            start: 0.0,
            end: 0.4,
            probability: 0.9,
            speaker: None,
        }];
        t
    }

    #[test]
    fn srt_and_vtt_cues() {
        let t = sample();
        assert_eq!(
            t.render(Format::Srt),
            "1\n00:00:00,000 --> 00:00:02,500\nGo forward.\n\n2\n01:01:01,042 --> 01:01:02,000\nTen -> meters now\n\n"
        );
        assert_eq!(
            t.render(Format::Vtt),
            "WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nGo forward.\n\n01:01:01.042 --> 01:01:02.000\nTen -> meters now\n\n"
        );
    }

    #[test]
    fn format_names_parse_and_serialise() {
        for (name, camel, f) in [
            ("text", "text", Format::Text),
            ("json", "json", Format::Json),
            ("verbose_json", "verboseJson", Format::VerboseJson),
            ("srt", "srt", Format::Srt),
            ("vtt", "vtt", Format::Vtt),
        ] {
            assert_eq!(name.parse::<Format>().unwrap(), f);
            assert_eq!(serde_json::to_value(f).unwrap(), camel);
            assert_eq!(serde_json::from_value::<Format>(camel.into()).unwrap(), f);
        }
        assert!("docx".parse::<Format>().is_err());
    }

    #[test]
    fn json_shapes() {
        let t = sample();
        let j: serde_json::Value = serde_json::from_str(&t.render(Format::Json)).unwrap();
        assert_eq!(j["text"], "Go forward. Ten --> meters\n\nnow");
        let v: serde_json::Value = serde_json::from_str(&t.render(Format::VerboseJson)).unwrap();
        assert_eq!(v["task"], "transcribe");
        assert_eq!(v["segments"][0]["avg_logprob"], -0.2);
        assert_eq!(v["segments"][0]["tokens"][1], 1037);
        // Unknown figures are left out, not written as zeros; and read back.
        let mut t2 = t.clone();
        t2.segments[0].decoding = None;
        let v: serde_json::Value = serde_json::from_str(&t2.render(Format::VerboseJson)).unwrap();
        assert!(v["segments"][0].get("avg_logprob").is_none(), "{v}");
        assert!(v["segments"][0].get("temperature").is_none(), "{v}");
        assert_eq!(v["segments"][1]["compression_ratio"], 1.1);
        let back: Transcript = serde_json::from_str(&t2.render(Format::VerboseJson)).unwrap();
        assert_eq!(back.segments[0].decoding, None);
        assert_eq!(back.segments[1].decoding, t.segments[1].decoding);
        assert_eq!(v["words"][0]["word"], " Go");
        assert_eq!(
            t.render(Format::Text),
            "Go forward.\nTen --> meters\n\nnow\n"
        );
        assert!(
            "yaml"
                .parse::<Format>()
                .unwrap_err()
                .to_string()
                .contains("use text, json")
        );
    }

    #[test]
    fn translations_are_shown_where_present() {
        let mut t = sample();
        t.target_language = Some("zh".into());
        t.segments[0].translation = Some("向前走。".into());
        t.segments[1].translation = Some("十米".into());
        assert!(t.render(Format::Srt).contains("\n向前走。\n"));
        assert_eq!(t.text(), "向前走。十米");
        let v: serde_json::Value = serde_json::from_str(&t.render(Format::VerboseJson)).unwrap();
        assert_eq!(v["segments"][0]["text"], " Go forward.");
        assert_eq!(v["segments"][0]["translation"], "向前走。");
    }

    #[test]
    fn speakers_split_segments_at_word_boundaries_and_show_in_every_format() {
        let w = |word: &str, start: f64, end: f64| Word {
            word: word.into(),
            start,
            end,
            probability: 0.9,
            speaker: None,
        };
        let mut t = sample();
        t.segments[0].words = vec![
            w(" Go", 0.0, 0.4),
            w(" forward.", 0.5, 1.0),
            w(" Yes.", 1.6, 2.4),
        ];
        // Speaker 0 until 1.2 s, then speaker 1.
        t.apply_speakers(|s, e| Some(usize::from((s + e) / 2.0 > 1.2)));
        assert_eq!(t.segments.len(), 3);
        assert_eq!(t.segments[0].text, " Go forward.");
        assert_eq!((t.segments[0].start, t.segments[0].end), (0.0, 1.0));
        assert_eq!(t.segments[0].decoding, None);
        assert_eq!(t.segments[1].text, " Yes.");
        assert_eq!(t.segments[1].speaker.as_deref(), Some("Speaker 2"));
        assert_eq!(t.segments[1].words[0].speaker.as_deref(), Some("Speaker 2"));
        // No words: the segment's span decides.
        assert_eq!(t.segments[2].speaker.as_deref(), Some("Speaker 2"));
        assert_eq!(
            t.segments.iter().map(|s| s.id).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert!(
            t.render(Format::Text)
                .starts_with("Speaker 1: Go forward.\nSpeaker 2: Yes.\n")
        );
        assert!(
            t.render(Format::Srt)
                .contains("00:00:01,000\nSpeaker 1: Go forward.\n")
        );
        let vtt = t.render(Format::Vtt);
        assert!(
            vtt.contains("00:00:01.600 --> 00:00:02.400\n<v Speaker 2>Yes.\n"),
            "{vtt}"
        );
        assert!(vtt.contains("<v Speaker 2>Ten -&gt; meters now"), "{vtt}");
        let j: serde_json::Value = serde_json::from_str(&t.render(Format::Json)).unwrap();
        assert_eq!(j["segments"][0]["speaker"], "Speaker 1");
        let v: serde_json::Value = serde_json::from_str(&t.render(Format::VerboseJson)).unwrap();
        assert_eq!(v["segments"][1]["speaker"], "Speaker 2");
        assert_eq!(v["words"][2]["speaker"], "Speaker 2");
        // Undiarized output is unchanged: no speaker fields, no prefixes.
        let plain = sample();
        let v: serde_json::Value =
            serde_json::from_str(&plain.render(Format::VerboseJson)).unwrap();
        assert!(v["segments"][0].get("speaker").is_none());
        assert!(!plain.render(Format::Vtt).contains("<v "));
    }
}
