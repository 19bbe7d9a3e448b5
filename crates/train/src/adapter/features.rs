//! The frozen encoder's frames of each synthesised sample, computed once and
//! kept beside the training run: Whisper's encoder over the 30 s window
//! (as NEXUS-O serves it), cut to the adapter groups that cover the audio.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use nexus_models::whisper::WhisperEngine;

use crate::error::{Result, TrainError, io};
use crate::synth::{self, Manifest, SampleTask};

/// One training or validation example.
#[derive(Debug, Clone)]
pub struct Example {
    /// The synthesis record's id.
    pub id: u64,
    /// What the sample asks (a spoken question or words to transcribe).
    pub task: SampleTask,
    /// The words spoken.
    pub text: String,
    /// A spoken question's answer.
    pub answer: Option<String>,
    /// Seconds of audio.
    pub seconds: f32,
    /// Encoder frames (n · stack, d_enc).
    pub frames: Tensor,
}

/// The encoder's output (1, 1500, d) over the 30 s window that starts
/// with 16 kHz `samples` (cut to the window), as NEXUS-O serves it.
pub fn encode_window(engine: &WhisperEngine, samples: &[f32]) -> Result<Tensor> {
    use nexus_models::mel::CHUNK_SAMPLES;
    if samples.is_empty() {
        return Err(TrainError::Config("a sample with no audio".into()));
    }
    let samples = &samples[..samples.len().min(CHUNK_SAMPLES)];
    let mel = engine.mel.compute(samples, CHUNK_SAMPLES)?;
    let mel = mel.to_tensor(&engine.device)?;
    Ok(engine.encode_window(&mel, 0)?)
}

/// The adapter groups that cover `samples` samples (at least one, at most
/// a 30 s window's).
fn groups_covering(samples: usize, stack: usize) -> usize {
    use nexus_models::mel::{CHUNK_SAMPLES, HOP_LENGTH};
    let window = CHUNK_SAMPLES / (2 * HOP_LENGTH);
    samples
        .min(CHUNK_SAMPLES)
        .div_ceil(2 * stack * HOP_LENGTH)
        .clamp(1, window / stack)
}

/// Encoder frames (n · stack, d) of 16 kHz `samples`, n the adapter groups
/// that cover them (at least one, at most a 30 s window's).
pub fn encoder_frames(engine: &WhisperEngine, samples: &[f32], stack: usize) -> Result<Tensor> {
    let enc = encode_window(engine, samples)?.squeeze(0)?;
    let n = groups_covering(samples.len(), stack);
    Ok(enc.narrow(0, 0, n * stack)?.contiguous()?)
}

/// The examples of a synthesis folder, their frames computed by `engine`
/// on first use and kept in `cache` (one safetensors file per shard, named
/// after the encoder), with a callback per shard.
///
/// When the folder's recogniser is `encoder` itself, the frames it kept
/// during synthesis (`shard-NNNNN.frames.safetensors`) are taken as they are.
pub fn load_examples(
    data: &Path,
    cache: &Path,
    encoder: (&str, &str),
    engine: &WhisperEngine,
    stack: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Example>> {
    let (encoder_spec, encoder_name) = encoder;
    let manifest = Manifest::read(data)?;
    let synth_frames = manifest.listener == encoder_spec;
    std::fs::create_dir_all(cache).map_err(io(cache))?;
    let mut out = Vec::new();
    let shards = manifest.shards.len();
    for (done, s) in manifest.shards.iter().enumerate() {
        let samples = synth::read_shard(data, s.index)?;
        let file = cache.join(format!(
            "{encoder_name}-stack{stack}-{:05}.safetensors",
            s.index
        ));
        let kept = synth::shard_frames(data, s.index);
        let mut frames: HashMap<String, Tensor> = if synth_frames && kept.exists() {
            let mut cut = HashMap::new();
            let mut all = candle_core::safetensors::load(&kept, &Device::Cpu)?;
            for (r, audio) in &samples {
                let id = r.id.to_string();
                let f = all.remove(&id).ok_or_else(|| {
                    TrainError::Mismatch(format!("{}: no frames for sample {id}", kept.display()))
                })?;
                let n = groups_covering(audio.len(), stack) * stack;
                if f.dim(0)? >= n {
                    cut.insert(id, f.narrow(0, 0, n)?.contiguous()?);
                }
            }
            cut
        } else if file.exists() {
            candle_core::safetensors::load(&file, &Device::Cpu)?
        } else {
            HashMap::new()
        };
        if samples
            .iter()
            .any(|(r, _)| !frames.contains_key(&r.id.to_string()))
        {
            frames.clear();
            for (r, audio) in &samples {
                frames.insert(r.id.to_string(), encoder_frames(engine, audio, stack)?);
            }
            let tmp = file.with_extension("tmp");
            candle_core::safetensors::save(&frames, &tmp)?;
            std::fs::rename(&tmp, &file).map_err(io(&file))?;
        }
        for (r, audio) in samples {
            let f = frames.remove(&r.id.to_string()).ok_or_else(|| {
                TrainError::Mismatch(format!("{}: no frames for sample {}", file.display(), r.id))
            })?;
            out.push(Example {
                id: r.id,
                task: r.task,
                text: r.text,
                answer: r.answer,
                seconds: audio.len() as f32 / synth::voices::RATE as f32,
                frames: f,
            });
        }
        progress(done + 1, shards);
    }
    Ok(out)
}
