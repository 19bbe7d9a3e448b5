//! Audio errors. Each names the limit or the byte that is wrong, so the message
//! can go straight back to the caller.

/// Result with [`AudioError`].
pub type Result<T, E = AudioError> = std::result::Result<T, E>;

/// Why audio was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AudioError {
    /// The declared sample rate is outside what the fleet accepts.
    #[error("sample rate {rate} Hz is not supported; use {min}..={max} Hz")]
    SampleRate {
        /// Declared rate.
        rate: u32,
        /// Lowest accepted rate.
        min: u32,
        /// Highest accepted rate.
        max: u32,
    },
    /// Too many channels.
    #[error("{channels} channels is more than the limit of {max}")]
    Channels {
        /// Declared channel count.
        channels: u32,
        /// The limit.
        max: u32,
    },
    /// The audio is longer than allowed.
    #[error("audio is {seconds:.1} s long; the limit is {max_seconds:.1} s")]
    TooLong {
        /// Duration received so far.
        seconds: f64,
        /// The limit.
        max_seconds: f64,
    },
    /// A whole file decodes to more samples than one decode may hold.
    #[error(
        "the audio decodes to more than {max_samples} samples at 16 kHz (all channels together); the limit is {max_samples} samples (max_decoded_samples)"
    )]
    DecodedTooLarge {
        /// Samples decoded when the limit was crossed.
        samples: u64,
        /// The limit.
        max_samples: u64,
    },
    /// More bytes than allowed.
    #[error("audio is {bytes} bytes; the limit is {max_bytes} bytes")]
    TooLarge {
        /// Bytes received so far.
        bytes: u64,
        /// The limit.
        max_bytes: u64,
    },
    /// A stream ended in the middle of a sample frame.
    #[error(
        "PCM stream ended with {leftover} stray bytes; a frame is {frame_bytes} bytes ({channels} channels x {sample_bytes} bytes)"
    )]
    PartialFrame {
        /// Bytes left over.
        leftover: usize,
        /// Size of one frame.
        frame_bytes: usize,
        /// Channels per frame.
        channels: u32,
        /// Bytes per sample.
        sample_bytes: usize,
    },
    /// A float sample is NaN or infinite.
    #[error("sample {index} is not a finite number")]
    NonFinite {
        /// Index of the first bad sample (interleaved).
        index: usize,
    },
    /// The bytes are not a container or codec this build reads.
    #[error("unsupported audio: {0}")]
    Unsupported(String),
    /// The container or codec data is damaged.
    #[error("corrupt audio: {0}")]
    Corrupt(String),
    /// Resampling failed (a bug or an impossible rate pair).
    #[error("resampling {from} Hz to {to} Hz: {message}")]
    Resample {
        /// Input rate.
        from: u32,
        /// Output rate.
        to: u32,
        /// What went wrong.
        message: String,
    },
    /// No audio at all.
    #[error("the audio is empty")]
    Empty,
}
