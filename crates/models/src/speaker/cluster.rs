//! Grouping voice embeddings into speakers: agglomerative clustering with
//! average linkage on cosine similarity, stopped by a similarity threshold
//! and held between a minimum and a maximum number of speakers.

/// How many speakers to find.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpeakerCount {
    /// At least this many (1 when unknown).
    pub min: usize,
    /// At most this many.
    pub max: usize,
}

impl Default for SpeakerCount {
    fn default() -> Self {
        Self {
            min: 1,
            max: MAX_SPEAKERS,
        }
    }
}

/// The most speakers a recording may be given or found to have.
pub const MAX_SPEAKERS: usize = 32;

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Clusters unit `embeddings`; returns one label per embedding, numbered
/// from 0 in order of first appearance.
///
/// Merges the two most similar clusters while their average similarity is
/// at least `threshold` and more than `count.min` clusters remain, and past
/// the threshold while more than `count.max` remain. `O(n²)` memory: callers
/// keep `n` bounded.
pub fn cluster(embeddings: &[Vec<f32>], threshold: f32, count: SpeakerCount) -> Vec<usize> {
    let n = embeddings.len();
    if n == 0 {
        return Vec::new();
    }
    let min = count.min.max(1);
    let max = count.max.max(min);
    // Similarity matrix, kept up to date for live clusters (Lance-Williams
    // update for average linkage).
    let mut sim = vec![0f32; n * n];
    for i in 0..n {
        for j in i + 1..n {
            let s = dot(&embeddings[i], &embeddings[j]);
            sim[i * n + j] = s;
            sim[j * n + i] = s;
        }
    }
    let mut size = vec![1usize; n];
    let mut alive = vec![true; n];
    let mut owner: Vec<usize> = (0..n).collect();
    let mut clusters = n;
    // Each live cluster's most similar other live cluster.
    let best_of = |i: usize, sim: &[f32], alive: &[bool]| -> Option<(usize, f32)> {
        (0..n)
            .filter(|&j| j != i && alive[j])
            .map(|j| (j, sim[i * n + j]))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    };
    let mut best: Vec<Option<(usize, f32)>> = (0..n).map(|i| best_of(i, &sim, &alive)).collect();
    while clusters > min {
        let Some((a, (b, s))) = (0..n)
            .filter(|&i| alive[i])
            .filter_map(|i| best[i].map(|b| (i, b)))
            .max_by(|x, y| x.1.1.total_cmp(&y.1.1))
        else {
            break;
        };
        if s < threshold && clusters <= max {
            break;
        }
        // Merge b into a.
        let (na, nb) = (size[a] as f32, size[b] as f32);
        for k in 0..n {
            if alive[k] && k != a && k != b {
                let v = (na * sim[a * n + k] + nb * sim[b * n + k]) / (na + nb);
                sim[a * n + k] = v;
                sim[k * n + a] = v;
            }
        }
        size[a] += size[b];
        alive[b] = false;
        for o in owner.iter_mut() {
            if *o == b {
                *o = a;
            }
        }
        clusters -= 1;
        for k in 0..n {
            if !alive[k] {
                best[k] = None;
                continue;
            }
            let stale = k == a || matches!(best[k], Some((j, _)) if j == a || j == b);
            if stale {
                best[k] = best_of(k, &sim, &alive);
            } else if let Some((_, bs)) = best[k] {
                let v = sim[k * n + a];
                if v > bs {
                    best[k] = Some((a, v));
                }
            }
        }
    }
    renumber(&owner)
}

/// Labels numbered from 0 in order of first appearance.
pub fn renumber(labels: &[usize]) -> Vec<usize> {
    let mut map = std::collections::HashMap::new();
    labels
        .iter()
        .map(|l| {
            let next = map.len();
            *map.entry(*l).or_insert(next)
        })
        .collect()
}

/// Incremental clustering for live streams: each embedding joins the most
/// similar centroid when it is similar enough, or starts a new speaker while
/// fewer than `max` are known; centroids are running means. Memory is bounded
/// by `max` centroids whatever the session's length.
#[derive(Debug, Clone)]
pub struct OnlineClusters {
    threshold: f32,
    max: usize,
    centroids: Vec<(Vec<f32>, usize)>,
}

impl OnlineClusters {
    /// Empty, finding at most `max` speakers.
    pub fn new(threshold: f32, max: usize) -> Self {
        Self {
            threshold,
            max: max.clamp(1, MAX_SPEAKERS),
            centroids: Vec::new(),
        }
    }

    /// Speakers found so far.
    pub fn speakers(&self) -> usize {
        self.centroids.len()
    }

    /// The speaker of `embed` (a unit vector); updates that speaker's centroid.
    pub fn assign(&mut self, embed: &[f32]) -> usize {
        let best = self
            .centroids
            .iter()
            .enumerate()
            .map(|(i, (c, _))| (i, cosine(c, embed)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let label = match best {
            Some((i, s)) if s >= self.threshold || self.centroids.len() >= self.max => i,
            _ => {
                self.centroids.push((vec![0.0; embed.len()], 0));
                self.centroids.len() - 1
            }
        };
        let (c, k) = &mut self.centroids[label];
        *k += 1;
        let w = 1.0 / *k as f32;
        for (a, b) in c.iter_mut().zip(embed) {
            *a += (b - *a) * w;
        }
        label
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let n = (dot(a, a) * dot(b, b)).sqrt();
    if n > 0.0 { dot(a, b) / n } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn two_directions_make_two_speakers() {
        let e: Vec<Vec<f32>> = [
            [1.0, 0.1, 0.0],
            [0.0, 1.0, 0.1],
            [1.0, 0.0, 0.1],
            [0.1, 1.0, 0.0],
            [0.9, 0.1, 0.1],
        ]
        .iter()
        .map(|v| unit(v))
        .collect();
        assert_eq!(
            cluster(&e, 0.8, SpeakerCount::default()),
            vec![0, 1, 0, 1, 0]
        );
        // Forced to one, or allowed only one.
        let one = SpeakerCount { min: 1, max: 1 };
        assert_eq!(cluster(&e, 0.8, one), vec![0; 5]);
        // Forced to three although two would do.
        let three = SpeakerCount { min: 3, max: 3 };
        let l = cluster(&e, 0.8, three);
        assert_eq!(l.iter().max(), Some(&2));
        assert!(cluster(&[], 0.5, SpeakerCount::default()).is_empty());
    }

    #[test]
    fn online_clusters_are_bounded() {
        let mut o = OnlineClusters::new(0.8, 2);
        assert_eq!(o.assign(&unit(&[1.0, 0.0, 0.0])), 0);
        assert_eq!(o.assign(&unit(&[0.0, 1.0, 0.0])), 1);
        assert_eq!(o.assign(&unit(&[0.95, 0.05, 0.0])), 0);
        // A third voice, but only two are allowed: the nearest takes it.
        let l = o.assign(&unit(&[0.0, 0.0, 1.0]));
        assert!(l < 2);
        assert_eq!(o.speakers(), 2);
    }
}
