//! Speakers on whole-audio results: each word takes the speaker the
//! recording's diarization gives its time span, and a result whose words
//! change speaker is split there, so every result has one speaker.

use nexus_models::speaker::{Diarization, Turn};
use nexus_proto::speech::{
    SpeechRecognitionAlternative, SpeechRecognitionResult, StreamingRecognitionResult, TimeSpan,
};
use nexus_transcript::{most, runs_by, speaker_name};

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// Labels `results` with `per_channel[channel]`'s speakers (channel tag 0
/// and 1 both read the first) and splits them at speaker changes. A
/// translated result keeps its text whole (its translation has no word
/// times) and takes the speaker of most of its words.
pub(crate) fn label(
    results: Vec<SpeechRecognitionResult>,
    per_channel: &[Diarization],
) -> Vec<SpeechRecognitionResult> {
    let mut out = Vec::with_capacity(results.len());
    for mut r in results {
        let Some(who) = per_channel.get(r.channel_tag.saturating_sub(1) as usize) else {
            out.push(r);
            continue;
        };
        let span = r.span.unwrap_or_default();
        let Some(best) = r.alternatives.first_mut() else {
            out.push(r);
            continue;
        };
        for w in &mut best.words {
            w.speaker = who
                .speaker_at(secs(w.start_ms), secs(w.end_ms))
                .map(speaker_name)
                .unwrap_or_default();
        }
        let runs = runs_by(&best.words, |w| w.speaker.clone());
        if runs.len() <= 1 || r.translation.is_some() {
            r.speaker = most(
                best.words
                    .iter()
                    .map(|w| w.speaker.clone())
                    .filter(|s| !s.is_empty()),
            )
            .or_else(|| {
                who.speaker_at(secs(span.start_ms), secs(span.end_ms))
                    .map(speaker_name)
            })
            .unwrap_or_default();
            out.push(r);
            continue;
        }
        let words = std::mem::take(&mut best.words);
        let confidence = best.confidence;
        for run in runs {
            let part = words[run].to_vec();
            let transcript = part
                .iter()
                .map(|w| w.word.trim())
                .collect::<Vec<_>>()
                .join(" ");
            out.push(SpeechRecognitionResult {
                alternatives: vec![SpeechRecognitionAlternative {
                    transcript,
                    confidence,
                    words: part.clone(),
                }],
                channel_tag: r.channel_tag,
                language: r.language.clone(),
                span: Some(TimeSpan {
                    start_ms: part.first().map_or(span.start_ms, |w| w.start_ms),
                    end_ms: part.last().map_or(span.end_ms, |w| w.end_ms),
                }),
                translation: None,
                no_speech_probability: r.no_speech_probability,
                // The decoder's figures were for the whole segment.
                decoding: None,
                speaker: part.first().map(|w| w.speaker.clone()).unwrap_or_default(),
            });
        }
    }
    out
}

/// Labels one live final's words with the speakers of its `turns`
/// (stream seconds). The final is not split (its segment id is the
/// client's handle on it): it takes the speaker of most of its words, after
/// the session's own `speaker_label` when it has one ("Room 2 (Speaker 1)").
pub(crate) fn label_live(r: &mut StreamingRecognitionResult, turns: &[Turn]) {
    let who = Diarization {
        turns: turns.to_vec(),
        speakers: turns.iter().map(|t| t.speaker + 1).max().unwrap_or(0),
    };
    let span = r.span.unwrap_or_default();
    let mut heard = Vec::new();
    if let Some(best) = r.alternatives.first_mut() {
        for w in &mut best.words {
            let s = who.speaker_at(secs(w.start_ms), secs(w.end_ms));
            heard.extend(s);
            w.speaker = s.map(speaker_name).unwrap_or_default();
        }
    }
    let main = most(heard).or_else(|| who.speaker_at(secs(span.start_ms), secs(span.end_ms)));
    if let Some(s) = main {
        r.speaker = if r.speaker.is_empty() {
            speaker_name(s)
        } else {
            format!("{} ({})", r.speaker, speaker_name(s))
        };
    }
}

#[cfg(test)]
mod tests {
    use nexus_proto::speech::WordInfo;

    use super::*;

    fn word(w: &str, start_ms: u64, end_ms: u64) -> WordInfo {
        WordInfo {
            word: w.into(),
            start_ms,
            end_ms,
            confidence: 0.9,
            speaker: String::new(),
        }
    }

    #[test]
    fn results_split_where_words_change_speaker() {
        let who = Diarization {
            turns: vec![
                Turn {
                    start: 0.0,
                    end: 1.2,
                    speaker: 0,
                },
                Turn {
                    start: 1.4,
                    end: 3.0,
                    speaker: 1,
                },
            ],
            speakers: 2,
        };
        let r = SpeechRecognitionResult {
            alternatives: vec![SpeechRecognitionAlternative {
                transcript: "Go forward. Yes.".into(),
                confidence: 0.8,
                words: vec![
                    word(" Go", 0, 400),
                    word(" forward.", 500, 1000),
                    word(" Yes.", 1600, 2400),
                ],
            }],
            span: Some(TimeSpan {
                start_ms: 0,
                end_ms: 2500,
            }),
            ..Default::default()
        };
        let out = label(vec![r.clone()], std::slice::from_ref(&who));
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].alternatives[0].transcript, "Go forward.");
        assert_eq!(out[0].speaker, "Speaker 1");
        assert_eq!(out[1].speaker, "Speaker 2");
        assert_eq!(out[1].alternatives[0].words[0].speaker, "Speaker 2");
        assert_eq!(
            out[1].span,
            Some(TimeSpan {
                start_ms: 1600,
                end_ms: 2400
            })
        );
        // Translated: kept whole, the majority's speaker.
        let mut t = r;
        t.translation = Some(Default::default());
        let out = label(vec![t], std::slice::from_ref(&who));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].speaker, "Speaker 1");
    }

    #[test]
    fn a_live_final_keeps_one_result_and_names_its_speakers() {
        let turns = [
            Turn {
                start: 10.0,
                end: 11.0,
                speaker: 0,
            },
            Turn {
                start: 11.2,
                end: 13.0,
                speaker: 2,
            },
        ];
        let mut r = StreamingRecognitionResult {
            alternatives: vec![SpeechRecognitionAlternative {
                transcript: "a b c".into(),
                confidence: 0.9,
                words: vec![
                    word("a", 10_100, 10_500),
                    word("b", 11_300, 11_600),
                    word("c", 11_700, 12_000),
                ],
            }],
            is_final: true,
            speaker: "Room 2".into(),
            ..Default::default()
        };
        label_live(&mut r, &turns);
        let who: Vec<&str> = r.alternatives[0]
            .words
            .iter()
            .map(|w| w.speaker.as_str())
            .collect();
        assert_eq!(who, ["Speaker 1", "Speaker 3", "Speaker 3"]);
        assert_eq!(r.speaker, "Room 2 (Speaker 3)");
    }
}
