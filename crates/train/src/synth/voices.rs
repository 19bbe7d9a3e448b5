//! Every voice at hand: Piper's `en_US-joe-medium` (a neural voice) and
//! espeak-ng's English dialects, each with its variants (male and female
//! timbres). A rendition picks a voice, a speed and a pitch and returns
//! 16 kHz samples.

use std::process::Command;

use nexus_models::tts::{PiperVoice, SynthesisOptions, sentences};

use crate::error::{Result, TrainError};

/// espeak-ng's English dialects.
pub const ESPEAK_DIALECTS: [&str; 7] = [
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
];
/// espeak-ng's voice variants (`""` is the dialect's own).
pub const ESPEAK_VARIANTS: [&str; 13] = [
    "", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
];

/// The model's sample rate.
pub const RATE: u32 = 16_000;

/// Every espeak-ng voice: dialect × variant, `en-gb+f3` style.
pub fn espeak_voices() -> Vec<String> {
    ESPEAK_DIALECTS
        .iter()
        .flat_map(|d| {
            ESPEAK_VARIANTS.iter().map(move |v| {
                if v.is_empty() {
                    (*d).to_string()
                } else {
                    format!("{d}+{v}")
                }
            })
        })
        .collect()
}

/// How one utterance is spoken.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Rendition {
    /// `piper:en_US-joe-medium` or `espeak:en-gb+f3`.
    pub voice: String,
    /// Speaking rate relative to the voice's own (1 = as trained).
    pub speed: f32,
    /// Pitch relative to the voice's own (1 = as trained).
    pub pitch: f32,
}

/// The voices a run speaks with.
pub struct Voices {
    piper: Option<(String, PiperVoice)>,
    espeak: Vec<String>,
}

impl std::fmt::Debug for Voices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Voices")
            .field("piper", &self.piper.as_ref().map(|p| &p.0))
            .field("espeak", &self.espeak.len())
            .finish()
    }
}

impl Voices {
    /// Piper's voice (named) when given, and these espeak-ng voices.
    pub fn new(piper: Option<(String, PiperVoice)>, espeak: Vec<String>) -> Result<Self> {
        if piper.is_none() && espeak.is_empty() {
            return Err(TrainError::Config("voices: none given".into()));
        }
        Ok(Self { piper, espeak })
    }

    /// Every voice's name, Piper's first.
    pub fn names(&self) -> Vec<String> {
        self.piper
            .iter()
            .map(|(n, _)| format!("piper:{n}"))
            .chain(self.espeak.iter().map(|v| format!("espeak:{v}")))
            .collect()
    }

    /// A voice drawn from `rng`: Piper's with chance `piper_share` (always
    /// when there is no other), else one of espeak-ng's, uniformly.
    pub fn choose(&self, rng: &mut crate::rng::Rng, piper_share: f32) -> String {
        match &self.piper {
            Some((name, _)) if self.espeak.is_empty() || rng.chance(piper_share) => {
                format!("piper:{name}")
            }
            _ => format!("espeak:{}", self.espeak[rng.below(self.espeak.len())]),
        }
    }

    /// How many voices there are.
    pub fn len(&self) -> usize {
        usize::from(self.piper.is_some()) + self.espeak.len()
    }

    /// Whether there is none (never, once built).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Speaks `text` as `r` says, at 16 kHz; `seed` drives Piper's sampling noise.
    pub fn render(&self, text: &str, r: &Rendition, seed: u64) -> Result<Vec<f32>> {
        if let Some(name) = r.voice.strip_prefix("piper:") {
            let Some((_, voice)) = self.piper.as_ref().filter(|(n, _)| n == name) else {
                return Err(TrainError::Config(format!(
                    "voice {:?} is not loaded",
                    r.voice
                )));
            };
            piper(voice, text, r, seed)
        } else if let Some(name) = r.voice.strip_prefix("espeak:") {
            espeak(name, text, r)
        } else {
            Err(TrainError::Config(format!(
                "voice {:?}: unknown kind",
                r.voice
            )))
        }
    }
}

/// Piper: the duration scale sets the speed; playing the result at a rate
/// `pitch` times its own raises the pitch, and the longer durations made
/// beforehand keep the speed.
fn piper(voice: &PiperVoice, text: &str, r: &Rendition, seed: u64) -> Result<Vec<f32>> {
    let own = voice.default_options();
    let opts = SynthesisOptions {
        length_scale: own.length_scale * r.pitch / r.speed,
        seed,
        ..own
    };
    let mut samples = Vec::new();
    for s in sentences(text) {
        if !samples.is_empty() {
            samples.extend(std::iter::repeat_n(0.0, voice.sentence_gap()));
        }
        samples.extend(voice.synthesize_sentence(&s, &opts)?);
    }
    if samples.is_empty() {
        return Err(TrainError::Synthesis(format!(
            "Piper said nothing for {text:?}"
        )));
    }
    let from = (voice.sample_rate() as f32 * r.pitch).round() as u32;
    Ok(nexus_audio::resample(&[samples], from, RATE)?.remove(0))
}

/// espeak-ng at `175 × speed` words a minute and pitch `50 × pitch` (of 0–99).
fn espeak(name: &str, text: &str, r: &Rendition) -> Result<Vec<f32>> {
    let wpm = (175.0 * r.speed).round().clamp(80.0, 450.0) as u32;
    let pitch = (50.0 * r.pitch).round().clamp(0.0, 99.0) as u32;
    let out = Command::new("espeak-ng")
        .args([
            "-v",
            name,
            "-s",
            &wpm.to_string(),
            "-p",
            &pitch.to_string(),
            "--stdout",
        ])
        .arg(text)
        .output()
        .map_err(|e| {
            TrainError::Synthesis(format!(
                "running espeak-ng: {e}; install the espeak-ng package"
            ))
        })?;
    if !out.status.success() {
        return Err(TrainError::Synthesis(format!(
            "espeak-ng -v {name} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let (rate, samples) = wav_pcm16(&out.stdout)?;
    if samples.is_empty() {
        return Err(TrainError::Synthesis(format!(
            "espeak-ng -v {name} said nothing for {text:?}"
        )));
    }
    Ok(nexus_audio::resample(&[samples], rate, RATE)?.remove(0))
}

/// Rate and samples of a mono 16-bit WAV as espeak-ng streams it (its
/// data chunk may claim any length: everything after its header is data).
fn wav_pcm16(b: &[u8]) -> Result<(u32, Vec<f32>)> {
    let bad = |why: &str| TrainError::Synthesis(format!("espeak-ng's WAV: {why}"));
    if b.len() < 12 || &b[..4] != b"RIFF" || &b[8..12] != b"WAVE" {
        return Err(bad("no RIFF/WAVE header"));
    }
    let mut at = 12;
    let mut rate = None;
    while at + 8 <= b.len() {
        let id = &b[at..at + 4];
        let len = u32::from_le_bytes([b[at + 4], b[at + 5], b[at + 6], b[at + 7]]) as usize;
        let body = at + 8;
        if id == b"fmt " {
            if body + 16 > b.len() {
                return Err(bad("short fmt chunk"));
            }
            let channels = u16::from_le_bytes([b[body + 2], b[body + 3]]);
            let bits = u16::from_le_bytes([b[body + 14], b[body + 15]]);
            if channels != 1 || bits != 16 {
                return Err(bad(&format!(
                    "{channels} channels of {bits} bits, expected mono 16-bit"
                )));
            }
            rate = Some(u32::from_le_bytes([
                b[body + 4],
                b[body + 5],
                b[body + 6],
                b[body + 7],
            ]));
        } else if id == b"data" {
            let rate = rate.ok_or_else(|| bad("data before fmt"))?;
            let end = body.saturating_add(len).min(b.len());
            let samples = b[body..end]
                .chunks_exact(2)
                .map(|c| f32::from(i16::from_le_bytes([c[0], c[1]])) / 32768.0)
                .collect();
            return Ok((rate, samples));
        }
        at = body.saturating_add(len + (len & 1));
    }
    Err(bad("no data chunk"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dialect_and_variant_is_a_voice() {
        let v = espeak_voices();
        assert_eq!(v.len(), 91);
        assert!(v.contains(&"en-gb-scotland+f3".to_string()));
        assert!(v.contains(&"en-us".to_string()));
    }

    #[test]
    fn wav_parser_reads_a_stream_header_and_rejects_others() {
        let mut w = nexus_audio::wav::encode_pcm16(&[vec![0.5, -0.25, 0.0]], 22_050);
        let (rate, s) = wav_pcm16(&w).unwrap();
        assert_eq!(rate, 22_050);
        assert_eq!(s.len(), 3);
        assert!((s[0] - 0.5).abs() < 1e-4 && (s[1] + 0.25).abs() < 1e-4);
        // A streamed header claims more data than follows.
        let n = w.len();
        w[n - 10..n - 6].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(wav_pcm16(&w).is_ok());
        let stereo = nexus_audio::wav::encode_pcm16(&[vec![0.0], vec![0.0]], 8_000);
        assert!(
            wav_pcm16(&stereo)
                .unwrap_err()
                .to_string()
                .contains("2 channels")
        );
        assert!(wav_pcm16(b"not a wav").is_err());
    }

    #[test]
    fn espeak_speaks_at_the_model_rate_and_speed_changes_length() {
        let voices = Voices::new(None, espeak_voices()).unwrap();
        let r = |speed, pitch| Rendition {
            voice: "espeak:en-gb+f3".into(),
            speed,
            pitch,
        };
        let text = "The quick brown fox jumps over the lazy dog.";
        let a = voices.render(text, &r(1.0, 1.0), 0).unwrap();
        let again = voices.render(text, &r(1.0, 1.0), 0).unwrap();
        assert_eq!(a, again, "espeak-ng is deterministic");
        let fast = voices.render(text, &r(1.5, 1.0), 0).unwrap();
        let secs = |s: &[f32]| s.len() as f32 / RATE as f32;
        assert!(secs(&a) > 1.5 && secs(&a) < 5.0, "{}", secs(&a));
        assert!(
            secs(&fast) < 0.8 * secs(&a),
            "{} vs {}",
            secs(&fast),
            secs(&a)
        );
        let high = voices.render(text, &r(1.0, 1.4), 0).unwrap();
        assert_ne!(high, a);
        let err = voices
            .render(
                text,
                &Rendition {
                    voice: "piper:x".into(),
                    speed: 1.0,
                    pitch: 1.0,
                },
                0,
            )
            .unwrap_err();
        assert!(err.to_string().contains("not loaded"), "{err}");
    }
}
