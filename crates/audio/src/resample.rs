//! Sample-rate conversion with rubato's FFT resampler: whole clips, and a
//! streaming converter that keeps its state between chunks so live audio has
//! no clicks at chunk borders.

use rubato::audioadapter_buffers::direct::SequentialSliceOfVecs;
use rubato::{Fft, FixedSync, Resampler};

use crate::MODEL_SAMPLE_RATE;
use crate::error::{AudioError, Result};

const CHUNK: usize = 1024;

fn err(from: u32, to: u32) -> impl Fn(String) -> AudioError {
    move |message| AudioError::Resample { from, to, message }
}

/// Resamples planar channels from `from` Hz to `to` Hz; the output is trimmed
/// of the resampler's delay, so it lines up with the input.
pub fn resample(channels: &[Vec<f32>], from: u32, to: u32) -> Result<Vec<Vec<f32>>> {
    if from == to || channels.is_empty() {
        return Ok(channels.to_vec());
    }
    let e = err(from, to);
    let n_ch = channels.len();
    let frames = channels[0].len();
    let mut r = Fft::<f32>::new(from as usize, to as usize, CHUNK, n_ch, FixedSync::Input)
        .map_err(|x| e(x.to_string()))?;
    let out_len = r.process_all_needed_output_len(frames);
    let mut out = vec![vec![0f32; out_len]; n_ch];
    let input = SequentialSliceOfVecs::new(channels, n_ch, frames).map_err(|x| e(x.to_string()))?;
    let mut output =
        SequentialSliceOfVecs::new_mut(&mut out, n_ch, out_len).map_err(|x| e(x.to_string()))?;
    let (_, produced) = r
        .process_all_into_buffer(&input, &mut output, frames, None)
        .map_err(|x| e(x.to_string()))?;
    for c in &mut out {
        c.truncate(produced);
    }
    Ok(out)
}

/// Mono at [`MODEL_SAMPLE_RATE`] from any planar audio.
pub fn to_model_rate(channels: &[Vec<f32>], rate: u32) -> Result<Vec<f32>> {
    let mono = crate::pcm::downmix(channels);
    Ok(resample(&[mono], rate, MODEL_SAMPLE_RATE)?
        .pop()
        .unwrap_or_default())
}

/// A mono resampler for live streams: feed chunks of any size, get every
/// output sample exactly once, with the filter state carried across chunks.
pub struct StreamResampler {
    inner: Option<Fft<f32>>,
    from: u32,
    to: u32,
    pending: Vec<f32>,
    out: Vec<Vec<f32>>,
    delay: usize,
    total_in: u64,
    total_out: u64,
}

impl std::fmt::Debug for StreamResampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamResampler")
            .field("from", &self.from)
            .field("to", &self.to)
            .finish()
    }
}

impl StreamResampler {
    /// A converter from `from` Hz to `to` Hz.
    pub fn new(from: u32, to: u32) -> Result<Self> {
        let inner = if from == to {
            None
        } else {
            Some(
                Fft::<f32>::new(from as usize, to as usize, CHUNK, 1, FixedSync::Input)
                    .map_err(|x| err(from, to)(x.to_string()))?,
            )
        };
        let delay = inner.as_ref().map_or(0, Resampler::output_delay);
        let out_max = inner.as_ref().map_or(0, Resampler::output_frames_max);
        Ok(Self {
            inner,
            from,
            to,
            pending: Vec::new(),
            out: vec![vec![0f32; out_max]],
            delay,
            total_in: 0,
            total_out: 0,
        })
    }

    /// Resamples `input`, appending what is ready to `output`.
    pub fn push(&mut self, input: &[f32], output: &mut Vec<f32>) -> Result<()> {
        let Some(r) = self.inner.as_mut() else {
            output.extend_from_slice(input);
            return Ok(());
        };
        let e = err(self.from, self.to);
        self.total_in += input.len() as u64;
        self.pending.extend_from_slice(input);
        let mut used = 0;
        while self.pending.len() - used >= r.input_frames_next() {
            let need = r.input_frames_next();
            let chunk = [self.pending[used..used + need].to_vec()];
            let inp = SequentialSliceOfVecs::new(&chunk, 1, need).map_err(|x| e(x.to_string()))?;
            let cap = self.out[0].len();
            let mut outp = SequentialSliceOfVecs::new_mut(&mut self.out, 1, cap)
                .map_err(|x| e(x.to_string()))?;
            let (_, produced) = r
                .process_into_buffer(&inp, &mut outp, None)
                .map_err(|x| e(x.to_string()))?;
            let skip = self.delay.min(produced);
            self.delay -= skip;
            output.extend_from_slice(&self.out[0][skip..produced]);
            self.total_out += (produced - skip) as u64;
            used += need;
        }
        self.pending.drain(..used);
        Ok(())
    }

    /// Flushes buffered input (padded with silence) at the end of a stream.
    pub fn finish(&mut self, output: &mut Vec<f32>) -> Result<()> {
        if self.inner.is_none() {
            return Ok(());
        }
        // Everything the input implies, including what the filter delay still holds back.
        let expected =
            (self.total_in as f64 * f64::from(self.to) / f64::from(self.from)).round() as u64;
        let owed = expected.saturating_sub(self.total_out) as usize;
        let before = output.len();
        let chunk = self
            .inner
            .as_ref()
            .map_or(CHUNK, Resampler::input_frames_next);
        let total_in = self.total_in;
        while output.len() < before + owed {
            self.push(&vec![0.0; chunk], output)?;
        }
        self.total_in = total_in;
        output.truncate(before + owed);
        self.total_out = expected;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(freq: f32, rate: u32, secs: f32) -> Vec<f32> {
        (0..(rate as f32 * secs) as usize)
            .map(|i| (2.0 * std::f32::consts::PI * freq * i as f32 / rate as f32).sin() * 0.5)
            .collect()
    }

    fn max_err(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn whole_clip_matches_the_analytic_tone() {
        let out = resample(&[tone(440.0, 48_000, 1.0)], 48_000, 16_000).unwrap();
        let want = tone(440.0, 16_000, 1.0);
        assert!(
            (out[0].len() as i64 - 16_000).abs() <= 1,
            "{}",
            out[0].len()
        );
        // Away from the clip edges the resampled tone is the tone.
        let e = max_err(&out[0][500..15_000], &want[500..15_000]);
        assert!(e < 2e-3, "max error {e}");
    }

    #[test]
    fn streaming_equals_whole_and_has_no_border_clicks() {
        let input = tone(300.0, 44_100, 2.0);
        let whole = resample(std::slice::from_ref(&input), 44_100, 16_000)
            .unwrap()
            .remove(0);
        let mut s = StreamResampler::new(44_100, 16_000).unwrap();
        let mut out = Vec::new();
        // Odd chunk sizes, as network packets arrive.
        for chunk in input.chunks(441 + 37) {
            s.push(chunk, &mut out).unwrap();
        }
        let mut tail = Vec::new();
        s.finish(&mut tail).unwrap();
        out.extend(tail);
        assert!(
            (out.len() as i64 - whole.len() as i64).abs() <= 2,
            "{} vs {}",
            out.len(),
            whole.len()
        );
        let n = out.len().min(whole.len()) - 200;
        let e = max_err(&out[200..n], &whole[200..n]);
        assert!(e < 1e-4, "stream differs from whole by {e}");
        // No discontinuity: consecutive samples of a 300 Hz tone at 16 kHz differ by < 0.06.
        let jump = out[200..n]
            .windows(2)
            .map(|w| (w[1] - w[0]).abs())
            .fold(0.0, f32::max);
        assert!(jump < 0.07, "jump {jump}");
    }

    #[test]
    fn same_rate_passes_through() {
        let mut s = StreamResampler::new(16_000, 16_000).unwrap();
        let mut out = Vec::new();
        s.push(&[0.1, 0.2], &mut out).unwrap();
        assert_eq!(out, vec![0.1, 0.2]);
    }
}
