//! AdamW (decoupled weight decay) with linear warm-up and cosine decay, its
//! moments kept as named tensors so a checkpoint holds the whole state and
//! training resumes bit for bit.

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use crate::error::{Result, TrainError};

/// The optimiser's and schedule's settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine.
    pub min_lr: f64,
    /// Steps of linear warm-up from 0 to `lr`.
    pub warmup: u64,
    /// Steps in all (the cosine reaches `min_lr` here).
    pub steps: u64,
    /// AdamW β₁.
    pub beta1: f64,
    /// AdamW β₂.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Schedule {
    /// Learning rate of step `step` (1-based): warm-up, then cosine decay.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step <= self.warmup {
            return self.lr * step as f64 / self.warmup.max(1) as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let t = ((step - self.warmup) as f64 / span).min(1.0);
        self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// AdamW over named variables.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
    schedule: Schedule,
}

impl AdamW {
    /// Starts with zero moments, in the order of `params` (sorted by name by the caller).
    pub fn new(params: Vec<(String, Var)>, schedule: Schedule) -> Result<Self> {
        let zeros = |p: &Var| p.as_tensor().zeros_like();
        let m = params
            .iter()
            .map(|(_, p)| zeros(p))
            .collect::<candle_core::Result<_>>()?;
        let v = params
            .iter()
            .map(|(_, p)| zeros(p))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            params,
            m,
            v,
            step: 0,
            schedule,
        })
    }

    /// Steps taken.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The variables, in order.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One update with `grads` (one per variable, in order); returns the learning rate used.
    pub fn step(&mut self, grads: &[Tensor]) -> Result<f64> {
        if grads.len() != self.params.len() {
            return Err(TrainError::Config(format!(
                "{} gradients for {} variables",
                grads.len(),
                self.params.len()
            )));
        }
        self.step += 1;
        let s = &self.schedule;
        let lr = s.lr_at(self.step);
        let t = self.step as i32;
        let c1 = 1.0 - s.beta1.powi(t);
        let c2 = 1.0 - s.beta2.powi(t);
        for (i, g) in grads.iter().enumerate() {
            let m = ((&self.m[i] * s.beta1)? + (g * (1.0 - s.beta1))?)?;
            let v = ((&self.v[i] * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
            let p = self.params[i].1.as_tensor();
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + s.eps)?)?;
            let next = ((p * (1.0 - lr * s.weight_decay))? - (update * lr)?)?;
            self.params[i].1.set(&next)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(lr)
    }

    /// The moments as `m.NAME` / `v.NAME` tensors.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`] after `step` steps.
    pub fn restore(&mut self, state: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (i, (name, p)) in self.params.iter().enumerate() {
            let get = |k: String| {
                state
                    .get(&k)
                    .filter(|t| t.dims() == p.as_tensor().dims())
                    .cloned()
                    .ok_or_else(|| {
                        TrainError::Mismatch(format!(
                            "the optimiser state lacks {k} of shape {:?}",
                            p.as_tensor().dims()
                        ))
                    })
            };
            self.m[i] = get(format!("m.{name}"))?;
            self.v[i] = get(format!("v.{name}"))?;
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn schedule() -> Schedule {
        Schedule {
            lr: 1e-3,
            min_lr: 1e-5,
            warmup: 10,
            steps: 110,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }

    #[test]
    fn warm_up_then_cosine() {
        let s = schedule();
        assert!((s.lr_at(1) - 1e-4).abs() < 1e-12);
        assert!((s.lr_at(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr_at(60) - (1e-5 + 0.5 * (1e-3 - 1e-5))).abs() < 1e-12);
        assert!((s.lr_at(110) - 1e-5).abs() < 1e-12);
        assert!((s.lr_at(500) - 1e-5).abs() < 1e-12);
        let lrs: Vec<f64> = (10..=110).map(|t| s.lr_at(t)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]));
    }

    #[test]
    fn first_step_matches_the_formula() {
        // After one step the bias-corrected update is lr · g / (|g| + ε) per element.
        let p = Var::from_vec(vec![1.0f64, -2.0, 0.5], 3, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), p.clone())], schedule()).unwrap();
        let g = Tensor::new(&[0.5f64, -0.1, 0.0], &Device::Cpu).unwrap();
        let lr = opt.step(&[g]).unwrap();
        let got: Vec<f64> = p.as_tensor().to_vec1().unwrap();
        let want = [
            1.0 * (1.0 - lr * 0.01) - lr * 0.5 / (0.5 + 1e-8),
            -2.0 * (1.0 - lr * 0.01) + lr * 0.1 / (0.1 + 1e-8),
            0.5 * (1.0 - lr * 0.01),
        ];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{got:?} {want:?}");
        }
    }

    #[test]
    fn minimises_a_quadratic_and_restores_exactly() {
        let target = Tensor::new(&[3.0f32, -1.0, 0.25, 2.0], &Device::Cpu).unwrap();
        let run = |steps: u64, resume_at: Option<u64>| {
            let p = Var::zeros(4, DType::F32, &Device::Cpu).unwrap();
            let mut s = schedule();
            s.lr = 0.1;
            s.weight_decay = 0.0;
            let mut opt = AdamW::new(vec![("w".into(), p.clone())], s.clone()).unwrap();
            for t in 0..steps {
                if Some(t) == resume_at {
                    let (w, st) = (p.as_tensor().copy().unwrap(), opt.state());
                    let q = Var::from_tensor(&w).unwrap();
                    let mut fresh = AdamW::new(vec![("w".into(), q.clone())], s.clone()).unwrap();
                    fresh.restore(&st, t).unwrap();
                    opt = fresh;
                    p.set(q.as_tensor()).unwrap();
                    opt.params[0].1 = p.clone();
                }
                let g = ((p.as_tensor() - &target).unwrap() * 2.0).unwrap();
                opt.step(&[g]).unwrap();
            }
            p.as_tensor().to_vec1::<f32>().unwrap()
        };
        let whole = run(110, None);
        let dist: f32 = whole
            .iter()
            .zip([3.0f32, -1.0, 0.25, 2.0])
            .map(|(a, b)| (a - b).abs())
            .sum();
        assert!(dist < 0.1, "{whole:?}");
        assert_eq!(whole, run(110, Some(37)));
    }
}
