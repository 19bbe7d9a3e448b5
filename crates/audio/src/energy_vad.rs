//! Voice activity from frame energy, for machines without the Silero weights.
//! The level of each 32 ms frame is compared with a noise floor that follows
//! quiet stretches quickly and loud ones slowly, and mapped to a probability,
//! so the [`Endpointer`](crate::Endpointer) works with either detector.

/// Samples per frame, the same 32 ms as Silero's steps at 16 kHz.
pub const FRAME: usize = 512;

/// Energy-based voice activity of one stream.
#[derive(Debug, Clone)]
pub struct EnergyVad {
    floor_db: f32,
    margin_db: f32,
}

impl Default for EnergyVad {
    fn default() -> Self {
        Self {
            floor_db: -60.0,
            margin_db: 12.0,
        }
    }
}

fn level_db(frame: &[f32]) -> f32 {
    let ms = frame.iter().map(|x| x * x).sum::<f32>() / frame.len().max(1) as f32;
    10.0 * ms.max(1e-12).log10()
}

impl EnergyVad {
    /// Speech probability of the next frame ([`FRAME`] samples at 16 kHz).
    pub fn step(&mut self, frame: &[f32]) -> f32 {
        let db = level_db(frame);
        // The floor drops to quiet frames at once and creeps up under sustained sound,
        // so a long utterance does not become the floor but a louder room does.
        self.floor_db = if db < self.floor_db {
            db
        } else {
            self.floor_db + 0.02 * (db - self.floor_db)
        };
        // Absolute silence never counts as speech, whatever the floor.
        if db < -55.0 {
            return 0.0;
        }
        let x = (db - self.floor_db - self.margin_db) / 3.0;
        1.0 / (1.0 + (-x).exp())
    }

    /// Probabilities of every whole frame.
    pub fn probabilities(&mut self, samples: &[f32]) -> Vec<f32> {
        samples.chunks_exact(FRAME).map(|f| self.step(f)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, amp: f32, seed: u32) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32 - 0.5) * 2.0 * amp
            })
            .collect()
    }

    #[test]
    fn speech_like_bursts_stand_out_from_room_noise() {
        let mut v = EnergyVad::default();
        let mut x = noise(16_000, 0.003, 1); // room noise, about -55 dBFS
        let burst: Vec<f32> = (0..16_000)
            .map(|i| 0.3 * (i as f32 * 0.07).sin() * (i as f32 * 0.0031).sin().abs())
            .collect();
        x.extend(burst);
        x.extend(noise(16_000, 0.003, 2));
        let p = v.probabilities(&x);
        let (a, b, c) = (&p[..31], &p[33..62], &p[64..]);
        assert!(a.iter().all(|p| *p < 0.5), "noise before: {a:?}");
        assert!(b.iter().filter(|p| **p > 0.5).count() > 20, "burst: {b:?}");
        assert!(c.iter().all(|p| *p < 0.5), "noise after: {c:?}");
    }

    #[test]
    fn digital_silence_is_never_speech() {
        let mut v = EnergyVad::default();
        assert!(v.probabilities(&vec![0.0; 8_192]).iter().all(|p| *p == 0.0));
    }
}
