//! Word timestamps from cross-attention, after OpenAI's `timing.py`: the
//! alignment heads' attention over audio frames is standardised per frame,
//! median-filtered in time, averaged over heads, and aligned to the tokens by
//! dynamic time warping; word boundaries fall where the path jumps to a new token.

use candle_core::{IndexOp, Tensor};

use super::model::Whisper;
use super::tokenizer::WhisperTokenizer;
use crate::error::Result;

/// A word with its time span (seconds from the window start) and probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TimedWord {
    /// The word, with its leading space.
    pub word: String,
    /// Start, seconds.
    pub start: f32,
    /// End, seconds.
    pub end: f32,
    /// Mean probability of its tokens.
    pub probability: f32,
}

/// Encoder frames per second of audio (20 ms each).
const FRAMES_PER_SECOND: f32 = 50.0;
const MEDIAN_WIDTH: usize = 7;

/// Minimum-cost monotonic path through `cost` (rows x cols), as (row, col) pairs.
pub fn dtw(cost: &[f32], rows: usize, cols: usize) -> Vec<(usize, usize)> {
    let w = cols + 1;
    let mut acc = vec![f32::INFINITY; (rows + 1) * w];
    let mut trace = vec![0u8; (rows + 1) * w];
    acc[0] = 0.0;
    for j in 1..=cols {
        for i in 1..=rows {
            let c0 = acc[(i - 1) * w + j - 1];
            let c1 = acc[(i - 1) * w + j];
            let c2 = acc[i * w + j - 1];
            let (c, t) = if c0 < c1 && c0 < c2 {
                (c0, 0)
            } else if c1 < c0 && c1 < c2 {
                (c1, 1)
            } else {
                (c2, 2)
            };
            acc[i * w + j] = cost[(i - 1) * cols + j - 1] + c;
            trace[i * w + j] = t;
        }
    }
    trace[..=cols].fill(2);
    for i in 0..=rows {
        trace[i * w] = 1;
    }
    let (mut i, mut j) = (rows, cols);
    let mut path = Vec::new();
    while i > 0 || j > 0 {
        path.push((i.wrapping_sub(1), j.wrapping_sub(1)));
        match trace[i * w + j] {
            0 => {
                i -= 1;
                j -= 1;
            }
            1 => i -= 1,
            _ => j -= 1,
        }
    }
    path.reverse();
    path
}

fn median_filter(row: &[f32], width: usize) -> Vec<f32> {
    let half = width / 2;
    let n = row.len();
    if n <= half {
        return row.to_vec();
    }
    let at = |i: isize| -> f32 {
        // Reflect padding, as the reference does.
        let j = if i < 0 {
            -i
        } else if i >= n as isize {
            2 * (n as isize - 1) - i
        } else {
            i
        };
        row[j as usize]
    };
    let mut window = vec![0f32; width];
    (0..n)
        .map(|i| {
            for (k, w) in window.iter_mut().enumerate() {
                *w = at(i as isize + k as isize - half as isize);
            }
            window.sort_by(f32::total_cmp);
            window[half]
        })
        .collect()
}

/// Whether `language` (ISO 639-1) is written without spaces between words.
pub fn written_without_spaces(language: &str) -> bool {
    matches!(language, "zh" | "ja" | "th" | "lo" | "my" | "yue")
}

/// Splits text tokens into words: by leading space and punctuation, or per
/// character for languages written without spaces.
pub fn split_words(
    tok: &WhisperTokenizer,
    tokens: &[u32],
    language: &str,
) -> (Vec<String>, Vec<Vec<u32>>) {
    // Group tokens until they decode to whole characters.
    let mut units: Vec<(String, Vec<u32>)> = Vec::new();
    let mut current = Vec::new();
    for &t in tokens {
        current.push(t);
        let text = tok.decode(&current).unwrap_or_default();
        if !text.contains('\u{FFFD}') {
            units.push((text, std::mem::take(&mut current)));
        }
    }
    if !current.is_empty() {
        units.push((tok.decode(&current).unwrap_or_default(), current));
    }
    if written_without_spaces(language) {
        return units.into_iter().unzip();
    }
    let mut words: Vec<String> = Vec::new();
    let mut groups: Vec<Vec<u32>> = Vec::new();
    for (text, toks) in units {
        let trimmed = text.trim();
        let punct = !trimmed.is_empty() && trimmed.chars().all(|c| c.is_ascii_punctuation());
        let special = toks.first().is_some_and(|t| *t >= tok.specials.eot);
        if special || text.starts_with(' ') || punct || words.is_empty() {
            words.push(text);
            groups.push(toks);
        } else if let (Some(w), Some(g)) = (words.last_mut(), groups.last_mut()) {
            w.push_str(&text);
            g.extend(toks);
        }
    }
    (words, groups)
}

/// Aligns `text_tokens` decoded from one window to its audio. `prefix` is the
/// `<|startoftranscript|>` sequence used for decoding; `frames` the number of
/// mel frames that hold audio (100 per second).
pub fn align(
    model: &Whisper,
    tok: &WhisperTokenizer,
    audio: &Tensor,
    prefix: &[u32],
    text_tokens: &[u32],
    frames: usize,
    language: &str,
) -> Result<Vec<TimedWord>> {
    if text_tokens.is_empty() || model.config.alignment_heads.is_empty() {
        return Ok(Vec::new());
    }
    let s = &tok.specials;
    let mut tokens = prefix.to_vec();
    tokens.push(s.no_timestamps);
    tokens.extend(text_tokens);
    tokens.push(s.eot);
    let mut state = model.decoder.start(audio)?;
    let input = Tensor::new(tokens.as_slice(), audio.device())?.unsqueeze(0)?;
    let out = model.decoder.forward(&input, &mut state, true)?;

    // Probability of each text token where it was predicted.
    let logits: Vec<Vec<f32>> = out.logits.i(0)?.to_vec2()?;
    let probs: Vec<f32> = text_tokens
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let row = &logits[prefix.len() + i][..s.eot as usize];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = row.iter().map(|l| (l - max).exp()).sum();
            row.get(t as usize).map_or(0.0, |l| (l - max).exp() / z)
        })
        .collect();

    let n_frames = (frames / 2).clamp(1, model.config.max_source_positions);
    let t = tokens.len();
    let mut matrix = vec![0f32; t * n_frames];
    let heads = &model.config.alignment_heads;
    for &[layer, head] in heads {
        let Some(w) = out.cross_attention.get(layer) else {
            continue;
        };
        let w: Vec<Vec<f32>> = w.i((0, head))?.to_vec2()?;
        // Renormalise over the frames that hold audio.
        let mut rows: Vec<Vec<f32>> = w
            .iter()
            .map(|r| {
                let sum: f32 = r[..n_frames].iter().sum::<f32>().max(1e-12);
                r[..n_frames].iter().map(|x| x / sum).collect()
            })
            .collect();
        // Standardise each frame over tokens.
        for f in 0..n_frames {
            let mean = rows.iter().map(|r| r[f]).sum::<f32>() / t as f32;
            let var = rows.iter().map(|r| (r[f] - mean).powi(2)).sum::<f32>() / t as f32;
            let std = var.sqrt().max(1e-12);
            for r in &mut rows {
                r[f] = (r[f] - mean) / std;
            }
        }
        for (i, r) in rows.iter().enumerate() {
            for (f, v) in median_filter(r, MEDIAN_WIDTH).into_iter().enumerate() {
                matrix[i * n_frames + f] += v / heads.len() as f32;
            }
        }
    }
    // Rows of <|notimestamps|> and the text tokens.
    let first = prefix.len();
    let rows = text_tokens.len() + 1;
    let cost: Vec<f32> = matrix[first * n_frames..(first + rows) * n_frames]
        .iter()
        .map(|v| -v)
        .collect();
    let path = dtw(&cost, rows, n_frames);

    let mut with_eot = text_tokens.to_vec();
    with_eot.push(s.eot);
    let (words, groups) = split_words(tok, &with_eot, language);
    if groups.len() <= 1 {
        return Ok(Vec::new());
    }
    // Times at which the path first reaches each row.
    let mut jump_times = Vec::new();
    let mut prev_row = usize::MAX;
    for &(r, c) in &path {
        if r != prev_row {
            jump_times.push(c as f32 / FRAMES_PER_SECOND);
            prev_row = r;
        }
    }
    let mut boundaries = vec![0usize];
    for g in &groups[..groups.len() - 1] {
        boundaries.push(boundaries.last().copied().unwrap_or(0) + g.len());
    }
    let mut out = Vec::new();
    for (k, word) in words.iter().enumerate().take(groups.len() - 1) {
        let (a, b) = (boundaries[k], boundaries[k + 1]);
        let start = jump_times.get(a).copied().unwrap_or(0.0);
        let end = jump_times.get(b).copied().unwrap_or(start);
        let p = &probs[a.min(probs.len())..b.min(probs.len())];
        out.push(TimedWord {
            word: word.clone(),
            start,
            end,
            probability: if p.is_empty() {
                0.0
            } else {
                p.iter().sum::<f32>() / p.len() as f32
            },
        });
    }
    Ok(merge_punctuation(out))
}

/// Attaches opening punctuation to the next word and closing punctuation to the
/// previous one. Only the text moves: a word keeps its own times, since the
/// span aligned to a punctuation token usually covers the pause around it.
fn merge_punctuation(words: Vec<TimedWord>) -> Vec<TimedWord> {
    const OPEN: &str = "\"'“¿([{-";
    const CLOSE: &str = "\"'.。,，!！?？:：”)]}、";
    let mut out: Vec<TimedWord> = Vec::new();
    let mut pending: Option<TimedWord> = None;
    for mut w in words {
        let t = w.word.trim().to_owned();
        if !t.is_empty() && t.chars().all(|c| OPEN.contains(c)) && w.word.starts_with(' ') {
            pending = Some(w);
            continue;
        }
        if let Some(p) = pending.take() {
            w.word = format!("{}{}", p.word, w.word.trim_start());
            w.word.insert(0, ' ');
        }
        if !t.is_empty()
            && t.chars().all(|c| CLOSE.contains(c))
            && !w.word.starts_with(' ')
            && let Some(prev) = out.last_mut()
        {
            prev.word.push_str(&w.word);
            continue;
        }
        out.push(w);
    }
    out.extend(pending);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtw_follows_the_cheap_diagonal() {
        // 3 tokens over 6 frames; token k is cheap on frames 2k..2k+1.
        let mut cost = vec![1.0f32; 18];
        for k in 0..3 {
            cost[k * 6 + 2 * k] = 0.0;
            cost[k * 6 + 2 * k + 1] = 0.0;
        }
        let path = dtw(&cost, 3, 6);
        assert_eq!(path.first(), Some(&(0, 0)));
        assert_eq!(path.last(), Some(&(2, 5)));
        let first_frame: Vec<usize> = (0..3)
            .map(|r| path.iter().find(|(i, _)| *i == r).unwrap().1)
            .collect();
        assert_eq!(first_frame, vec![0, 2, 4]);
    }

    #[test]
    fn median_filter_removes_spikes() {
        let row = [0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let f = median_filter(&row, 7);
        assert_eq!(f[3], 0.0);
        assert_eq!(f.len(), row.len());
    }

    #[test]
    fn punctuation_joins_neighbours() {
        let w = |s: &str, a: f32, b: f32| TimedWord {
            word: s.into(),
            start: a,
            end: b,
            probability: 1.0,
        };
        let merged = merge_punctuation(vec![
            w(" Hello", 0.0, 0.5),
            w(",", 0.5, 0.6),
            w(" world", 0.7, 1.0),
            w(".", 1.0, 1.1),
        ]);
        assert_eq!(
            merged.iter().map(|w| w.word.as_str()).collect::<Vec<_>>(),
            [" Hello,", " world."]
        );
        // The comma's span (the pause) does not stretch the word.
        assert_eq!((merged[0].end, merged[1].end), (0.5, 1.0));
    }
}
