//! Recognition results as user-facing transcripts (text, JSON, SRT, WebVTT),
//! shared by the HTTP API and batch jobs.

use nexus_proto::speech::{RecognizeResponse, SpeechRecognitionResult, Task};
use nexus_transcript::{Segment, Transcript, Word};

fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// One recognition result as a transcript segment numbered `id`.
pub(crate) fn segment(id: usize, r: &SpeechRecognitionResult) -> Segment {
    let span = r.span.unwrap_or_default();
    let alt = r.alternatives.first().cloned().unwrap_or_default();
    Segment {
        id,
        start: seconds(span.start_ms),
        end: seconds(span.end_ms),
        text: format!(" {}", alt.transcript.trim()),
        decoding: r.decoding.as_ref().map(|d| nexus_transcript::Decoding {
            tokens: d.tokens.clone(),
            temperature: f64::from(d.temperature),
            avg_logprob: f64::from(d.avg_logprob),
            compression_ratio: f64::from(d.compression_ratio),
        }),
        no_speech_prob: r.no_speech_probability.map(f64::from),
        words: alt
            .words
            .iter()
            .map(|w| Word {
                word: format!(" {}", w.word.trim()),
                start: seconds(w.start_ms),
                end: seconds(w.end_ms),
                probability: f64::from(w.confidence),
                speaker: (!w.speaker.is_empty()).then(|| w.speaker.clone()),
            })
            .collect(),
        translation: r.translation.as_ref().map(|t| t.text.trim().to_owned()),
        translation_failure: r
            .translation
            .as_ref()
            .filter(|t| !t.failure.is_empty())
            .map(|t| t.failure.clone()),
        speaker: (!r.speaker.is_empty()).then(|| r.speaker.clone()),
    }
}

/// A whole recognition as a transcript.
pub(crate) fn transcript(resp: &RecognizeResponse, task: Task, target: Option<&str>) -> Transcript {
    let translated = task == Task::Translate;
    Transcript {
        task: if translated {
            "translate"
        } else {
            "transcribe"
        }
        .to_owned(),
        language: resp.language.clone(),
        duration: seconds(resp.audio_duration_ms),
        segments: resp
            .results
            .iter()
            .enumerate()
            .map(|(i, r)| segment(i, r))
            .collect(),
        target_language: translated.then(|| target.unwrap_or("en").to_owned()),
    }
}
