//! What a room and a microphone do to speech, drawn from a seed: a room's
//! reverberation, a loudness, coloured background noise at a signal-to-noise
//! ratio. All at 16 kHz.

use crate::rng::Rng;

/// The conditions one utterance is recorded in.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Conditions {
    /// Level of the speech, RMS in dBFS.
    pub level_dbfs: f32,
    /// Reverberation time (RT60) of the room, seconds, when there is one.
    pub rt60: Option<f32>,
    /// Speech-to-noise ratio in dB, when noise is added.
    pub snr_db: Option<f32>,
    /// Noise colour: 0 is white, towards 1 ever more low-frequency (one-pole low-pass).
    pub noise_colour: f32,
}

/// RMS level in dBFS (−inf dB of silence as −200).
pub fn rms_dbfs(x: &[f32]) -> f32 {
    let p = power(x);
    if p <= 0.0 {
        -200.0
    } else {
        10.0 * p.log10() as f32
    }
}

fn power(x: &[f32]) -> f64 {
    if x.is_empty() {
        return 0.0;
    }
    x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / x.len() as f64
}

/// Cuts leading and trailing silence (below 2 % of the peak), keeping `pad` samples each side.
pub fn trim(x: &mut Vec<f32>, pad: usize) {
    let peak = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let thr = peak * 0.02;
    let Some(a) = x.iter().position(|v| v.abs() > thr) else {
        return;
    };
    let b = x
        .iter()
        .rposition(|v| v.abs() > thr)
        .map_or(x.len(), |b| b + 1);
    x.truncate((b + pad).min(x.len()));
    x.drain(..a.saturating_sub(pad));
}

/// A room's impulse response: the direct sound, then 600 reflections at
/// random delays whose amplitude decays by 60 dB over `rt60` seconds, and
/// a sign drawn for each. Sparse, so convolving is cheap.
pub fn room(rt60: f32, rate: u32, rng: &mut Rng) -> Vec<(usize, f32)> {
    let len = (rt60 * rate as f32) as usize;
    let mut taps = vec![(0usize, 1.0f32)];
    // The first reflection comes after 2–10 ms.
    let first = (rng.uniform(0.002, 0.010) * rate as f32) as usize;
    for _ in 0..600 {
        let d = first + rng.below(len.saturating_sub(first).max(1));
        let decay = (-6.9 * d as f32 / len.max(1) as f32).exp();
        let sign = if rng.chance(0.5) { 1.0 } else { -1.0 };
        taps.push((d, sign * decay * rng.uniform(0.02, 0.08)));
    }
    taps
}

/// `x` convolved with sparse taps, the tail kept.
pub fn convolve(x: &[f32], taps: &[(usize, f32)]) -> Vec<f32> {
    let tail = taps.iter().map(|t| t.0).max().unwrap_or(0);
    let mut y = vec![0f32; x.len() + tail];
    for &(d, g) in taps {
        for (o, v) in y[d..d + x.len()].iter_mut().zip(x) {
            *o += g * v;
        }
    }
    y
}

/// Coloured Gaussian noise: white noise through a one-pole low-pass.
pub fn noise(n: usize, colour: f32, rng: &mut Rng) -> Vec<f32> {
    let a = colour.clamp(0.0, 0.99);
    let mut prev = 0f32;
    (0..n)
        .map(|_| {
            prev = a * prev + (1.0 - a) * rng.normal();
            prev
        })
        .collect()
}

/// Draws conditions: reverberation with probability `p_reverb` (RT60 in
/// `rt60`), noise with probability `p_noise` (SNR in `snr_db`), a level in `level_dbfs`.
pub fn draw(
    rng: &mut Rng,
    level_dbfs: (f32, f32),
    p_reverb: f32,
    rt60: (f32, f32),
    p_noise: f32,
    snr_db: (f32, f32),
) -> Conditions {
    let level = rng.uniform(level_dbfs.0, level_dbfs.1);
    let rt = rng.chance(p_reverb).then(|| rng.uniform(rt60.0, rt60.1));
    let snr = rng.chance(p_noise).then(|| rng.uniform(snr_db.0, snr_db.1));
    Conditions {
        level_dbfs: level,
        rt60: rt,
        snr_db: snr,
        noise_colour: rng.uniform(0.0, 0.95),
    }
}

/// Applies `c` to speech `x` (16 kHz): room, then level, then noise, then
/// the converter's clipping at full scale. Returns the fraction of samples
/// that clipped.
pub fn apply(x: &mut Vec<f32>, c: &Conditions, rate: u32, rng: &mut Rng) -> f32 {
    if let Some(rt60) = c.rt60 {
        let taps = room(rt60, rate, rng);
        *x = convolve(x, &taps);
    }
    let p = power(x);
    if p > 0.0 {
        let target = 10f64.powf(f64::from(c.level_dbfs) / 10.0);
        let g = (target / p).sqrt() as f32;
        x.iter_mut().for_each(|v| *v *= g);
    }
    if let Some(snr) = c.snr_db {
        let n = noise(x.len(), c.noise_colour, rng);
        let (ps, pn) = (power(x), power(&n));
        if pn > 0.0 {
            let g = (ps / pn / 10f64.powf(f64::from(snr) / 10.0)).sqrt() as f32;
            x.iter_mut().zip(&n).for_each(|(v, e)| *v += g * e);
        }
    }
    let mut clipped = 0usize;
    for v in x.iter_mut() {
        if v.abs() >= 1.0 {
            clipped += 1;
            *v = v.clamp(-1.0, 1.0);
        }
    }
    clipped as f32 / x.len().max(1) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(n: usize) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.05).sin() * 0.3).collect()
    }

    #[test]
    fn level_and_snr_are_what_was_asked() {
        let clean = tone(32_000);
        let c = Conditions {
            level_dbfs: -26.0,
            rt60: None,
            snr_db: None,
            noise_colour: 0.0,
        };
        let mut x = clean.clone();
        assert_eq!(apply(&mut x, &c, 16_000, &mut Rng::new(1)), 0.0);
        assert!((rms_dbfs(&x) + 26.0).abs() < 0.01, "{}", rms_dbfs(&x));
        for snr in [0.0f32, 10.0, 25.0] {
            let c = Conditions {
                snr_db: Some(snr),
                noise_colour: 0.7,
                ..c.clone()
            };
            let mut y = clean.clone();
            apply(&mut y, &c, 16_000, &mut Rng::new(2));
            let mut s = clean.clone();
            apply(
                &mut s,
                &Conditions {
                    snr_db: None,
                    ..c.clone()
                },
                16_000,
                &mut Rng::new(2),
            );
            let n: Vec<f32> = y.iter().zip(&s).map(|(a, b)| a - b).collect();
            let measured = rms_dbfs(&s) - rms_dbfs(&n);
            assert!((measured - snr).abs() < 0.05, "{snr}: {measured}");
        }
    }

    #[test]
    fn loud_levels_clip_and_say_so() {
        let mut x = tone(16_000);
        let c = Conditions {
            level_dbfs: 3.0,
            rt60: None,
            snr_db: None,
            noise_colour: 0.0,
        };
        let clipped = apply(&mut x, &c, 16_000, &mut Rng::new(1));
        assert!(clipped > 0.3, "{clipped}");
        assert!(x.iter().all(|v| v.abs() <= 1.0));
    }

    #[test]
    fn a_room_decays_over_its_rt60_and_lengthens_the_sound() {
        let mut rng = Rng::new(4);
        let taps = room(0.5, 16_000, &mut rng);
        assert!(taps.iter().all(|t| t.0 < 8_000));
        let early: f32 = taps
            .iter()
            .filter(|t| t.0 > 0 && t.0 < 2_000)
            .map(|t| t.1 * t.1)
            .sum();
        let late: f32 = taps
            .iter()
            .filter(|t| t.0 >= 6_000)
            .map(|t| t.1 * t.1)
            .sum();
        assert!(early > 10.0 * late, "{early} {late}");
        let mut click = vec![0f32; 100];
        click[0] = 1.0;
        let y = convolve(&click, &taps);
        assert!(y.len() > 7_000);
        assert_eq!(y[0], 1.0);
    }

    #[test]
    fn trim_keeps_the_speech_and_a_margin() {
        let mut x = vec![0f32; 1000];
        x.extend(tone(500));
        x.extend(vec![0f32; 1000]);
        trim(&mut x, 100);
        assert!((690..=710).contains(&x.len()), "{}", x.len());
    }

    #[test]
    fn draws_repeat_from_a_seed() {
        let d = |s| {
            draw(
                &mut Rng::new(s),
                (-30.0, -18.0),
                0.5,
                (0.2, 0.8),
                0.5,
                (5.0, 30.0),
            )
        };
        assert_eq!(d(3), d(3));
        let many: Vec<Conditions> = (0..200).map(d).collect();
        let rooms = many.iter().filter(|c| c.rt60.is_some()).count();
        assert!((70..130).contains(&rooms), "{rooms}");
        assert!(many.iter().all(|c| (-30.0..-18.0).contains(&c.level_dbfs)));
    }
}
