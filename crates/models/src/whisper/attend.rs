//! Attention of one new query per head over a sequence's keys and values, in
//! plain loops over CPU memory. A batched decoder step runs this once per
//! sequence and layer, twice (its own cache, then its audio): as tensor ops
//! it was a dozen small allocations and dispatches per sequence, which cost
//! more than the step's weight products once a batch held a few sequences.

use crate::ops::dot;

/// `q` holds H heads of `dh` values; `k` and `v` hold H blocks of `s` rows of
/// `dh` (a (H, S, dh) tensor's memory). Writes the H heads' outputs to `out`
/// (H × dh).
pub fn attend_one(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (h, s, dh): (usize, usize, usize),
    scale: f32,
    out: &mut [f32],
) {
    debug_assert!(q.len() == h * dh && out.len() == h * dh);
    debug_assert!(k.len() == h * s * dh && v.len() == h * s * dh);
    let mut scores = vec![0.0f32; s];
    for head in 0..h {
        let qh = &q[head * dh..(head + 1) * dh];
        let kh = &k[head * s * dh..(head + 1) * s * dh];
        let vh = &v[head * s * dh..(head + 1) * s * dh];
        let mut max = f32::NEG_INFINITY;
        for (score, row) in scores.iter_mut().zip(kh.chunks_exact(dh)) {
            *score = dot(qh, row) * scale;
            max = max.max(*score);
        }
        let mut sum = 0.0f32;
        for score in scores.iter_mut() {
            *score = (*score - max).exp();
            sum += *score;
        }
        let oh = &mut out[head * dh..(head + 1) * dh];
        oh.fill(0.0);
        for (w, row) in scores.iter().zip(vh.chunks_exact(dh)) {
            let w = w / sum;
            for (o, x) in oh.iter_mut().zip(row) {
                *o += w * x;
            }
        }
    }
}

/// Appends one position's keys or values (H × dh, head-major) to a cache of
/// `t` positions laid out (H, t, dh): the new (H, t + 1, dh) memory.
pub fn append_position(cache: &[f32], new: &[f32], (h, t, dh): (usize, usize, usize)) -> Vec<f32> {
    let mut out = Vec::with_capacity(h * (t + 1) * dh);
    for head in 0..h {
        out.extend_from_slice(&cache[head * t * dh..(head + 1) * t * dh]);
        out.extend_from_slice(&new[head * dh..(head + 1) * dh]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same attention written as directly as possible.
    fn naive(q: &[f32], k: &[f32], v: &[f32], h: usize, s: usize, dh: usize) -> Vec<f32> {
        let scale = (dh as f32).powf(-0.5);
        let mut out = vec![0.0; h * dh];
        for head in 0..h {
            let w: Vec<f32> = (0..s)
                .map(|j| {
                    (0..dh)
                        .map(|d| q[head * dh + d] * k[(head * s + j) * dh + d])
                        .sum::<f32>()
                        * scale
                })
                .collect();
            let m = w.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = w.iter().map(|x| (x - m).exp()).collect();
            let z: f32 = e.iter().sum();
            for d in 0..dh {
                out[head * dh + d] = (0..s).map(|j| e[j] / z * v[(head * s + j) * dh + d]).sum();
            }
        }
        out
    }

    #[test]
    fn matches_the_textbook_formula_and_appends_per_head() {
        let (h, s, dh) = (3, 7, 20);
        let val = |i: usize| ((i * 7919 % 1013) as f32 / 1013.0) - 0.5;
        let q: Vec<f32> = (0..h * dh).map(val).collect();
        let k: Vec<f32> = (0..h * s * dh).map(|i| val(i + 5)).collect();
        let v: Vec<f32> = (0..h * s * dh).map(|i| val(i + 11)).collect();
        let mut out = vec![0.0; h * dh];
        attend_one(&q, &k, &v, (h, s, dh), (dh as f32).powf(-0.5), &mut out);
        for (a, b) in out.iter().zip(naive(&q, &k, &v, h, s, dh)) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        let grown = append_position(&k, &q, (h, s, dh));
        assert_eq!(grown.len(), h * (s + 1) * dh);
        for head in 0..h {
            let row = &grown[(head * (s + 1) + s) * dh..(head * (s + 1) + s + 1) * dh];
            assert_eq!(row, &q[head * dh..(head + 1) * dh]);
            assert_eq!(
                &grown[head * (s + 1) * dh..(head * (s + 1) + s) * dh],
                &k[head * s * dh..(head + 1) * s * dh]
            );
        }
    }
}
