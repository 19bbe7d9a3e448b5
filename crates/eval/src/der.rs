//! Diarization error rate as NIST's md-eval scores it: over the scored time
//! (everything except a collar on each side of every reference boundary),
//! `(missed speech + false alarm + speaker confusion) / reference speech`,
//! with hypothesis speakers mapped one-to-one onto reference speakers so as
//! to maximise their overlap. Time is counted in 10 ms frames.

use std::collections::BTreeMap;

/// One labelled stretch of speech, in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// Start.
    pub start: f64,
    /// End.
    pub end: f64,
    /// Speaker name.
    pub speaker: String,
}

/// The parts of a diarization error rate, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Der {
    /// Reference speech scored.
    pub total: f64,
    /// Reference speech the hypothesis had no speaker for.
    pub missed: f64,
    /// Hypothesis speech where the reference has none.
    pub false_alarm: f64,
    /// Speech given to the wrong speaker.
    pub confusion: f64,
}

impl Der {
    /// The error rate (0 when there is no reference speech and no errors).
    pub fn rate(&self) -> f64 {
        let e = self.missed + self.false_alarm + self.confusion;
        if self.total > 0.0 {
            e / self.total
        } else if e > 0.0 {
            1.0
        } else {
            0.0
        }
    }
}

impl std::ops::Add for Der {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            total: self.total + o.total,
            missed: self.missed + o.missed,
            false_alarm: self.false_alarm + o.false_alarm,
            confusion: self.confusion + o.confusion,
        }
    }
}

const FRAME: f64 = 0.01;

fn frame(t: f64) -> usize {
    (t / FRAME).round().max(0.0) as usize
}

fn names(segs: &[Segment]) -> Vec<String> {
    let mut v: Vec<String> = segs.iter().map(|s| s.speaker.clone()).collect();
    v.sort();
    v.dedup();
    v
}

/// Frames → set of speaker indices active there.
fn activity(segs: &[Segment], speakers: &[String], frames: usize) -> Vec<Vec<usize>> {
    let mut a = vec![Vec::new(); frames];
    for s in segs {
        let k = speakers.iter().position(|n| *n == s.speaker).unwrap_or(0);
        for f in a
            .iter_mut()
            .take(frame(s.end).min(frames))
            .skip(frame(s.start))
        {
            if !f.contains(&k) {
                f.push(k);
            }
        }
    }
    a
}

/// The speaker mapping (hypothesis → reference) with the largest total
/// overlap: the reference's speakers are few, so every assignment is tried
/// when there are up to eight of either, and greedily beyond.
pub fn best_mapping(overlap: &[Vec<f64>]) -> BTreeMap<usize, usize> {
    let nh = overlap.len();
    let nr = overlap.first().map_or(0, Vec::len);
    let mut best = (f64::NEG_INFINITY, BTreeMap::new());
    if nh <= 8 && nr <= 8 {
        fn go(
            h: usize,
            overlap: &[Vec<f64>],
            used: &mut Vec<bool>,
            cur: &mut BTreeMap<usize, usize>,
            score: f64,
            best: &mut (f64, BTreeMap<usize, usize>),
        ) {
            if h == overlap.len() {
                if score > best.0 {
                    *best = (score, cur.clone());
                }
                return;
            }
            // Unmapped.
            go(h + 1, overlap, used, cur, score, best);
            for r in 0..used.len() {
                if !used[r] {
                    used[r] = true;
                    cur.insert(h, r);
                    go(h + 1, overlap, used, cur, score + overlap[h][r], best);
                    cur.remove(&h);
                    used[r] = false;
                }
            }
        }
        go(
            0,
            overlap,
            &mut vec![false; nr],
            &mut BTreeMap::new(),
            0.0,
            &mut best,
        );
        return best.1;
    }
    let mut pairs: Vec<(f64, usize, usize)> = (0..nh)
        .flat_map(|h| (0..nr).map(move |r| (h, r)))
        .map(|(h, r)| (overlap[h][r], h, r))
        .collect();
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut map = BTreeMap::new();
    let mut used_r = vec![false; nr];
    for (o, h, r) in pairs {
        if o > 0.0 && !map.contains_key(&h) && !used_r[r] {
            map.insert(h, r);
            used_r[r] = true;
        }
    }
    map
}

/// Scores `hypothesis` against `reference` with a `collar` (seconds) around
/// every reference boundary left unscored; returns the error parts and the
/// mapping used (hypothesis speaker → reference speaker).
pub fn der(
    reference: &[Segment],
    hypothesis: &[Segment],
    collar: f64,
) -> (Der, BTreeMap<String, String>) {
    let end = reference
        .iter()
        .chain(hypothesis)
        .map(|s| s.end)
        .fold(0.0, f64::max);
    let frames = frame(end) + 1;
    let (rn, hn) = (names(reference), names(hypothesis));
    let (ra, ha) = (
        activity(reference, &rn, frames),
        activity(hypothesis, &hn, frames),
    );
    let mut scored = vec![true; frames];
    let c = frame(collar);
    for s in reference {
        for b in [frame(s.start), frame(s.end)] {
            for f in scored
                .iter_mut()
                .take((b + c).min(frames))
                .skip(b.saturating_sub(c))
            {
                *f = false;
            }
        }
    }
    let mut overlap = vec![vec![0f64; rn.len()]; hn.len()];
    for f in 0..frames {
        if scored[f] {
            for &h in &ha[f] {
                for &r in &ra[f] {
                    overlap[h][r] += FRAME;
                }
            }
        }
    }
    let map = best_mapping(&overlap);
    let mut d = Der::default();
    for f in 0..frames {
        if !scored[f] {
            continue;
        }
        let (nr, nh) = (ra[f].len(), ha[f].len());
        let correct = ha[f]
            .iter()
            .filter(|h| map.get(h).is_some_and(|r| ra[f].contains(r)))
            .count();
        d.total += nr as f64 * FRAME;
        d.missed += nr.saturating_sub(nh) as f64 * FRAME;
        d.false_alarm += nh.saturating_sub(nr) as f64 * FRAME;
        d.confusion += (nr.min(nh) - correct.min(nr.min(nh))) as f64 * FRAME;
    }
    let names = map
        .iter()
        .map(|(h, r)| (hn[*h].clone(), rn[*r].clone()))
        .collect();
    (d, names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(start: f64, end: f64, speaker: &str) -> Segment {
        Segment {
            start,
            end,
            speaker: speaker.into(),
        }
    }

    #[test]
    fn identical_up_to_names_is_zero() {
        let r = [seg(0.0, 3.0, "alice"), seg(3.5, 6.0, "bob")];
        let h = [seg(0.0, 3.0, "1"), seg(3.5, 6.0, "0")];
        let (d, map) = der(&r, &h, 0.25);
        assert_eq!(d.rate(), 0.0);
        assert_eq!(map["1"], "alice");
    }

    #[test]
    fn each_error_kind_is_counted_outside_the_collar() {
        let r = [seg(0.0, 4.0, "a"), seg(4.0, 8.0, "b")];
        // One speaker for all: the second half is confusion.
        let (d, _) = der(&r, &[seg(0.0, 8.0, "x")], 0.0);
        assert!((d.confusion - 4.0).abs() < 0.02, "{d:?}");
        assert!((d.rate() - 0.5).abs() < 0.01);
        // Nothing said: all missed.
        let (d, _) = der(&r, &[], 0.0);
        assert!((d.missed - 8.0).abs() < 0.02);
        // Speech where there is none.
        let (d, _) = der(
            &r,
            &[seg(0.0, 4.0, "x"), seg(4.0, 8.0, "y"), seg(9.0, 10.0, "y")],
            0.0,
        );
        assert!((d.false_alarm - 1.0).abs() < 0.02, "{d:?}");
        // A boundary 0.2 s late is forgiven by a 0.25 s collar, not without one.
        let h = [seg(0.0, 4.2, "x"), seg(4.2, 8.0, "y")];
        assert_eq!(der(&r, &h, 0.25).0.rate(), 0.0);
        assert!(der(&r, &h, 0.0).0.rate() > 0.02);
    }

    #[test]
    fn mapping_maximises_overlap() {
        let m = best_mapping(&[vec![1.0, 5.0], vec![4.0, 0.5]]);
        assert_eq!(m[&0], 1);
        assert_eq!(m[&1], 0);
    }
}
