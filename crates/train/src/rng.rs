//! A small seeded generator (splitmix64): the same seed gives the same data
//! on every machine and every version of this crate's dependencies.

/// splitmix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// A seeded stream of numbers.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// The stream of `seed`.
    pub fn new(seed: u64) -> Self {
        Self(mix(seed ^ GOLDEN))
    }

    /// Stream `index` of `seed`: independent of every other index, so an
    /// item's numbers do not depend on which items were made before it.
    pub fn derive(seed: u64, index: u64) -> Self {
        Self(mix(mix(seed ^ GOLDEN) ^ mix(index.wrapping_add(GOLDEN))))
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        mix(self.0)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit() as f32
    }

    /// Whether an event of probability `p` happens.
    pub fn chance(&mut self, p: f32) -> bool {
        self.unit() < f64::from(p)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.unit() * n as f64) as usize).min(n.saturating_sub(1))
    }

    /// A standard normal value (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.unit().max(1e-12);
        let u2 = self.unit();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// Shuffles in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_repeat_and_differ() {
        let a: Vec<u64> = (0..4).map(|_| Rng::derive(7, 3).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(Rng::derive(7, 3).next_u64(), Rng::derive(7, 4).next_u64());
        assert_ne!(Rng::derive(7, 3).next_u64(), Rng::derive(8, 3).next_u64());
    }

    #[test]
    fn uniform_and_normal_have_their_moments() {
        let mut r = Rng::new(1);
        let n = 20_000;
        let u: Vec<f64> = (0..n).map(|_| r.unit()).collect();
        let mean = u.iter().sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        assert!(u.iter().all(|x| (0.0..1.0).contains(x)));
        let g: Vec<f64> = (0..n).map(|_| f64::from(r.normal())).collect();
        let m = g.iter().sum::<f64>() / n as f64;
        let var = g.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n as f64;
        assert!(m.abs() < 0.03 && (var - 1.0).abs() < 0.05, "{m} {var}");
        let mut hits = [0usize; 5];
        for _ in 0..n {
            hits[r.below(5)] += 1;
        }
        assert!(
            hits.iter()
                .all(|h| (*h as f64 - n as f64 / 5.0).abs() < 300.0),
            "{hits:?}"
        );
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: Vec<usize> = (0..100).collect();
        Rng::new(3).shuffle(&mut v);
        assert_ne!(v, (0..100).collect::<Vec<_>>());
        v.sort_unstable();
        assert_eq!(v, (0..100).collect::<Vec<_>>());
    }
}
