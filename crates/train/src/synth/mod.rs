//! `nexus data synth`: text in, speech and transcripts out, after the
//! NEXUS-O paper's synthesis pipeline. Each candidate utterance is spoken by
//! one of every voice at hand ([`voices`]) at a drawn speed and pitch, put in
//! a drawn room with noise and a loudness ([`augment`]), resampled to
//! 16 kHz, then filtered: length and energy, and a round trip through a
//! recogniser within a word error rate ([`filter`]). A share of the
//! candidates are spoken questions with rule-checked answers ([`qa`]).
//!
//! Everything about candidate `i` is drawn from the seed and `i` alone, so
//! a run is deterministic and a shard can be made again on its own. Output:
//! `shard-NNNNN.pcm` (16 kHz mono 16-bit little-endian, the kept samples
//! back to back), `shard-NNNNN.jsonl` (one [`Record`] per candidate, kept
//! or not) and `manifest.json` ([`Manifest`]), rewritten after each shard.
//! A run resumes where the manifest ends; a folder made with other settings
//! is refused.

pub mod augment;
pub mod filter;
pub mod qa;
pub mod text;
pub mod voices;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use augment::Conditions;
pub use filter::{Filters, Heard, Listener, Rejection, WhisperListener};
pub use text::{TextFormat, TextSource};
pub use voices::{Rendition, Voices};

use crate::error::{Result, TrainError, io, read_json, write_json};
use crate::rng::Rng;

/// The manifest's format tag.
pub const FORMAT: &str = "nexus-synth/1";
/// Most candidates one run may ask for.
pub const MAX_SAMPLES: usize = 10_000_000;
/// Most candidates in one shard.
pub const MAX_SHARD: usize = 100_000;

/// Everything that decides a run's output (with the text, voices and recogniser).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SynthConfig {
    /// Seed of every draw.
    pub seed: u64,
    /// Candidate utterances in all (kept or dropped by the filters).
    pub samples: usize,
    /// Candidates per shard.
    pub shard_size: usize,
    /// Fewest words of a text utterance.
    pub min_words: usize,
    /// Most words of a text utterance.
    pub max_words: usize,
    /// Share of candidates Piper speaks when it is loaded (the rest: espeak-ng voices).
    pub piper_share: f32,
    /// Speed range (relative).
    pub speed: (f32, f32),
    /// Pitch range (relative).
    pub pitch: (f32, f32),
    /// Speech level range, RMS dBFS.
    pub level_dbfs: (f32, f32),
    /// Chance of a room.
    pub reverb_share: f32,
    /// RT60 range of rooms, seconds.
    pub rt60: (f32, f32),
    /// Chance of background noise.
    pub noise_share: f32,
    /// Speech-to-noise range, dB.
    pub snr_db: (f32, f32),
    /// Share of candidates that are spoken questions.
    pub question_share: f32,
    /// The quality filters.
    pub filters: Filters,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            samples: 1000,
            shard_size: 100,
            min_words: 4,
            max_words: 20,
            piper_share: 0.4,
            speed: (0.85, 1.2),
            pitch: (0.85, 1.2),
            level_dbfs: (-32.0, -16.0),
            reverb_share: 0.3,
            rt60: (0.15, 0.7),
            noise_share: 0.5,
            snr_db: (10.0, 35.0),
            question_share: 0.05,
            filters: Filters::default(),
        }
    }
}

fn range_in(field: &str, r: (f32, f32), lo: f32, hi: f32) -> Result<()> {
    if !(r.0.is_finite() && r.1.is_finite() && lo <= r.0 && r.0 <= r.1 && r.1 <= hi) {
        return Err(TrainError::Config(format!(
            "{field}: {}..{} must lie within {lo}..{hi}, low end first",
            r.0, r.1
        )));
    }
    Ok(())
}

fn share_in(field: &str, p: f32) -> Result<()> {
    range_in(field, (p, p), 0.0, 1.0)
}

impl SynthConfig {
    /// Checks every bound; the error names the field and its limit.
    pub fn check(&self) -> Result<()> {
        let count = |field: &str, v: usize, lo: usize, hi: usize| {
            if v < lo || v > hi {
                Err(TrainError::Config(format!(
                    "{field}: {v} is outside {lo}..={hi}"
                )))
            } else {
                Ok(())
            }
        };
        count("samples", self.samples, 1, MAX_SAMPLES)?;
        count("shard_size", self.shard_size, 1, MAX_SHARD)?;
        count("min_words", self.min_words, 1, 60)?;
        count("max_words", self.max_words, self.min_words, 60)?;
        share_in("piper_share", self.piper_share)?;
        range_in("speed", self.speed, 0.5, 2.0)?;
        range_in("pitch", self.pitch, 0.5, 2.0)?;
        range_in("level_dbfs", self.level_dbfs, -60.0, 0.0)?;
        share_in("reverb_share", self.reverb_share)?;
        range_in("rt60", self.rt60, 0.05, 2.0)?;
        share_in("noise_share", self.noise_share)?;
        range_in("snr_db", self.snr_db, -10.0, 60.0)?;
        share_in("question_share", self.question_share)?;
        let f = &self.filters;
        range_in(
            "min_seconds..max_seconds",
            (f.min_seconds, f.max_seconds),
            0.1,
            30.0,
        )?;
        range_in("min_dbfs", (f.min_dbfs, f.min_dbfs), -120.0, 0.0)?;
        share_in("max_clipped", f.max_clipped)?;
        if !(0.0..=1.0).contains(&f.max_wer) {
            return Err(TrainError::Config(format!(
                "max_wer: {} is outside 0..=1",
                f.max_wer
            )));
        }
        Ok(())
    }

    /// How many shards the run makes.
    pub fn shards(&self) -> usize {
        self.samples.div_ceil(self.shard_size)
    }
}

/// What a candidate asks of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleTask {
    /// Say the words.
    Transcribe,
    /// Answer the spoken question.
    Answer,
}

/// One candidate: what was said, how, and what the filters found.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// Candidate number, unique in the run.
    pub id: u64,
    /// Whether the filters kept it (its audio is in the shard).
    pub kept: bool,
    /// Why it was dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<Rejection>,
    /// What the model is asked.
    pub task: SampleTask,
    /// The words spoken.
    pub text: String,
    /// The answer to a spoken question.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// Voice, speed, pitch.
    pub rendition: Rendition,
    /// Room, level and noise.
    pub conditions: Conditions,
    /// First sample in the shard's PCM, when kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Sample count (16 kHz), when the signal was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<u64>,
    /// What the recogniser heard, when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heard: Option<String>,
    /// The round trip's word error rate, when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wer: Option<f64>,
}

/// What one shard holds.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardSummary {
    /// Shard number.
    pub index: usize,
    /// Candidates tried.
    pub candidates: usize,
    /// Candidates kept.
    pub kept: usize,
    /// Seconds of kept audio.
    pub seconds: f64,
    /// Dropped candidates by reason.
    pub rejected: BTreeMap<String, usize>,
}

/// The text a run read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TextInfo {
    /// File name.
    pub name: String,
    /// SHA-256 of the file.
    pub sha256: String,
    /// Utterances cut from it.
    pub utterances: usize,
}

/// `manifest.json`: the run's settings and its finished shards.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// The settings.
    pub config: SynthConfig,
    /// The text.
    pub text: TextInfo,
    /// Every voice, as [`Voices::names`].
    pub voices: Vec<String>,
    /// The round trip's recogniser.
    pub listener: String,
    /// Finished shards, in order.
    pub shards: Vec<ShardSummary>,
}

impl Manifest {
    /// Reads `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        read_json(&dir.join("manifest.json"))
    }

    fn write(&self, dir: &Path) -> Result<()> {
        write_json(&dir.join("manifest.json"), self)
    }

    /// Whether every shard is done.
    pub fn complete(&self) -> bool {
        self.shards.len() == self.config.shards()
    }

    /// Kept samples and seconds over all finished shards.
    pub fn kept(&self) -> (usize, f64) {
        self.shards
            .iter()
            .fold((0, 0.0), |(n, s), x| (n + x.kept, s + x.seconds))
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Seconds of 16-bit model-rate PCM bytes.
fn pcm_seconds(pcm: &[u8]) -> f64 {
    (pcm.len() / 2) as f64 / f64::from(voices::RATE)
}

/// The PCM file of shard `index`.
pub fn shard_pcm(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("shard-{index:05}.pcm"))
}

/// The recogniser's encoder frames of shard `index`'s kept samples, by id.
pub fn shard_frames(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("shard-{index:05}.frames.safetensors"))
}

/// The records file of shard `index`.
pub fn shard_records(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("shard-{index:05}.jsonl"))
}

/// The kept samples of shard `index`: records and 16 kHz audio.
pub fn read_shard(dir: &Path, index: usize) -> Result<Vec<(Record, Vec<f32>)>> {
    let rp = shard_records(dir, index);
    let pp = shard_pcm(dir, index);
    let lines = std::fs::read_to_string(&rp).map_err(io(&rp))?;
    let pcm = std::fs::read(&pp).map_err(io(&pp))?;
    let mut out = Vec::new();
    for line in lines.lines().filter(|l| !l.trim().is_empty()) {
        let r: Record = serde_json::from_str(line).map_err(|source| TrainError::Json {
            path: rp.display().to_string(),
            source,
        })?;
        if let (true, Some(off), Some(n)) = (r.kept, r.offset, r.samples) {
            let (a, b) = (2 * off as usize, 2 * (off + n) as usize);
            let bytes = pcm.get(a..b).ok_or_else(|| {
                TrainError::Mismatch(format!(
                    "{}: sample {} lies past the end",
                    pp.display(),
                    r.id
                ))
            })?;
            let audio = bytes
                .chunks_exact(2)
                .map(|c| f32::from(i16::from_le_bytes([c[0], c[1]])) / 32768.0)
                .collect();
            out.push((r, audio));
        }
    }
    Ok(out)
}

/// Where a run stands, for a progress line.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Shards finished (this run and before).
    pub shards_done: usize,
    /// Shards in all.
    pub shards: usize,
    /// Candidates tried by this invocation.
    pub tried: usize,
    /// Candidates this invocation has left to try (of the shards it will make).
    pub left: usize,
    /// Kept samples so far, all shards.
    pub kept: usize,
    /// Kept seconds so far, all shards.
    pub seconds: f64,
    /// Seconds this invocation has run.
    pub elapsed: f64,
}

/// A run's inputs.
pub struct Synth<'a> {
    /// The settings.
    pub config: SynthConfig,
    /// The text.
    pub text: &'a TextSource,
    /// The voices.
    pub voices: &'a Voices,
    /// The round trip's recogniser and its name.
    pub listener: (&'a mut dyn Listener, String),
}

impl std::fmt::Debug for Synth<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Synth")
            .field("config", &self.config)
            .field("listener", &self.listener.1)
            .finish_non_exhaustive()
    }
}

impl Synth<'_> {
    /// Makes the shards `out` still lacks, at most `budget` of them in this
    /// call, and returns the manifest.
    pub fn run(
        &mut self,
        out: &Path,
        budget: Option<usize>,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Manifest> {
        self.config.check()?;
        std::fs::create_dir_all(out).map_err(io(out))?;
        let fresh = Manifest {
            format: FORMAT.into(),
            config: self.config.clone(),
            text: TextInfo {
                name: self.text.name.clone(),
                sha256: self.text.sha256.clone(),
                utterances: self.text.utterances.len(),
            },
            voices: self.voices.names(),
            listener: self.listener.1.clone(),
            shards: Vec::new(),
        };
        let mut manifest = if out.join("manifest.json").exists() {
            let old = Manifest::read(out)?;
            same_run(&old, &fresh, out)?;
            old
        } else {
            fresh.write(out)?;
            fresh
        };
        // A shard whose files are gone or cut short is made again.
        let intact = |s: &ShardSummary| {
            let pcm = std::fs::metadata(shard_pcm(out, s.index)).map(|m| m.len());
            let want = (s.seconds * f64::from(voices::RATE)).round() as u64 * 2;
            shard_records(out, s.index).exists() && pcm.is_ok_and(|n| n == want)
        };
        manifest.shards.retain(|s| intact(s));
        let done: std::collections::BTreeSet<usize> =
            manifest.shards.iter().map(|s| s.index).collect();
        let todo: Vec<usize> = (0..self.config.shards())
            .filter(|i| !done.contains(i))
            .take(budget.unwrap_or(usize::MAX))
            .collect();
        let order = self.order();
        let t0 = Instant::now();
        let mut tried = 0;
        let mut left: usize = todo.iter().map(|i| self.shard_range(*i).len()).sum();
        for index in todo {
            // Kept samples and seconds of the shards finished before this one.
            let before = manifest.kept();
            let mut pcm = Vec::new();
            let mut frames = std::collections::HashMap::new();
            let mut lines = String::new();
            let mut summary = ShardSummary {
                index,
                candidates: 0,
                kept: 0,
                seconds: 0.0,
                rejected: BTreeMap::new(),
            };
            for id in self.shard_range(index) {
                let r = self.candidate(
                    id as u64,
                    &order,
                    (pcm.len() / 2) as u64,
                    &mut pcm,
                    &mut frames,
                )?;
                summary.candidates += 1;
                if r.kept {
                    summary.kept += 1;
                } else if let Some(why) = r.rejected {
                    *summary.rejected.entry(why.name().to_string()).or_default() += 1;
                }
                lines.push_str(
                    &serde_json::to_string(&r).map_err(|source| TrainError::Json {
                        path: out.display().to_string(),
                        source,
                    })?,
                );
                lines.push('\n');
                tried += 1;
                left -= 1;
                progress(&Progress {
                    shards_done: manifest.shards.len(),
                    shards: self.config.shards(),
                    tried,
                    left,
                    kept: before.0 + summary.kept,
                    seconds: before.1 + pcm_seconds(&pcm),
                    elapsed: t0.elapsed().as_secs_f64(),
                });
            }
            summary.seconds = pcm_seconds(&pcm);
            // The recogniser's encoder frames of the kept samples, for training.
            let frames_file = shard_frames(out, index);
            if frames.is_empty() {
                let _ = std::fs::remove_file(&frames_file);
            } else {
                let tmp = frames_file.with_extension("tmp");
                candle_core::safetensors::save(&frames, &tmp)?;
                std::fs::rename(&tmp, &frames_file).map_err(io(&frames_file))?;
            }
            write_atomic(&shard_pcm(out, index), &pcm)?;
            write_atomic(&shard_records(out, index), lines.as_bytes())?;
            manifest.shards.push(summary);
            manifest.shards.sort_by_key(|s| s.index);
            manifest.write(out)?;
        }
        Ok(manifest)
    }

    fn shard_range(&self, index: usize) -> std::ops::Range<usize> {
        let s = self.config.shard_size;
        index * s..((index + 1) * s).min(self.config.samples)
    }

    /// The text utterances in the seed's order.
    fn order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.text.utterances.len()).collect();
        Rng::new(self.config.seed).shuffle(&mut order);
        order
    }

    /// Makes candidate `id`; a kept one's audio is appended to `pcm` and
    /// the recogniser's frames of it (if any) put in `frames`.
    fn candidate(
        &mut self,
        id: u64,
        order: &[usize],
        offset: u64,
        pcm: &mut Vec<u8>,
        frames: &mut std::collections::HashMap<String, candle_core::Tensor>,
    ) -> Result<Record> {
        let c = &self.config;
        let mut rng = Rng::derive(c.seed, id);
        let (task, text, answer) = if rng.chance(c.question_share) {
            let q = qa::question(&mut rng);
            (SampleTask::Answer, q.question, Some(q.answer))
        } else {
            let u = order[id as usize % order.len()];
            (
                SampleTask::Transcribe,
                self.text.utterances[u].clone(),
                None,
            )
        };
        let rendition = Rendition {
            voice: self.voices.choose(&mut rng, c.piper_share),
            speed: rng.uniform(c.speed.0, c.speed.1),
            pitch: rng.uniform(c.pitch.0, c.pitch.1),
        };
        let conditions = augment::draw(
            &mut rng,
            c.level_dbfs,
            c.reverb_share,
            c.rt60,
            c.noise_share,
            c.snr_db,
        );
        let mut record = Record {
            id,
            kept: false,
            rejected: None,
            task,
            text,
            answer,
            rendition,
            conditions,
            offset: None,
            samples: None,
            heard: None,
            wer: None,
        };
        let mut audio = match self
            .voices
            .render(&record.text, &record.rendition, rng.next_u64())
        {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(id, error = %e, "synthesis failed");
                record.rejected = Some(Rejection::Unspeakable);
                return Ok(record);
            }
        };
        augment::trim(&mut audio, (voices::RATE / 10) as usize);
        let clipped = augment::apply(&mut audio, &record.conditions, voices::RATE, &mut rng);
        record.samples = Some(audio.len() as u64);
        if let Some(why) = c.filters.check_signal(&audio, voices::RATE, clipped) {
            record.rejected = Some(why);
            return Ok(record);
        }
        let heard = self.listener.0.hear(&audio)?;
        let (wer, why) = c.filters.check_round_trip(&record.text, &heard.text);
        record.heard = Some(heard.text);
        record.wer = Some(wer);
        if let Some(why) = why {
            record.rejected = Some(why);
            return Ok(record);
        }
        record.kept = true;
        record.offset = Some(offset);
        if let Some(f) = heard.frames {
            frames.insert(id.to_string(), f);
        }
        pcm.extend(nexus_audio::wav::pcm16_le(&audio));
        Ok(record)
    }
}

/// Refuses to resume a folder made with other settings, naming what differs.
fn same_run(old: &Manifest, new: &Manifest, dir: &Path) -> Result<()> {
    let mut diff = Vec::new();
    if old.format != new.format {
        diff.push(format!(
            "format {} (this build writes {})",
            old.format, new.format
        ));
    }
    if old.config != new.config {
        diff.push("settings".to_string());
    }
    if old.text != new.text {
        diff.push(format!(
            "text {} {}",
            old.text.name,
            &old.text.sha256[..12.min(old.text.sha256.len())]
        ));
    }
    if old.voices != new.voices {
        diff.push(format!(
            "voices ({} there, {} now)",
            old.voices.len(),
            new.voices.len()
        ));
    }
    if old.listener != new.listener {
        diff.push(format!("recogniser {}", old.listener));
    }
    if diff.is_empty() {
        Ok(())
    } else {
        Err(TrainError::Mismatch(format!(
            "{} was made with other {}: use another folder, or the same settings to resume",
            dir.display(),
            diff.join(", ")
        )))
    }
}
