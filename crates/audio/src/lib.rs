//! Audio in for the fleet.
//!
//! Owns turning what users send into the fleet's canonical form: planar `f32`
//! samples per channel (then mono 16 kHz for the models), with every violated
//! limit reported as a typed [`AudioError`]. Opus (Ogg files and raw WebRTC
//! packets) goes through libopus. This crate has no async runtime:
//! services call it from their own tasks or threads.

pub mod decode;
pub mod endpoint;
pub mod energy_vad;
pub mod error;
pub mod limits;
pub mod ogg;
pub mod opus;
pub mod pcm;
pub mod resample;
pub mod wav;

pub use decode::{DecodedAudio, Layout, decode_bytes, decode_to_model_rate};
pub use endpoint::{EndReason, EndpointConfig, EndpointEvent, Endpointer};
pub use energy_vad::EnergyVad;
pub use error::{AudioError, Result};
pub use limits::AudioLimits;
pub use ogg::OggOpusStream;
pub use opus::OpusPacketDecoder;
pub use pcm::{PcmDecoder, PcmSpec, SampleFormat, downmix};
pub use resample::{StreamResampler, resample, to_model_rate};

/// The sample rate every model in the fleet consumes.
pub const MODEL_SAMPLE_RATE: u32 = 16_000;
