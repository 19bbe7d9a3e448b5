//! Who spoke when in one recording: 1.6 s windows slid over the speech
//! regions a VAD found, one GE2E embedding per window, the windows clustered
//! into speakers ([`cluster`]), and each region split between its windows'
//! speakers at the midpoints of their centres.

use std::ops::Range;

use super::cluster::{SpeakerCount, cluster, renumber};
use super::encoder::{PARTIAL_FRAMES, PARTIAL_SAMPLES, SpeakerEncoder, mean_normalized};
use super::mel::{N_MELS, SAMPLE_RATE, volume_gain};
use crate::error::Result;

/// Average-linkage similarity below which two groups of windows are
/// different speakers (chosen on the meeting set, see BENCHMARKS.md).
pub const DEFAULT_THRESHOLD: f32 = 0.65;
/// Hop between windows inside a region (0.5 s).
pub const DEFAULT_HOP: usize = 8_000;
/// The most items clustered at once; longer recordings cluster the means of
/// neighbouring windows.
pub const MAX_CLUSTER_ITEMS: usize = 2_048;
/// A speaker heard for less than this (seconds) is folded into the most
/// similar other one, unless the minimum count needs it.
pub const MIN_SPEAKER_SECONDS: f64 = 1.0;

/// How to diarize.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiarizeOptions {
    /// Speakers to find.
    pub count: SpeakerCount,
    /// Clustering threshold (cosine similarity).
    pub threshold: f32,
    /// Samples between window starts.
    pub hop: usize,
}

impl Default for DiarizeOptions {
    fn default() -> Self {
        Self {
            count: SpeakerCount::default(),
            threshold: DEFAULT_THRESHOLD,
            hop: DEFAULT_HOP,
        }
    }
}

/// One speaker's stretch of speech, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Turn {
    /// Start.
    pub start: f64,
    /// End.
    pub end: f64,
    /// Speaker index, from 0 in order of first speech.
    pub speaker: usize,
}

/// A recording's speakers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Diarization {
    /// Turns in time order, not overlapping.
    pub turns: Vec<Turn>,
    /// Speakers found.
    pub speakers: usize,
}

impl Diarization {
    /// The turns as scored segments (speakers named by their index).
    pub fn segments(&self) -> Vec<nexus_eval::der::Segment> {
        self.turns
            .iter()
            .map(|t| nexus_eval::der::Segment {
                start: t.start,
                end: t.end,
                speaker: t.speaker.to_string(),
            })
            .collect()
    }

    /// The speaker who talks most during `[start, end)` seconds, or the one of
    /// the nearest turn when none does; `None` without turns.
    pub fn speaker_at(&self, start: f64, end: f64) -> Option<usize> {
        let mut overlap = vec![0f64; self.speakers];
        for t in &self.turns {
            let o = t.end.min(end) - t.start.max(start);
            if o > 0.0 {
                overlap[t.speaker] += o;
            }
        }
        if let Some((s, _)) = overlap
            .iter()
            .enumerate()
            .filter(|(_, o)| **o > 0.0)
            .max_by(|a, b| a.1.total_cmp(b.1))
        {
            return Some(s);
        }
        let mid = (start + end) / 2.0;
        self.turns
            .iter()
            .min_by(|a, b| {
                let d = |t: &Turn| (t.start - mid).abs().min((t.end - mid).abs());
                d(a).total_cmp(&d(b))
            })
            .map(|t| t.speaker)
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    region: usize,
    start: usize,
    center: usize,
}

fn plan(regions: &[Range<usize>], total: usize, hop: usize) -> Vec<Window> {
    let hop = hop.max(HOP_MIN);
    let mut out = Vec::new();
    for (r, reg) in regions.iter().enumerate() {
        let len = reg.end.saturating_sub(reg.start);
        if len == 0 {
            continue;
        }
        if len <= PARTIAL_SAMPLES {
            let mid = reg.start + len / 2;
            let start = mid
                .saturating_sub(PARTIAL_SAMPLES / 2)
                .min(total.saturating_sub(PARTIAL_SAMPLES));
            out.push(Window {
                region: r,
                start,
                center: mid,
            });
            continue;
        }
        let last = reg.end - PARTIAL_SAMPLES;
        let mut s = reg.start;
        loop {
            out.push(Window {
                region: r,
                start: s,
                center: s + PARTIAL_SAMPLES / 2,
            });
            if s == last {
                break;
            }
            s = (s + hop).min(last);
        }
    }
    out
}

const HOP_MIN: usize = 1_600;

/// What diarizing a whole recording needs: the voice encoder and the VAD
/// that finds its speech.
pub struct Diarizer {
    /// The GE2E encoder.
    pub encoder: SpeakerEncoder,
    /// Silero VAD.
    pub vad: crate::vad::SileroVad,
}

impl std::fmt::Debug for Diarizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Diarizer").finish_non_exhaustive()
    }
}

impl Diarizer {
    /// Loads the encoder from its folder and the VAD from its safetensors file.
    pub fn load(
        encoder_dir: &std::path::Path,
        vad_file: &std::path::Path,
        device: &candle_core::Device,
    ) -> Result<Self> {
        Ok(Self {
            encoder: SpeakerEncoder::load(encoder_dir, device)?,
            vad: crate::vad::SileroVad::load(vad_file, device)?,
        })
    }

    /// Who spoke when in `samples` (16 kHz mono).
    pub fn run(&self, samples: &[f32], opts: &DiarizeOptions) -> Result<Diarization> {
        let probs = self.vad.probabilities(samples)?;
        let regions = crate::vad::speech_regions(&probs, samples.len());
        diarize(&self.encoder, samples, &regions, opts)
    }
}

/// Checks a requested speaker range (`min_speakers`, `max_speakers`, either
/// unset), naming the field and the limit when it is out of bounds.
pub fn speaker_count(
    min: Option<usize>,
    max: Option<usize>,
) -> std::result::Result<SpeakerCount, String> {
    use super::cluster::MAX_SPEAKERS;
    for (field, v) in [("min_speakers", min), ("max_speakers", max)] {
        if let Some(v) = v
            && !(1..=MAX_SPEAKERS).contains(&v)
        {
            return Err(format!("{field} is {v}; it must be 1 to {MAX_SPEAKERS}"));
        }
    }
    let (lo, hi) = (min.unwrap_or(1), max.unwrap_or(MAX_SPEAKERS));
    if lo > hi {
        return Err(format!("min_speakers ({lo}) is above max_speakers ({hi})"));
    }
    Ok(SpeakerCount { min: lo, max: hi })
}

/// Diarizes `samples` (16 kHz mono) given its speech `regions` (sample
/// ranges, sorted, not overlapping).
pub fn diarize(
    encoder: &SpeakerEncoder,
    samples: &[f32],
    regions: &[Range<usize>],
    opts: &DiarizeOptions,
) -> Result<Diarization> {
    let regions: Vec<Range<usize>> = regions
        .iter()
        .map(|r| r.start.min(samples.len())..r.end.min(samples.len()))
        .filter(|r| r.end > r.start)
        .collect();
    let windows = plan(&regions, samples.len(), opts.hop);
    if windows.is_empty() {
        return Ok(Diarization::default());
    }
    let embeds = window_embeddings(encoder, samples, &regions, &windows)?;
    let labels = label_windows(&windows, &embeds, opts);
    Ok(turns(&windows, &labels, &regions))
}

/// Live diarization of one stream: each final's windows are labelled on
/// arrival against the speakers heard so far ([`OnlineClusters`]: bounded
/// centroids, no look-back), so a final whose audio changes speaker is
/// split where its windows do.
#[derive(Debug, Clone)]
pub struct OnlineDiarizer {
    clusters: super::cluster::OnlineClusters,
    hop: usize,
}

impl OnlineDiarizer {
    /// A session's diarizer.
    pub fn new(threshold: f32, max_speakers: usize) -> Self {
        Self {
            clusters: super::cluster::OnlineClusters::new(threshold, max_speakers),
            hop: DEFAULT_HOP,
        }
    }

    /// Speakers heard so far.
    pub fn speakers(&self) -> usize {
        self.clusters.speakers()
    }

    /// The turns of `span` (sample offsets into `samples`, which holds at
    /// least the span; the stream's own offsets are `origin` + these), in
    /// stream seconds.
    pub fn label(
        &mut self,
        encoder: &SpeakerEncoder,
        samples: &[f32],
        span: Range<usize>,
        origin: usize,
    ) -> Result<Vec<Turn>> {
        let span = span.start.min(samples.len())..span.end.min(samples.len());
        if span.is_empty() {
            return Ok(Vec::new());
        }
        let regions = std::slice::from_ref(&span);
        let windows = plan(regions, samples.len(), self.hop);
        let embeds = window_embeddings(encoder, samples, regions, &windows)?;
        let mut labels: Vec<usize> = embeds.iter().map(|e| self.clusters.assign(e)).collect();
        for i in 1..labels.len().saturating_sub(1) {
            if labels[i - 1] == labels[i + 1] {
                labels[i] = labels[i - 1];
            }
        }
        let mut d = turns(&windows, &labels, regions);
        let shift = origin as f64 / f64::from(SAMPLE_RATE);
        for t in &mut d.turns {
            t.start += shift;
            t.end += shift;
        }
        Ok(d.turns)
    }
}

/// Embeddings of `windows`, loudness raised over the speech of `regions`
/// as the reference normalises a recording.
fn window_embeddings(
    encoder: &SpeakerEncoder,
    samples: &[f32],
    regions: &[Range<usize>],
    windows: &[Window],
) -> Result<Vec<Vec<f32>>> {
    // Loudness over the speech, measured in place.
    let (n, sum_sq) = regions.iter().fold((0usize, 0f64), |(n, s), r| {
        let part = &samples[r.clone()];
        (
            n + part.len(),
            s + part.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>(),
        )
    });
    let gain = volume_gain(n, sum_sq);
    // Mel frames a batch at a time, so memory stays flat however long the
    // recording (an hour is 7,200 windows).
    let mut out = Vec::with_capacity(windows.len());
    let mut buf = vec![0f32; PARTIAL_SAMPLES];
    for batch in windows.chunks(EMBED_BATCH) {
        let mut mels = Vec::with_capacity(batch.len() * PARTIAL_FRAMES * N_MELS);
        for w in batch {
            buf.fill(0.0);
            let end = (w.start + PARTIAL_SAMPLES).min(samples.len());
            for (b, s) in buf.iter_mut().zip(&samples[w.start..end]) {
                *b = s * gain;
            }
            let m = encoder.mel().compute(&buf)?;
            mels.extend_from_slice(&m[..PARTIAL_FRAMES * N_MELS]);
        }
        out.extend(encoder.embed_partials(&mels)?);
    }
    Ok(out)
}

/// Windows embedded together.
const EMBED_BATCH: usize = 64;

fn label_windows(windows: &[Window], embeds: &[Vec<f32>], opts: &DiarizeOptions) -> Vec<usize> {
    // Bound the clustering: neighbouring windows of one region are averaged
    // in groups when there are too many.
    let group = embeds.len().div_ceil(MAX_CLUSTER_ITEMS).max(1);
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, w) in windows.iter().enumerate() {
        match groups.last_mut() {
            Some(g) if g.len() < group && windows[g[0]].region == w.region => g.push(i),
            _ => groups.push(vec![i]),
        }
    }
    let items: Vec<Vec<f32>> = groups
        .iter()
        .map(|g| mean_normalized(&g.iter().map(|&i| embeds[i].clone()).collect::<Vec<_>>()))
        .collect();
    let item_labels = cluster(&items, opts.threshold, opts.count);
    let mut labels = vec![0usize; windows.len()];
    for (g, l) in groups.iter().zip(&item_labels) {
        for &i in g {
            labels[i] = *l;
        }
    }
    fold_small(&mut labels, embeds, opts.count.min, opts.hop);
    // A lone window between two of one speaker inside a region is theirs,
    // unless that would leave fewer speakers than the minimum asked for.
    let before = labels.clone();
    for i in 1..labels.len().saturating_sub(1) {
        let (p, n) = (labels[i - 1], labels[i + 1]);
        if p == n
            && labels[i] != p
            && windows[i - 1].region == windows[i].region
            && windows[i + 1].region == windows[i].region
        {
            labels[i] = p;
        }
    }
    let distinct = |l: &[usize]| l.iter().collect::<std::collections::HashSet<_>>().len();
    if distinct(&labels) < opts.count.min.min(distinct(&before)) {
        labels = before;
    }
    renumber(&labels)
}

/// Folds speakers heard for under [`MIN_SPEAKER_SECONDS`] into the most
/// similar remaining one while more than `min` speakers remain.
fn fold_small(labels: &mut [usize], embeds: &[Vec<f32>], min: usize, hop: usize) {
    let secs_per_window = hop as f64 / f64::from(SAMPLE_RATE);
    let k = labels.iter().max().map_or(0, |m| m + 1);
    let dim = embeds.first().map_or(0, Vec::len);
    // Each speaker's window count and embedding sum (its centroid's
    // direction), kept up to date as speakers are folded.
    let mut counts = vec![0usize; k];
    let mut sums = vec![vec![0f32; dim]; k];
    for (l, e) in labels.iter().zip(embeds) {
        counts[*l] += 1;
        for (a, b) in sums[*l].iter_mut().zip(e) {
            *a += b;
        }
    }
    let unit = |v: &[f32]| {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter()
            .map(|x| if n > 0.0 { x / n } else { 0.0 })
            .collect::<Vec<f32>>()
    };
    loop {
        let live: Vec<usize> = (0..k).filter(|s| counts[*s] > 0).collect();
        if live.len() <= min.max(1) {
            break;
        }
        let Some(&small) = live
            .iter()
            .filter(|s| counts[**s] as f64 * secs_per_window < MIN_SPEAKER_SECONDS)
            .min_by_key(|s| counts[**s])
        else {
            break;
        };
        let c = unit(&sums[small]);
        let similarity =
            |s: usize| -> f32 { unit(&sums[s]).iter().zip(&c).map(|(x, y)| x * y).sum() };
        let Some(&to) = live
            .iter()
            .filter(|s| **s != small)
            .max_by(|a, b| similarity(**a).total_cmp(&similarity(**b)))
        else {
            break;
        };
        let moved = std::mem::take(&mut sums[small]);
        for (a, b) in sums[to].iter_mut().zip(&moved) {
            *a += b;
        }
        sums[small] = vec![0.0; dim];
        counts[to] += counts[small];
        counts[small] = 0;
        for l in labels.iter_mut() {
            if *l == small {
                *l = to;
            }
        }
    }
}

fn turns(windows: &[Window], labels: &[usize], regions: &[Range<usize>]) -> Diarization {
    let sr = f64::from(SAMPLE_RATE);
    let mut turns: Vec<Turn> = Vec::new();
    let mut i = 0;
    while i < windows.len() {
        let r = windows[i].region;
        let mut j = i;
        while j < windows.len() && windows[j].region == r {
            j += 1;
        }
        let reg = &regions[r];
        for k in i..j {
            let from = if k == i {
                reg.start
            } else {
                (windows[k - 1].center + windows[k].center) / 2
            };
            let to = if k + 1 == j {
                reg.end
            } else {
                (windows[k].center + windows[k + 1].center) / 2
            };
            let (start, end) = (from as f64 / sr, to as f64 / sr);
            match turns.last_mut() {
                Some(t) if t.speaker == labels[k] && (start - t.end).abs() < 1e-9 => t.end = end,
                _ => turns.push(Turn {
                    start,
                    end,
                    speaker: labels[k],
                }),
            }
        }
        i = j;
    }
    let speakers = labels.iter().max().map_or(0, |m| m + 1);
    Diarization { turns, speakers }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speaker_counts_are_checked_at_the_edge() {
        assert_eq!(
            speaker_count(None, None).unwrap(),
            SpeakerCount { min: 1, max: 32 }
        );
        assert_eq!(
            speaker_count(Some(2), Some(2)).unwrap(),
            SpeakerCount { min: 2, max: 2 }
        );
        assert!(
            speaker_count(Some(0), None)
                .unwrap_err()
                .contains("min_speakers is 0")
        );
        assert!(
            speaker_count(None, Some(33))
                .unwrap_err()
                .contains("max_speakers is 33; it must be 1 to 32")
        );
        assert!(
            speaker_count(Some(3), Some(2))
                .unwrap_err()
                .contains("above max_speakers")
        );
        assert!(speaker_count(None, Some(1_000_000_000)).is_err());
    }

    #[test]
    fn windows_cover_each_region_and_short_ones_get_context() {
        let regions = vec![0..16_000, 20_000..60_000];
        let w = plan(&regions, 80_000, 8_000);
        // Region 0 (1 s) is shorter than a window: one, centred on it, clamped at 0.
        assert_eq!((w[0].region, w[0].start), (0, 0));
        // Region 1 (2.5 s): starts 20000, 28000, 34400 (= end - window).
        let r1: Vec<usize> = w
            .iter()
            .filter(|w| w.region == 1)
            .map(|w| w.start)
            .collect();
        assert_eq!(r1, vec![20_000, 28_000, 34_400]);
    }

    #[test]
    fn turns_split_regions_between_windows() {
        let regions: Vec<Range<usize>> = std::iter::once(0..48_000).collect();
        let w = plan(&regions, 48_000, 8_000);
        let labels: Vec<usize> = w.iter().map(|w| usize::from(w.center > 24_000)).collect();
        let d = turns(&w, &labels, &regions);
        assert_eq!(d.speakers, 2);
        assert_eq!(d.turns.len(), 2);
        assert_eq!(d.turns[0].start, 0.0);
        assert_eq!(d.turns[1].end, 3.0);
        assert_eq!(d.speaker_at(2.9, 3.0), Some(1));
        assert_eq!(d.speaker_at(0.0, 0.2), Some(0));
        // Outside every turn: the nearest.
        assert_eq!(d.speaker_at(5.0, 5.5), Some(1));
        assert_eq!(Diarization::default().speaker_at(0.0, 1.0), None);
    }
}
