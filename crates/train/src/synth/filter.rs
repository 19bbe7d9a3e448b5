//! The quality filters of the paper's synthesis pipeline: length and energy
//! checks on the signal, then a round trip through a recogniser that must
//! read the text back within a word error rate.

use candle_core::Tensor;
use nexus_models::whisper::{DecodeOptions, Task, WhisperEngine};

use crate::error::Result;

/// The filters' thresholds.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Filters {
    /// Shortest utterance kept, seconds.
    pub min_seconds: f32,
    /// Longest utterance kept, seconds (the encoder sees 30 s at most).
    pub max_seconds: f32,
    /// Quietest speech kept, RMS dBFS.
    pub min_dbfs: f32,
    /// Largest fraction of clipped samples kept.
    pub max_clipped: f32,
    /// Largest word error rate of the round trip kept (0.2 is 20 %).
    pub max_wer: f64,
}

impl Default for Filters {
    fn default() -> Self {
        Self {
            min_seconds: 0.8,
            max_seconds: 20.0,
            min_dbfs: -45.0,
            max_clipped: 0.001,
            max_wer: 0.2,
        }
    }
}

/// Why a sample was dropped.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    /// Shorter than `min_seconds`.
    TooShort,
    /// Longer than `max_seconds`.
    TooLong,
    /// Quieter than `min_dbfs`.
    Quiet,
    /// More clipped samples than `max_clipped`.
    Clipped,
    /// The recogniser read back something else.
    RoundTrip,
    /// The synthesiser failed on the text.
    Unspeakable,
}

impl Rejection {
    /// The reason's name in manifests.
    pub fn name(self) -> &'static str {
        match self {
            Self::TooShort => "too_short",
            Self::TooLong => "too_long",
            Self::Quiet => "quiet",
            Self::Clipped => "clipped",
            Self::RoundTrip => "round_trip",
            Self::Unspeakable => "unspeakable",
        }
    }
}

impl Filters {
    /// The signal checks, cheapest first.
    pub fn check_signal(&self, samples: &[f32], rate: u32, clipped: f32) -> Option<Rejection> {
        let secs = samples.len() as f32 / rate as f32;
        if secs < self.min_seconds {
            Some(Rejection::TooShort)
        } else if secs > self.max_seconds {
            Some(Rejection::TooLong)
        } else if super::augment::rms_dbfs(samples) < self.min_dbfs {
            Some(Rejection::Quiet)
        } else if clipped > self.max_clipped {
            Some(Rejection::Clipped)
        } else {
            None
        }
    }

    /// The round trip's word error rate of `heard` against `text`
    /// (Whisper's English normalisation on both), and whether it fails.
    pub fn check_round_trip(&self, text: &str, heard: &str) -> (f64, Option<Rejection>) {
        let wer = nexus_eval::wer(text, heard).rate();
        (wer, (wer > self.max_wer).then_some(Rejection::RoundTrip))
    }
}

/// What a recogniser made of a sample.
#[derive(Debug)]
pub struct Heard {
    /// The text heard.
    pub text: String,
    /// The encoder's frames (n, d) from the start of the sample, when the
    /// recogniser is a Whisper encoder a NEXUS-O checkpoint may freeze:
    /// training on kept samples then needs no second pass.
    pub frames: Option<Tensor>,
}

/// What reads synthesised speech back.
pub trait Listener {
    /// What was heard in 16 kHz samples.
    fn hear(&mut self, samples: &[f32]) -> Result<Heard>;
}

/// Frames a recogniser keeps of `samples` samples: the 50-per-second
/// frames that cover them, rounded up to a multiple of 60 (so that any
/// adapter stack dividing 60 finds its covering groups), at most a window's.
pub fn frames_kept(samples: usize) -> usize {
    use nexus_models::mel::{CHUNK_SAMPLES, HOP_LENGTH};
    let window = CHUNK_SAMPLES / (2 * HOP_LENGTH);
    samples
        .div_ceil(2 * HOP_LENGTH)
        .max(1)
        .next_multiple_of(60)
        .min(window)
}

/// Whisper as the round trip's recogniser: one window (the 30 s a
/// NEXUS-O checkpoint encodes), English, greedy, no timestamps.
pub struct WhisperListener {
    engine: WhisperEngine,
    options: DecodeOptions,
}

impl std::fmt::Debug for WhisperListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhisperListener").finish_non_exhaustive()
    }
}

impl WhisperListener {
    /// Listens with `engine`.
    pub fn new(engine: WhisperEngine) -> Self {
        Self {
            engine,
            options: DecodeOptions {
                task: Task::Transcribe,
                language: Some("en".into()),
                temperature: 0.0,
                beam_size: 1,
                best_of: 1,
                without_timestamps: true,
                ..DecodeOptions::default()
            },
        }
    }
}

impl Listener for WhisperListener {
    fn hear(&mut self, samples: &[f32]) -> Result<Heard> {
        // The encoder's pass over the window, as `adapter::features`
        // computes it for training and a NEXUS-O checkpoint for serving.
        let enc = crate::adapter::features::encode_window(&self.engine, samples)?;
        let r = nexus_models::whisper::decode::decode(
            &self.engine.model,
            &self.engine.tokenizer,
            &enc,
            &self.options,
        )?;
        let n = frames_kept(samples.len().min(nexus_models::mel::CHUNK_SAMPLES));
        Ok(Heard {
            text: r.text.trim().to_string(),
            frames: Some(enc.squeeze(0)?.narrow(0, 0, n)?.contiguous()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_checks_name_their_reason() {
        let f = Filters::default();
        let speech: Vec<f32> = (0..32_000).map(|i| (i as f32 * 0.05).sin() * 0.1).collect();
        assert_eq!(f.check_signal(&speech, 16_000, 0.0), None);
        assert_eq!(
            f.check_signal(&speech[..8_000], 16_000, 0.0),
            Some(Rejection::TooShort)
        );
        let long = vec![0.1f32; 16_000 * 21];
        assert_eq!(f.check_signal(&long, 16_000, 0.0), Some(Rejection::TooLong));
        let quiet: Vec<f32> = speech.iter().map(|v| v * 1e-3).collect();
        assert_eq!(f.check_signal(&quiet, 16_000, 0.0), Some(Rejection::Quiet));
        assert_eq!(
            f.check_signal(&speech, 16_000, 0.01),
            Some(Rejection::Clipped)
        );
    }

    #[test]
    fn round_trip_uses_normalised_words() {
        let f = Filters::default();
        let (wer, r) = f.check_round_trip(
            "And the Lord said, Let there be light.",
            "and the lord said let there be light",
        );
        assert_eq!((wer, r), (0.0, None));
        let (wer, r) = f.check_round_trip("one two three four five", "one two tree four five");
        assert!((wer - 0.2).abs() < 1e-9 && r.is_none());
        let (_, r) = f.check_round_trip("one two three four five", "one too tree for five");
        assert_eq!(r, Some(Rejection::RoundTrip));
    }
}
