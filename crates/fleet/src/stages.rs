//! Stream, group and pool names of the fleet's stages.

use nexus_bus::Keys;

/// Work stream of segmented audio, read by encoders.
pub const AUDIO: &str = "audio";
/// Work stream of encoder features, read by decoders.
pub const ENCODED: &str = "encoded";
/// Work stream of text translation requests, read by decoders with a translation model.
pub const TRANSLATE: &str = "translate";
/// Work stream of speech codes (NEXUS-O audio decoder output), read by vocoders with a codec.
pub const CODES: &str = "codes";
/// Work stream of speech synthesis requests, read by vocoders.
pub const SYNTHESIZE: &str = "synthesize";
/// Consumer group of the vocoder replicas.
pub const VOCODER_GROUP: &str = "vocoder";
pub use nexus_bus::jobs::{JOB_GROUP, JOBS, JOBS_URGENT};
/// Consumer group of the encoder replicas.
pub const ENCODER_GROUP: &str = "encoder";
/// Consumer group of the decoder replicas.
pub const DECODER_GROUP: &str = "decoder";
/// Capacity pool of live sessions, advertised by decoders and leased by ingest.
pub const DECODER_POOL: &str = "decoder";

/// What a window is for, in the order stages serve it (encoder batches,
/// decoder starts and finishing threads): someone waiting live comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Work {
    /// The final window of a live utterance: someone waits for its caption.
    LiveFinal,
    /// A live preview, superseded by the utterance's next window.
    Interim,
    /// A window of a whole recording (Recognize, uploads, jobs): wanted
    /// soon, by no one live.
    Recording,
}

impl Work {
    /// The work of a window that is final or not, of an entry marked live
    /// (`Envelope.live`) or not.
    pub fn of(is_final: bool, live: bool) -> Self {
        match (is_final, live) {
            (false, _) => Work::Interim,
            (true, true) => Work::LiveFinal,
            (true, false) => Work::Recording,
        }
    }
}

/// The stream of a stage (one partition for now; the key layout has room for more).
pub fn stream(keys: &Keys, stage: &str) -> String {
    keys.stage_stream(stage, 0)
}

/// Result-log key of one segment revision: a redelivered revision maps to the
/// same key, so it never lands twice.
pub fn result_key(segment: u64, revision: u32) -> String {
    format!("{segment}:{revision}")
}
