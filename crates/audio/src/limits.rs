//! Limits applied to every piece of audio before any work is spent on it.

use crate::error::{AudioError, Result};

/// What the fleet accepts. Checked on declaration (rate, channels) and while
/// audio arrives (bytes, duration), so an oversize upload is refused early.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioLimits {
    /// Longest accepted audio, in seconds.
    pub max_seconds: f64,
    /// Largest accepted encoded size, in bytes.
    pub max_bytes: u64,
    /// Most channels in one stream or file.
    pub max_channels: u32,
    /// Lowest accepted sample rate (telephone audio is 8 kHz).
    pub min_sample_rate: u32,
    /// Highest accepted sample rate.
    pub max_sample_rate: u32,
    /// Most samples a whole file may decode to at the model rate, all kept
    /// channels together: the memory budget of one decode (4 bytes a sample),
    /// enforced while decoding whatever the header claims.
    pub max_decoded_samples: u64,
}

impl Default for AudioLimits {
    fn default() -> Self {
        Self {
            max_seconds: 4.0 * 3600.0,
            max_bytes: 1 << 30,
            max_channels: 8,
            min_sample_rate: 8_000,
            max_sample_rate: 192_000,
            // Four hours of one channel at 16 kHz: 0.9 GB of f32.
            max_decoded_samples: 4 * 3600 * 16_000,
        }
    }
}

impl AudioLimits {
    /// The limits of a live stream: format bounds only. A live stream is bounded
    /// by its session's duration and pace, which the session checks on every
    /// encoding alike, never by the bytes or seconds of a whole upload.
    pub fn live(&self) -> Self {
        Self {
            max_seconds: f64::INFINITY,
            max_bytes: u64::MAX,
            max_decoded_samples: u64::MAX,
            ..self.clone()
        }
    }

    /// Checks a declared sample rate and channel count.
    pub fn check_format(&self, sample_rate: u32, channels: u32) -> Result<()> {
        if !(self.min_sample_rate..=self.max_sample_rate).contains(&sample_rate) {
            return Err(AudioError::SampleRate {
                rate: sample_rate,
                min: self.min_sample_rate,
                max: self.max_sample_rate,
            });
        }
        if channels == 0 || channels > self.max_channels {
            return Err(AudioError::Channels {
                channels,
                max: self.max_channels,
            });
        }
        Ok(())
    }

    /// Checks a running byte count.
    pub fn check_bytes(&self, bytes: u64) -> Result<()> {
        if bytes > self.max_bytes {
            return Err(AudioError::TooLarge {
                bytes,
                max_bytes: self.max_bytes,
            });
        }
        Ok(())
    }

    /// Checks a running count of samples decoded at the model rate.
    pub fn check_decoded(&self, samples: u64) -> Result<()> {
        if samples > self.max_decoded_samples {
            return Err(AudioError::DecodedTooLarge {
                samples,
                max_samples: self.max_decoded_samples,
            });
        }
        Ok(())
    }

    /// Checks a running duration given in frames at `sample_rate`.
    pub fn check_frames(&self, frames: u64, sample_rate: u32) -> Result<()> {
        let seconds = frames as f64 / f64::from(sample_rate.max(1));
        if seconds > self.max_seconds {
            return Err(AudioError::TooLong {
                seconds,
                max_seconds: self.max_seconds,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_violation_names_the_limit() {
        let l = AudioLimits::default();
        let e = l.check_format(4_000, 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sample rate 4000 Hz is not supported; use 8000..=192000 Hz"
        );
        let e = l.check_format(16_000, 9).unwrap_err();
        assert_eq!(e.to_string(), "9 channels is more than the limit of 8");
        assert!(matches!(
            l.check_format(16_000, 0),
            Err(AudioError::Channels { .. })
        ));
        let e = l.check_bytes((1 << 30) + 1).unwrap_err();
        assert!(
            e.to_string().contains("the limit is 1073741824 bytes"),
            "{e}"
        );
        let e = l
            .check_frames(16_000 * 4 * 3600 + 16_000, 16_000)
            .unwrap_err();
        assert!(e.to_string().contains("the limit is 14400.0 s"), "{e}");
        assert!(l.check_format(48_000, 2).is_ok());
        assert!(l.check_frames(16_000 * 60, 16_000).is_ok());
    }
}
