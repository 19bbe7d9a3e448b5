//! The diarization meeting set: recordings assembled from real human speech
//! of different readers (fetched by `scripts/fetch-testdata.sh`), with
//! exact reference turns, because every turn is placed where it is by
//! construction.
//!
//! Readers, and which clips share one: `austen` reads all five LibriVox
//! clips (one chapter of one LibriVox recording); `spk1` and `spk2` are
//! SpeechBrain's two ASR test readers (six sentences each); `lj` is the LJ
//! Speech reader; `en1` and `en5` are the two English examples SpeechBrain's
//! annotation labels spk01 and spk05; `fr2` is its French example (spk02).
//!
//! Each clip is trimmed of leading and trailing silence (20 ms frames under
//! -40 dB of the clip's loudest frame), so a reference turn starts and ends
//! with speech. A turn is one or more clips of one reader 0.25 s apart; turns
//! are separated by 0.6 s of silence.

/// A clip of the test data, 16 kHz after loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clip {
    /// Path under the test-data folder.
    pub path: &'static str,
    /// Who reads it.
    pub reader: &'static str,
}

const fn c(path: &'static str, reader: &'static str) -> Clip {
    Clip { path, reader }
}

macro_rules! austen {
    ($n:literal) => {
        c(
            concat!("librivox/sense_and_sensibility_01_austen_64kb-", $n, ".wav"),
            "austen",
        )
    };
}
macro_rules! sb {
    ($spk:literal, $n:literal) => {
        c(concat!("speechbrain/ASR/", $spk, "_snt", $n, ".wav"), $spk)
    };
}

const LJ: Clip = c("speechbrain/TTS/LJ050-0131.wav", "lj");
const EN1: Clip = c("speechbrain/lang/English/example1.wav", "en1");
const EN5: Clip = c("speechbrain/lang/English/example5.wav", "en5");
const FR2: Clip = c("speechbrain/lang/French/example2.flac", "fr2");

/// One recording: turns of clips.
#[derive(Debug, Clone, Copy)]
pub struct Meeting {
    /// Name printed in reports.
    pub name: &'static str,
    /// Turns, each one reader's clips.
    pub turns: &'static [&'static [Clip]],
}

impl Meeting {
    /// Distinct readers.
    pub fn speakers(&self) -> usize {
        let mut r: Vec<&str> = self
            .turns
            .iter()
            .flat_map(|t| t.iter().map(|c| c.reader))
            .collect();
        r.sort_unstable();
        r.dedup();
        r.len()
    }
}

/// Silence between clips of one turn (seconds).
pub const CLIP_GAP: f64 = 0.25;
/// Silence between turns (seconds).
pub const TURN_GAP: f64 = 0.6;

/// The set, from one speaker to four.
pub const MEETINGS: &[Meeting] = &[
    Meeting {
        name: "one-reader",
        turns: &[
            &[austen!("0870")],
            &[austen!("0880")],
            &[austen!("0890")],
            &[austen!("0920")],
            &[austen!("0930")],
        ],
    },
    Meeting {
        name: "two-readers",
        turns: &[
            &[austen!("0870")],
            &[sb!("spk1", "1"), sb!("spk1", "2")],
            &[austen!("0890")],
            &[sb!("spk1", "3"), sb!("spk1", "4")],
            &[austen!("0920")],
            &[sb!("spk1", "5"), sb!("spk1", "6")],
        ],
    },
    Meeting {
        name: "two-short-turns",
        turns: &[
            &[sb!("spk1", "1")],
            &[sb!("spk2", "1"), sb!("spk2", "2")],
            &[sb!("spk1", "2")],
            &[sb!("spk2", "3"), sb!("spk2", "4")],
            &[sb!("spk1", "3")],
            &[sb!("spk2", "5"), sb!("spk2", "6")],
            &[sb!("spk1", "4")],
        ],
    },
    Meeting {
        name: "three-readers",
        turns: &[
            &[austen!("0880"), austen!("0930")],
            &[sb!("spk2", "1"), sb!("spk2", "2")],
            &[LJ],
            &[austen!("0890")],
            &[sb!("spk2", "3"), sb!("spk2", "4")],
            &[austen!("0920")],
        ],
    },
    Meeting {
        name: "four-readers",
        turns: &[
            &[sb!("spk1", "1"), sb!("spk1", "2")],
            &[austen!("0870")],
            &[sb!("spk2", "1"), sb!("spk2", "2")],
            &[LJ],
            &[sb!("spk1", "3"), sb!("spk1", "4")],
            &[austen!("0890")],
            &[sb!("spk2", "3"), sb!("spk2", "4")],
        ],
    },
    Meeting {
        name: "english-french",
        turns: &[
            &[EN1],
            &[FR2],
            &[EN5],
            &[sb!("spk1", "5"), sb!("spk1", "6")],
            &[FR2],
            &[EN1],
        ],
    },
];

/// An assembled recording and its reference.
#[derive(Debug, Clone)]
pub struct Built {
    /// 16 kHz mono.
    pub samples: Vec<f32>,
    /// Reference turns: one per clip, named by reader.
    pub reference: Vec<crate::der::Segment>,
}

/// `clip` without its leading and trailing silence.
pub fn trim(clip: &[f32]) -> &[f32] {
    const FRAME: usize = 320;
    let energy: Vec<f32> = clip
        .chunks(FRAME)
        .map(|f| f.iter().map(|x| x * x).sum::<f32>() / f.len() as f32)
        .collect();
    let peak = energy.iter().copied().fold(0.0, f32::max);
    let floor = peak * 1e-4; // -40 dB
    let Some(first) = energy.iter().position(|e| *e > floor) else {
        return &clip[..0];
    };
    let last = energy.iter().rposition(|e| *e > floor).unwrap_or(first);
    &clip[first * FRAME..((last + 1) * FRAME).min(clip.len())]
}

/// Assembles `meeting` from clips `load` reads (16 kHz mono samples).
pub fn build<E>(
    meeting: &Meeting,
    mut load: impl FnMut(&Clip) -> Result<Vec<f32>, E>,
) -> Result<Built, E> {
    let sr = 16_000f64;
    let gap = |s: f64| vec![0f32; (s * sr) as usize];
    let mut samples = gap(0.5);
    let mut reference = Vec::new();
    for (t, turn) in meeting.turns.iter().enumerate() {
        if t > 0 {
            samples.extend(gap(TURN_GAP));
        }
        for (k, clip) in turn.iter().enumerate() {
            if k > 0 {
                samples.extend(gap(CLIP_GAP));
            }
            let audio = load(clip)?;
            let speech = trim(&audio);
            let start = samples.len() as f64 / sr;
            samples.extend_from_slice(speech);
            reference.push(crate::der::Segment {
                start,
                end: samples.len() as f64 / sr,
                speaker: clip.reader.to_string(),
            });
        }
    }
    samples.extend(gap(0.5));
    Ok(Built { samples, reference })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_spans_one_to_four_readers_and_turns_are_long_enough() {
        let counts: Vec<usize> = MEETINGS.iter().map(Meeting::speakers).collect();
        assert_eq!(counts, vec![1, 2, 2, 3, 4, 4]);
        // Build with synthetic 2 s clips (speech in the middle 1.5 s).
        let fake = |_: &Clip| -> Result<Vec<f32>, ()> {
            let mut v = vec![0f32; 32_000];
            for (i, x) in v[4_000..28_000].iter_mut().enumerate() {
                *x = ((i as f32) * 0.1).sin() * 0.3;
            }
            Ok(v)
        };
        let b = build(&MEETINGS[1], fake).unwrap();
        assert_eq!(b.reference.len(), 9);
        let first = &b.reference[0];
        assert!((first.start - 0.5).abs() < 0.03 && (first.end - first.start - 1.5).abs() < 0.03);
        assert!(b.reference.windows(2).all(|w| w[1].start > w[0].end));
    }
}
