//! Bounds on every size and count a caller controls in a recognition config,
//! checked at the edge before any work is queued: each error names the field
//! and its limit.

use nexus_proto::speech::{RecognitionConfig, StreamingRecognitionConfig};
use tonic::Status;

/// Widest beam a request may ask for (the decoder refuses wider ones too).
pub use nexus_models::whisper::decode::MAX_BEAM_SIZE;
/// Longest `speech_context.prompt`, in characters. Whisper keeps at most the
/// last 223 prompt tokens; a prompt this long already overflows that.
pub const MAX_PROMPT_CHARS: usize = 2_000;
/// Most `speech_context.hotwords`.
pub const MAX_HOTWORDS: usize = 100;
/// Longest hotword, in characters.
pub const MAX_HOTWORD_CHARS: usize = 100;
/// Longest `speaker_label`, in characters.
pub const MAX_SPEAKER_LABEL_CHARS: usize = 128;

fn invalid(msg: String) -> Status {
    Status::invalid_argument(msg)
}

fn unit_interval(field: &str, v: f32) -> Result<(), Status> {
    if v.is_finite() && (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(invalid(format!("{field} is {v}; use a value in 0..=1")))
    }
}

/// Checks the sizes and numbers of a recognition config.
pub fn check_recognition(rc: &RecognitionConfig) -> Result<(), Status> {
    if rc.max_alternatives > 1 {
        return Err(invalid(format!(
            "max_alternatives is {}; results carry one alternative (use 0 or 1)",
            rc.max_alternatives
        )));
    }
    if let Some(d) = &rc.decoding {
        if d.beam_size > MAX_BEAM_SIZE {
            return Err(invalid(format!(
                "decoding.beam_size is {}; the limit is {MAX_BEAM_SIZE}",
                d.beam_size
            )));
        }
        unit_interval("decoding.temperature", d.temperature)?;
        unit_interval("decoding.no_speech_threshold", d.no_speech_threshold)?;
    }
    if let Some(c) = &rc.speech_context {
        let chars = c.prompt.chars().count();
        if chars > MAX_PROMPT_CHARS {
            return Err(invalid(format!(
                "speech_context.prompt is {chars} characters; the limit is {MAX_PROMPT_CHARS}"
            )));
        }
        if c.hotwords.len() > MAX_HOTWORDS {
            return Err(invalid(format!(
                "speech_context.hotwords has {} entries; the limit is {MAX_HOTWORDS}",
                c.hotwords.len()
            )));
        }
        if let Some((i, w)) = c
            .hotwords
            .iter()
            .enumerate()
            .find(|(_, w)| w.chars().count() > MAX_HOTWORD_CHARS)
        {
            return Err(invalid(format!(
                "speech_context.hotwords[{i}] is {} characters; the limit is {MAX_HOTWORD_CHARS}",
                w.chars().count()
            )));
        }
        if c.hotword_boost != 0.0 {
            return Err(invalid(format!(
                "speech_context.hotword_boost is {}; hotwords reach the model as prompt text, so no boost applies (leave it 0)",
                c.hotword_boost
            )));
        }
    }
    Ok(())
}

/// Checks the sizes of a streaming config beyond its recognition config.
pub fn check_streaming(cfg: &StreamingRecognitionConfig) -> Result<(), Status> {
    let chars = cfg.speaker_label.chars().count();
    if chars > MAX_SPEAKER_LABEL_CHARS {
        return Err(invalid(format!(
            "speaker_label is {chars} characters; the limit is {MAX_SPEAKER_LABEL_CHARS}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_proto::speech::{DecodingOptions, SpeechContext};

    fn rc(decoding: DecodingOptions, ctx: SpeechContext) -> RecognitionConfig {
        RecognitionConfig {
            decoding: Some(decoding),
            speech_context: Some(ctx),
            ..Default::default()
        }
    }

    #[test]
    fn each_bound_names_its_field_and_limit() {
        let ok = rc(
            DecodingOptions {
                beam_size: MAX_BEAM_SIZE,
                temperature: 0.4,
                ..Default::default()
            },
            SpeechContext {
                hotwords: vec!["Kubernetes".into(); MAX_HOTWORDS],
                prompt: "p".repeat(MAX_PROMPT_CHARS),
                ..Default::default()
            },
        );
        check_recognition(&ok).unwrap();
        let cases = [
            (
                rc(
                    DecodingOptions {
                        beam_size: 60_000,
                        ..Default::default()
                    },
                    SpeechContext::default(),
                ),
                "decoding.beam_size is 60000; the limit is 16",
            ),
            (
                rc(
                    DecodingOptions {
                        temperature: f32::NAN,
                        ..Default::default()
                    },
                    SpeechContext::default(),
                ),
                "decoding.temperature is NaN",
            ),
            (
                rc(
                    DecodingOptions::default(),
                    SpeechContext {
                        prompt: "é".repeat(MAX_PROMPT_CHARS + 1),
                        ..Default::default()
                    },
                ),
                "speech_context.prompt is 2001 characters; the limit is 2000",
            ),
            (
                rc(
                    DecodingOptions::default(),
                    SpeechContext {
                        hotwords: vec!["x".into(); MAX_HOTWORDS + 1],
                        ..Default::default()
                    },
                ),
                "speech_context.hotwords has 101 entries; the limit is 100",
            ),
            (
                rc(
                    DecodingOptions::default(),
                    SpeechContext {
                        hotwords: vec!["ok".into(), "y".repeat(101)],
                        ..Default::default()
                    },
                ),
                "speech_context.hotwords[1] is 101 characters",
            ),
            (
                rc(
                    DecodingOptions::default(),
                    SpeechContext {
                        hotword_boost: 5.0,
                        ..Default::default()
                    },
                ),
                "speech_context.hotword_boost is 5",
            ),
        ];
        for (c, want) in cases {
            let e = check_recognition(&c).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(want), "{} !~ {want}", e.message());
        }
        let e = check_streaming(&StreamingRecognitionConfig {
            speaker_label: "n".repeat(129),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.message().contains("the limit is 128"), "{}", e.message());
    }
}
