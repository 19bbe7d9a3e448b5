//! The GE2E speaker encoder's frontend: librosa's `melspectrogram` as
//! Resemblyzer calls it on 16 kHz audio (25 ms periodic-Hann frames every
//! 10 ms, centred with zero padding, power spectrum, 40 Slaney mel bins).
//! Not a log-mel: the encoder was trained on power, so loudness matters and
//! callers normalise it first ([`normalize_volume`]).

use std::sync::Arc;

use realfft::{RealFftPlanner, RealToComplex};

use crate::error::{ModelError, Result};
use crate::mel::{Filter, mel_filter_bank, periodic_hann, sparse_filters};

/// Sample rate the encoder expects.
pub const SAMPLE_RATE: u32 = 16_000;
/// FFT size (25 ms).
pub const N_FFT: usize = 400;
/// Hop between frames (10 ms).
pub const HOP: usize = 160;
/// Mel bins.
pub const N_MELS: usize = 40;
const N_FREQ: usize = N_FFT / 2 + 1;

/// Level the reference raises quiet audio to before embedding (dBFS).
pub const TARGET_DBFS: f32 = -30.0;

/// Raises `samples` to [`TARGET_DBFS`] RMS when they are quieter (never
/// lowers them), as Resemblyzer's `normalize_volume(..., increase_only=True)`.
/// Silence stays silence.
pub fn normalize_volume(samples: &mut [f32]) {
    let gain = volume_gain(
        samples.len(),
        samples.iter().map(|x| f64::from(*x).powi(2)).sum(),
    );
    if gain != 1.0 {
        for x in samples {
            *x *= gain;
        }
    }
}

/// The gain [`normalize_volume`] applies to `n` samples whose squares sum
/// to `sum_sq` (so callers can measure audio in pieces without copying it).
pub fn volume_gain(n: usize, sum_sq: f64) -> f32 {
    if n == 0 || sum_sq <= 0.0 {
        return 1.0;
    }
    let int16_max = 32767f64;
    let rms = (sum_sq * int16_max * int16_max / n as f64).sqrt();
    let dbfs = 20.0 * (rms / int16_max).log10();
    let change = f64::from(TARGET_DBFS) - dbfs;
    if change <= 0.0 {
        return 1.0;
    }
    10f64.powf(change / 20.0) as f32
}

/// Computes the encoder's mel frames; build once, share freely.
#[derive(Clone)]
pub struct SpeakerMel {
    filters: Vec<Filter>,
    window: Vec<f32>,
    fft: Arc<dyn RealToComplex<f32>>,
}

impl std::fmt::Debug for SpeakerMel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpeakerMel").finish_non_exhaustive()
    }
}

impl Default for SpeakerMel {
    fn default() -> Self {
        Self::new()
    }
}

impl SpeakerMel {
    /// The frontend (filters and window computed here).
    pub fn new() -> Self {
        let filters = sparse_filters(&mel_filter_bank(SAMPLE_RATE, N_FFT, N_MELS));
        // scipy's `get_window("hann", N_FFT)`: periodic.
        let window = periodic_hann(N_FFT);
        let fft = RealFftPlanner::<f32>::new().plan_fft_forward(N_FFT);
        Self {
            filters,
            window,
            fft,
        }
    }

    /// Frames for `n` samples: one every hop, centred (`1 + n / HOP`).
    pub fn frames_for(n: usize) -> usize {
        1 + n / HOP
    }

    /// Mel power frames of `samples`, frame-major: `out[t * N_MELS + m]`.
    pub fn compute(&self, samples: &[f32]) -> Result<Vec<f32>> {
        if samples.is_empty() {
            return Err(ModelError::Input(
                "no audio to take a mel spectrogram of".into(),
            ));
        }
        let frames = Self::frames_for(samples.len());
        let half = (N_FFT / 2) as isize;
        let mut input = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut power = vec![0f32; N_FREQ];
        let mut out = vec![0f32; frames * N_MELS];
        for t in 0..frames {
            let start = (t * HOP) as isize - half;
            for (k, (x, w)) in input.iter_mut().zip(&self.window).enumerate() {
                let i = start + k as isize;
                // Zero padding outside the signal (librosa >= 0.10's default).
                let s = if i < 0 {
                    0.0
                } else {
                    samples.get(i as usize).copied().unwrap_or(0.0)
                };
                *x = s * w;
            }
            self.fft
                .process_with_scratch(&mut input, &mut spectrum, &mut scratch)
                .map_err(|e| ModelError::Input(format!("fft: {e}")))?;
            for (p, c) in power.iter_mut().zip(&spectrum) {
                *p = c.norm_sqr();
            }
            let row = &mut out[t * N_MELS..(t + 1) * N_MELS];
            for (o, f) in row.iter_mut().zip(&self.filters) {
                *o = f.apply(&power);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_count_follows_centred_framing() {
        let mel = SpeakerMel::new();
        let out = mel.compute(&[0.1; 16_000]).unwrap();
        assert_eq!(out.len(), 101 * N_MELS);
        assert!(mel.compute(&[]).is_err());
    }

    #[test]
    fn a_tone_lands_in_one_band() {
        let mel = SpeakerMel::new();
        let tone: Vec<f32> = (0..8000)
            .map(|i| (2.0 * std::f32::consts::PI * 500.0 * i as f32 / 16_000.0).sin() * 0.1)
            .collect();
        let out = mel.compute(&tone).unwrap();
        let mid = &out[25 * N_MELS..26 * N_MELS];
        let peak = (0..N_MELS)
            .max_by(|a, b| mid[*a].total_cmp(&mid[*b]))
            .unwrap();
        // 500 Hz is below 1 kHz, where Slaney's scale is linear (66.7 Hz per mel);
        // 40 bins up to 8 kHz put it in the 7th or 8th band.
        assert!((6..=8).contains(&peak), "peak band {peak}");
    }

    #[test]
    fn volume_is_raised_never_lowered() {
        let mut quiet = vec![0.001f32; 100];
        normalize_volume(&mut quiet);
        let rms = (quiet.iter().map(|x| x * x).sum::<f32>() / 100.0).sqrt();
        assert!((20.0 * rms.log10() - TARGET_DBFS).abs() < 0.1, "{rms}");
        let mut loud = vec![0.5f32; 100];
        normalize_volume(&mut loud);
        assert_eq!(loud[0], 0.5);
        let mut silent = vec![0.0f32; 100];
        normalize_volume(&mut silent);
        assert_eq!(silent[0], 0.0);
    }
}
