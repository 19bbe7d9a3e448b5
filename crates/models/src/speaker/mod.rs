//! Speakers: the GE2E voice encoder ([`encoder`], its frontend in [`mel`]),
//! clustering of voice embeddings ([`cluster`]) and who-spoke-when over a
//! recording's speech regions ([`diarize`]).

pub mod cluster;
pub mod diarize;
pub mod encoder;
pub mod mel;

pub use cluster::{MAX_SPEAKERS, OnlineClusters, SpeakerCount};
pub use diarize::{
    Diarization, DiarizeOptions, Diarizer, OnlineDiarizer, Turn, diarize, speaker_count,
};
pub use encoder::{EMBED_DIM, SpeakerEncoder};
