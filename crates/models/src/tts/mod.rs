//! Text to speech: a real English voice (Piper's VITS `en_US-joe-medium`,
//! [`piper`]) with espeak-ng phonemes ([`phonemes`]).

pub mod phonemes;
pub mod piper;

pub use phonemes::{Sentence, phonemize, sentences};
pub use piper::{PiperVoice, Synthesis, SynthesisOptions};
