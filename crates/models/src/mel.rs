//! Whisper's log-mel frontend: 25 ms periodic-Hann frames every 10 ms on 16 kHz
//! audio, power spectrum, Slaney-normalised mel filter bank (80 or 128 bins,
//! computed here rather than shipped), log10 floored 8 decades under the peak,
//! scaled to about [-1, 1].
//!
//! Matches OpenAI's `log_mel_spectrogram` (centred STFT with reflect padding,
//! last frame dropped) so the encoder sees the features it was trained on.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use realfft::{RealFftPlanner, RealToComplex};

use crate::error::{ModelError, Result};

/// Sample rate the frontend expects.
pub const SAMPLE_RATE: u32 = 16_000;
/// FFT size (25 ms).
pub const N_FFT: usize = 400;
/// Hop between frames (10 ms).
pub const HOP_LENGTH: usize = 160;
/// Frequency bins of one frame.
pub const N_FREQ: usize = N_FFT / 2 + 1;
/// Samples in one 30 s encoder window.
pub const CHUNK_SAMPLES: usize = 30 * SAMPLE_RATE as usize;
/// Frames in one 30 s encoder window.
pub const CHUNK_FRAMES: usize = CHUNK_SAMPLES / HOP_LENGTH;

/// A log-mel spectrogram, mel-major: `data[m * frames + t]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogMel {
    /// Mel bins.
    pub n_mels: usize,
    /// Time frames (10 ms each).
    pub frames: usize,
    /// Values, `n_mels * frames`.
    pub data: Vec<f32>,
}

impl LogMel {
    /// As a `(1, n_mels, frames)` tensor, the shape Whisper's encoder takes.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.data,
            (1, self.n_mels, self.frames),
            device,
        )?)
    }
}

/// The row of one mel filter: weights for the bins `start..start + weights.len()`.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    pub(crate) start: usize,
    pub(crate) weights: Vec<f32>,
}

impl Filter {
    /// The filter applied to one frame's power spectrum.
    pub(crate) fn apply(&self, power: &[f32]) -> f32 {
        self.weights
            .iter()
            .zip(&power[self.start..])
            .map(|(w, p)| w * p)
            .sum()
    }
}

/// The rows of a `n_mels x N_FREQ` filter bank without their zero ends.
pub(crate) fn sparse_filters(bank: &[f32]) -> Vec<Filter> {
    bank.chunks_exact(N_FREQ)
        .map(|row| {
            let start = row.iter().position(|w| *w != 0.0).unwrap_or(0);
            let end = row.iter().rposition(|w| *w != 0.0).map_or(start, |e| e + 1);
            Filter {
                start,
                weights: row[start..end].to_vec(),
            }
        })
        .collect()
}

/// A periodic Hann window of `n` points (torch's `hann_window(n)`, scipy's
/// `get_window("hann", n)`).
pub(crate) fn periodic_hann(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos()) as f32)
        .collect()
}

/// Computes log-mel spectrograms; build once, use from any thread.
#[derive(Clone)]
pub struct MelFrontend {
    n_mels: usize,
    filters: Vec<Filter>,
    window: Vec<f32>,
    fft: Arc<dyn RealToComplex<f32>>,
}

impl std::fmt::Debug for MelFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MelFrontend")
            .field("n_mels", &self.n_mels)
            .finish()
    }
}

impl MelFrontend {
    /// A frontend with `n_mels` bins (80 for Whisper up to v2, 128 for large-v3).
    pub fn new(n_mels: usize) -> Result<Self> {
        if !(1..=256).contains(&n_mels) {
            return Err(ModelError::Input(format!(
                "n_mels {n_mels} must be in 1..=256"
            )));
        }
        let filters = sparse_filters(&mel_filter_bank(SAMPLE_RATE, N_FFT, n_mels));
        // Periodic Hann, as torch.hann_window(N_FFT) builds it.
        let window = periodic_hann(N_FFT);
        let fft = RealFftPlanner::<f32>::new().plan_fft_forward(N_FFT);
        Ok(Self {
            n_mels,
            filters,
            window,
            fft,
        })
    }

    /// Mel bins this frontend produces.
    pub fn n_mels(&self) -> usize {
        self.n_mels
    }

    /// Log-mel of `samples` (16 kHz mono) followed by `pad_samples` zeros.
    /// Whisper transcribes with 30 s of padding so the last window is full and
    /// the floor is taken over the same extent as in training.
    pub fn compute(&self, samples: &[f32], pad_samples: usize) -> Result<LogMel> {
        let total = samples.len() + pad_samples;
        let half = N_FFT / 2;
        if total <= half {
            return Err(ModelError::Input(format!(
                "audio of {total} samples is too short for a log-mel frame; need more than {half}"
            )));
        }
        let frames = total / HOP_LENGTH;
        let at = |i: isize| -> f32 {
            // Reflect padding (no edge repeat) around [0, total).
            let n = total as isize;
            let j = if i < 0 {
                -i
            } else if i >= n {
                2 * (n - 1) - i
            } else {
                i
            } as usize;
            samples.get(j).copied().unwrap_or(0.0)
        };
        let mut power = vec![0f32; N_FREQ];
        let mut input = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut mel = vec![0f32; self.n_mels * frames];
        for t in 0..frames {
            let start = (t * HOP_LENGTH) as isize - half as isize;
            for (k, (x, w)) in input.iter_mut().zip(&self.window).enumerate() {
                *x = at(start + k as isize) * w;
            }
            self.fft
                .process_with_scratch(&mut input, &mut spectrum, &mut scratch)
                .map_err(|e| ModelError::Input(format!("fft: {e}")))?;
            for (p, c) in power.iter_mut().zip(&spectrum) {
                *p = c.norm_sqr();
            }
            for (m, f) in self.filters.iter().enumerate() {
                mel[m * frames + t] = f.apply(&power);
            }
        }
        let mut peak = f32::NEG_INFINITY;
        for v in &mut mel {
            *v = v.max(1e-10).log10();
            peak = peak.max(*v);
        }
        let floor = peak - 8.0;
        for v in &mut mel {
            *v = (v.max(floor) + 4.0) / 4.0;
        }
        Ok(LogMel {
            n_mels: self.n_mels,
            frames,
            data: mel,
        })
    }
}

fn hz_to_mel(hz: f64) -> f64 {
    // Slaney's scale: linear to 1 kHz, logarithmic above.
    let f_sp = 200.0 / 3.0;
    let min_log_hz = 1000.0;
    let min_log_mel = min_log_hz / f_sp;
    let logstep = 6.4f64.ln() / 27.0;
    if hz >= min_log_hz {
        min_log_mel + (hz / min_log_hz).ln() / logstep
    } else {
        hz / f_sp
    }
}

fn mel_to_hz(mel: f64) -> f64 {
    let f_sp = 200.0 / 3.0;
    let min_log_hz = 1000.0;
    let min_log_mel = min_log_hz / f_sp;
    let logstep = 6.4f64.ln() / 27.0;
    if mel >= min_log_mel {
        min_log_hz * (logstep * (mel - min_log_mel)).exp()
    } else {
        f_sp * mel
    }
}

/// Slaney-style triangular mel filters with area normalisation, `n_mels x (n_fft/2+1)`
/// row-major, covering 0 Hz to Nyquist.
pub fn mel_filter_bank(sample_rate: u32, n_fft: usize, n_mels: usize) -> Vec<f32> {
    mel_filter_bank_range(
        sample_rate,
        n_fft,
        n_mels,
        0.0,
        f64::from(sample_rate) / 2.0,
    )
}

/// [`mel_filter_bank`] covering `fmin` to `fmax` Hz (librosa's `mel(fmin, fmax)`).
pub fn mel_filter_bank_range(
    sample_rate: u32,
    n_fft: usize,
    n_mels: usize,
    fmin: f64,
    fmax: f64,
) -> Vec<f32> {
    let n_freq = n_fft / 2 + 1;
    let nyquist = f64::from(sample_rate) / 2.0;
    let fft_freqs: Vec<f64> = (0..n_freq)
        .map(|i| i as f64 * nyquist / (n_freq - 1) as f64)
        .collect();
    let (lo, hi) = (hz_to_mel(fmin), hz_to_mel(fmax));
    let mel_f: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (n_mels + 1) as f64))
        .collect();
    let mut bank = vec![0f32; n_mels * n_freq];
    for m in 0..n_mels {
        let (left, center, right) = (mel_f[m], mel_f[m + 1], mel_f[m + 2]);
        let norm = 2.0 / (right - left);
        for (k, f) in fft_freqs.iter().enumerate() {
            let lower = (f - left) / (center - left);
            let upper = (right - f) / (right - center);
            let w = lower.min(upper).max(0.0);
            bank[m * n_freq + k] = (w * norm) as f32;
        }
    }
    bank
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_follow_whisper_count() {
        let fe = MelFrontend::new(80).unwrap();
        let mel = fe.compute(&vec![0.0; 16_000], 0).unwrap();
        assert_eq!((mel.n_mels, mel.frames), (80, 100));
        let mel = fe.compute(&[0.1; 1000], CHUNK_SAMPLES).unwrap();
        assert_eq!(mel.frames, (1000 + CHUNK_SAMPLES) / HOP_LENGTH);
        assert_eq!(
            mel.to_tensor(&Device::Cpu).unwrap().dims(),
            &[1, 80, mel.frames]
        );
    }

    #[test]
    fn too_short_and_bad_bins_are_errors() {
        let fe = MelFrontend::new(80).unwrap();
        assert!(
            fe.compute(&[0.0; 100], 0)
                .unwrap_err()
                .to_string()
                .contains("too short")
        );
        assert!(MelFrontend::new(0).is_err());
    }

    #[test]
    fn a_tone_lands_in_its_mel_bin() {
        let fe = MelFrontend::new(80).unwrap();
        let tone: Vec<f32> = (0..16_000)
            .map(|i| (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 16_000.0).sin() * 0.5)
            .collect();
        let mel = fe.compute(&tone, 0).unwrap();
        let t = 50;
        let col: Vec<f32> = (0..80).map(|m| mel.data[m * mel.frames + t]).collect();
        let best = col
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap();
        // 440 Hz sits at 6.6 on Slaney's linear part; bin centres are ~0.56 apart here.
        let centre_mel = hz_to_mel(440.0);
        let step = hz_to_mel(8000.0) / 81.0;
        assert!(
            ((best + 1) as f64 * step - centre_mel).abs() < 1.5 * step,
            "peak at bin {best}"
        );
    }
}
