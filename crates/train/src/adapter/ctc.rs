//! An alignment stage before the paper's: connectionist temporal
//! classification (CTC) of the adapter's output against the frozen LM's own
//! token embeddings.
//!
//! Each adapted position is classified by its distance to every token's
//! input embedding, `log p(v | a) ∝ −‖a − E_v‖² / τ`, with one more class,
//! the blank, at the embeddings' centroid. CTC over the transcript's tokens
//! then pulls each position towards the embedding of the token spoken there
//! (or towards the centroid between tokens), so the LM, reading the adapted
//! audio, sees something close to the words as text. No pass through the
//! LM's layers is needed: a step costs one product with the embedding
//! table, a few hundredths of the reply loss's, so the adapter can see far
//! more speech on the same machine before the reply loss (the paper's
//! objective) finishes the alignment through the LM.

use candle_core::{D, Device, Tensor};

use super::Frozen;
use crate::error::{Result, TrainError};

/// The CTC classifier over the LM's embedding table, plus the blank.
#[derive(Debug)]
pub struct CtcHead {
    /// ‖E_v‖² of every token, then ‖μ‖² of the blank: (1, V + 1).
    sq_norms: Tensor,
    /// The blank's vector, the centroid μ of the embeddings: (hidden, 1).
    blank: Tensor,
    temperature: f64,
    vocab: usize,
}

impl CtcHead {
    /// The head over `frozen`'s embedding table at temperature `τ`.
    pub fn new(frozen: &Frozen, temperature: f64) -> Result<Self> {
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(TrainError::Config(format!(
                "ctc_temperature: {temperature} must be positive"
            )));
        }
        let e = frozen.lm.embeddings();
        let vocab = e.dim(0)?;
        let centroid = e.mean(0)?;
        let sq = e.sqr()?.sum(1)?;
        let blank_sq = centroid.sqr()?.sum_all()?.reshape(1)?;
        let sq_norms = Tensor::cat(&[&sq, &blank_sq], 0)?.unsqueeze(0)?.detach();
        Ok(Self {
            sq_norms,
            blank: centroid.unsqueeze(1)?.detach(),
            temperature,
            vocab,
        })
    }

    /// The blank's class id (one past the vocabulary).
    pub fn blank_id(&self) -> u32 {
        self.vocab as u32
    }

    /// Log-probabilities (T, V + 1) of every class at each adapted
    /// position `a` (T, hidden), differentiable in `a`.
    pub fn log_probs(&self, frozen: &Frozen, a: &Tensor) -> Result<Tensor> {
        let dots = frozen.lm.logits_differentiable(a)?;
        let blank = a.matmul(&self.blank)?;
        let z = Tensor::cat(&[&dots, &blank], 1)?;
        let z = ((z * 2.0)?.broadcast_sub(&self.sq_norms)? / self.temperature)?;
        Ok(candle_nn::ops::log_softmax(&z, D::Minus1)?)
    }

    /// The CTC loss of `labels` (token ids, no blank) at positions `a`:
    /// its value, −log p(labels | a), and a tensor whose gradient is that
    /// loss's gradient in `a` (the occupancies times the log-probabilities
    /// they came from). `None` when the labels cannot fit in the positions.
    pub fn loss(
        &self,
        frozen: &Frozen,
        a: &Tensor,
        labels: &[u32],
    ) -> Result<Option<(f64, Tensor)>> {
        let lp = self.log_probs(frozen, a)?;
        let ext = extend(labels, self.blank_id());
        let idx = Tensor::new(ext.as_slice(), &Device::Cpu)?;
        let picked = lp.index_select(&idx, 1)?;
        let rows = picked.to_vec2::<f32>()?;
        let Some((nll, gamma)) = forward_backward(&rows, &ext, self.blank_id()) else {
            return Ok(None);
        };
        let (t, s) = (rows.len(), ext.len());
        let gamma = Tensor::from_vec(gamma, (t, s), &Device::Cpu)?;
        let surrogate = (picked * gamma)?.sum_all()?.neg()?;
        Ok(Some((nll, surrogate)))
    }

    /// The best path's tokens at positions `a`: each position's likeliest
    /// class, repeats merged, blanks dropped.
    pub fn greedy(&self, frozen: &Frozen, a: &Tensor) -> Result<Vec<u32>> {
        let best = self.log_probs(frozen, &a.detach())?.argmax(D::Minus1)?;
        Ok(collapse(&best.to_vec1::<u32>()?, self.blank_id()))
    }
}

/// CTC's label sequence with blanks around and between the labels.
pub fn extend(labels: &[u32], blank: u32) -> Vec<u32> {
    let mut ext = Vec::with_capacity(2 * labels.len() + 1);
    ext.push(blank);
    for &l in labels {
        ext.push(l);
        ext.push(blank);
    }
    ext
}

/// A best path's labels: repeats merged, then blanks dropped.
pub fn collapse(path: &[u32], blank: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut prev = None;
    for &c in path {
        if Some(c) != prev && c != blank {
            out.push(c);
        }
        prev = Some(c);
    }
    out
}

fn logaddexp(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY {
        return b;
    }
    if b == f64::NEG_INFINITY {
        return a;
    }
    let m = a.max(b);
    m + ((a - m).exp() + (b - m).exp()).ln()
}

/// CTC's forward-backward in log space over `lp[t][s]`, the
/// log-probability at time t of the extended sequence's s-th symbol
/// (`ext`, from [`extend`]). Returns −log p(labels) and the occupancies
/// γ[t·S + s] (the posterior that the alignment is at s at time t, which
/// sum to one at each t); the loss's gradient in `lp[t][s]` is −γ. `None`
/// when no alignment exists (too few positions).
pub fn forward_backward(lp: &[Vec<f32>], ext: &[u32], blank: u32) -> Option<(f64, Vec<f32>)> {
    let t_len = lp.len();
    let s_len = ext.len();
    if t_len == 0 || s_len == 0 {
        return None;
    }
    let ninf = f64::NEG_INFINITY;
    // A label may skip the blank before it unless it repeats the one before.
    let skip = |s: usize| s >= 2 && ext[s] != blank && ext[s] != ext[s - 2];
    let at = |t: usize, s: usize| f64::from(lp[t][s]);
    let mut alpha = vec![ninf; t_len * s_len];
    alpha[0] = at(0, 0);
    if s_len > 1 {
        alpha[1] = at(0, 1);
    }
    for t in 1..t_len {
        for s in 0..s_len {
            let prev = &alpha[(t - 1) * s_len..t * s_len];
            let mut v = prev[s];
            if s >= 1 {
                v = logaddexp(v, prev[s - 1]);
            }
            if skip(s) {
                v = logaddexp(v, prev[s - 2]);
            }
            alpha[t * s_len + s] = if v == ninf { ninf } else { v + at(t, s) };
        }
    }
    let last = (t_len - 1) * s_len;
    let mut log_p = alpha[last + s_len - 1];
    if s_len > 1 {
        log_p = logaddexp(log_p, alpha[last + s_len - 2]);
    }
    if !log_p.is_finite() {
        return None;
    }
    let mut beta = vec![ninf; t_len * s_len];
    beta[last + s_len - 1] = at(t_len - 1, s_len - 1);
    if s_len > 1 {
        beta[last + s_len - 2] = at(t_len - 1, s_len - 2);
    }
    for t in (0..t_len - 1).rev() {
        for s in 0..s_len {
            let next = &beta[(t + 1) * s_len..(t + 2) * s_len];
            let mut v = next[s];
            if s + 1 < s_len {
                v = logaddexp(v, next[s + 1]);
            }
            if s + 2 < s_len && skip(s + 2) {
                v = logaddexp(v, next[s + 2]);
            }
            beta[t * s_len + s] = if v == ninf { ninf } else { v + at(t, s) };
        }
    }
    let gamma = (0..t_len * s_len)
        .map(|i| {
            let (t, s) = (i / s_len, i % s_len);
            let g = alpha[i] + beta[i] - at(t, s) - log_p;
            if g == ninf { 0.0 } else { g.exp() as f32 }
        })
        .collect();
    Some((-log_p, gamma))
}

/// The fewest positions CTC needs for `labels`: one per label, and a
/// blank between two equal labels back to back.
pub fn positions_needed(labels: &[u32]) -> usize {
    labels.len() + labels.windows(2).filter(|w| w[0] == w[1]).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// −log p by summing every path of length T that collapses to `labels`.
    fn brute(lp: &[Vec<f32>], labels: &[u32], classes: u32, blank: u32) -> f64 {
        let t_len = lp.len();
        let mut total = 0f64;
        let mut path = vec![0u32; t_len];
        let n = (classes as usize).pow(t_len as u32);
        for code in 0..n {
            let mut c = code;
            for p in path.iter_mut() {
                *p = (c % classes as usize) as u32;
                c /= classes as usize;
            }
            if collapse(&path, blank) == labels {
                let lp_path: f64 = path
                    .iter()
                    .enumerate()
                    .map(|(t, &k)| f64::from(lp[t][k as usize]))
                    .sum();
                total += lp_path.exp();
            }
        }
        -total.ln()
    }

    fn random_log_probs(t_len: usize, classes: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = crate::rng::Rng::derive(seed, 0);
        (0..t_len)
            .map(|_| {
                let z: Vec<f64> = (0..classes)
                    .map(|_| f64::from(rng.uniform(-2.0, 2.0)))
                    .collect();
                let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
                z.iter().map(|v| (v - lse) as f32).collect()
            })
            .collect()
    }

    fn ext_rows(lp: &[Vec<f32>], ext: &[u32]) -> Vec<Vec<f32>> {
        lp.iter()
            .map(|r| ext.iter().map(|&k| r[k as usize]).collect())
            .collect()
    }

    #[test]
    fn loss_equals_the_sum_over_every_path() {
        let blank = 3;
        for (labels, t_len, seed) in [
            (vec![0u32, 1], 4usize, 1u64),
            (vec![2, 2], 5, 2),
            (vec![1], 3, 3),
            (vec![0, 1, 0], 6, 4),
        ] {
            let lp = random_log_probs(t_len, 4, seed);
            let ext = extend(&labels, blank);
            let (nll, gamma) = forward_backward(&ext_rows(&lp, &ext), &ext, blank).unwrap();
            let want = brute(&lp, &labels, 4, blank);
            assert!((nll - want).abs() < 1e-5, "{labels:?}: {nll} vs {want}");
            for t in 0..t_len {
                let sum: f32 = gamma[t * ext.len()..(t + 1) * ext.len()].iter().sum();
                assert!((sum - 1.0).abs() < 1e-5, "occupancy at {t} sums to {sum}");
            }
        }
    }

    #[test]
    fn occupancies_are_the_gradient() {
        // d(−log p)/d lp[t][k] = −Σ_{s: ext[s] = k} γ[t][s], by finite differences.
        let blank = 3;
        let labels = vec![0u32, 2, 2, 1];
        let lp = random_log_probs(8, 4, 7);
        let ext = extend(&labels, blank);
        let (_, gamma) = forward_backward(&ext_rows(&lp, &ext), &ext, blank).unwrap();
        let h = 1e-3f32;
        for t in [0usize, 3, 7] {
            for k in 0..4u32 {
                let mut up = lp.clone();
                up[t][k as usize] += h;
                let mut down = lp.clone();
                down[t][k as usize] -= h;
                let f =
                    |x: &[Vec<f32>]| forward_backward(&ext_rows(x, &ext), &ext, blank).unwrap().0;
                let numeric = (f(&up) - f(&down)) / (2.0 * f64::from(h));
                let analytic: f64 = ext
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| **e == k)
                    .map(|(s, _)| -f64::from(gamma[t * ext.len() + s]))
                    .sum();
                assert!(
                    (numeric - analytic).abs() < 2e-3,
                    "t {t} k {k}: {numeric} vs {analytic}"
                );
            }
        }
    }

    #[test]
    fn impossible_alignments_are_refused() {
        let blank = 3;
        // Two equal labels need a blank between: three positions.
        let labels = vec![1u32, 1];
        assert_eq!(positions_needed(&labels), 3);
        let ext = extend(&labels, blank);
        let lp = random_log_probs(2, 4, 9);
        assert!(forward_backward(&ext_rows(&lp, &ext), &ext, blank).is_none());
        let lp = random_log_probs(3, 4, 9);
        assert!(forward_backward(&ext_rows(&lp, &ext), &ext, blank).is_some());
    }

    #[test]
    fn best_paths_collapse() {
        assert_eq!(collapse(&[9, 1, 1, 9, 1, 2, 2, 9], 9), vec![1, 1, 2]);
        assert_eq!(collapse(&[9, 9], 9), Vec::<u32>::new());
    }
}
