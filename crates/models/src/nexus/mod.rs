//! The NEXUS-O model family: Whisper encoder → adapter → Qwen2.5 language
//! model → text, and LM hidden states → audio decoder → codec codes for a
//! vocoder ([`crate::vocoder`]).
//!
//! A checkpoint is a folder (see the README, "NEXUS-O checkpoints"):
//! `config.json` ([`NexusConfig`]), `model.safetensors` with the tensors of
//! every part under `audio_encoder.`, `adapter.`, `lm.` and `audio_decoder.`,
//! and `tokenizer.json` with the audio placeholder tokens.

pub mod audio_decoder;
pub mod config;
pub mod from_gguf;
pub mod lm;
pub mod transformer;

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Linear, VarBuilder, linear};
use tokenizers::Tokenizer;

pub use audio_decoder::{AudioDecoder, SpeechCodes, delay, undelay};
pub use config::{NexusConfig, Prompts};
pub use lm::{LmSession, NexusLm};
pub use transformer::Kernels;

use crate::error::{ModelError, Result};
use crate::mel::MelFrontend;
use crate::whisper::model::Encoder as WhisperEncoder;

/// What the language model is asked to do with the audio.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NexusTask {
    /// Speech recognition, optionally told the spoken language (ISO 639-1).
    Transcribe {
        /// Spoken language, when known.
        language: Option<String>,
    },
    /// Speech translation into any language the LM writes (ISO 639-1 or a name).
    Translate {
        /// Target language.
        target: String,
    },
    /// Spoken chat: the audio is the user's turn; the answer is the reply.
    Chat,
}

/// The adapter: concatenates `stack` consecutive encoder frames into one
/// vector (1500 → 300 for a 30 s window), then linear → GELU → linear into
/// the LM's width. A trailing group of fewer than `stack` frames is dropped.
#[derive(Debug, Clone)]
pub struct Adapter {
    stack: usize,
    linear1: Linear,
    linear2: Linear,
}

impl Adapter {
    /// Loads `linear1` / `linear2` under `vb`.
    pub fn load(
        d_enc: usize,
        stack: usize,
        hidden: usize,
        d_lm: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            stack,
            linear1: linear(d_enc * stack, hidden, vb.pp("linear1"))?,
            linear2: linear(hidden, d_lm, vb.pp("linear2"))?,
        })
    }

    /// (B, T, D) encoder frames → (B, T / stack, d_lm) LM embeddings.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Kernels::Fused)
    }

    /// [`Adapter::forward`] with the chosen kernels (the differentiable one to train it).
    pub fn forward_with(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let n = t / self.stack;
        if n == 0 {
            return Err(ModelError::Input(format!(
                "{t} encoder frames are fewer than one group of {}",
                self.stack
            )));
        }
        let x = x
            .narrow(1, 0, n * self.stack)?
            .reshape((b, n, d * self.stack))?;
        let h = self.linear1.forward(&x)?;
        let h = match kernels {
            Kernels::Fused => crate::ops::gelu_erf(&h)?,
            Kernels::Differentiable => h.gelu_erf()?,
        };
        Ok(self.linear2.forward(&h)?)
    }
}

/// Text the LM produced, with the hidden states that condition speech.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Tokens, without the end-of-turn token.
    pub tokens: Vec<u32>,
    /// Decoded text.
    pub text: String,
    /// (tokens, hidden) final-norm LM states of the positions that produced each token.
    pub hidden: Tensor,
}

/// A loaded NEXUS-O checkpoint.
pub struct NexusModel {
    cfg: NexusConfig,
    encoder: WhisperEncoder,
    adapter: Adapter,
    lm: NexusLm,
    audio: Option<AudioDecoder>,
    tokenizer: Tokenizer,
    mel: MelFrontend,
    audio_token: u32,
    end_of_turn: u32,
    /// End of text, when the checkpoint names one; also stops generation.
    end_of_text: Option<u32>,
    device: Device,
    dtype: DType,
}

impl std::fmt::Debug for NexusModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NexusModel")
            .field("lm_layers", &self.cfg.lm.num_hidden_layers)
            .field("device", &self.device)
            .finish()
    }
}

fn load_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Load(format!("{}: {e}", path.display()))
}

impl NexusModel {
    /// Whether a folder holds a NEXUS-O checkpoint (its config says so).
    pub fn is_checkpoint(dir: &Path) -> bool {
        NexusConfig::read(&dir.join("config.json")).is_ok()
    }

    /// Loads a checkpoint folder on `device` (f32 on CPU, f16 on GPUs).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg = NexusConfig::read(&dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        let dtype = if device.is_cpu() {
            DType::F32
        } else {
            DType::F16
        };
        let bytes = std::fs::read(&weights).map_err(|e| load_err(&weights, e))?;
        let vb = VarBuilder::from_buffered_safetensors(bytes, dtype, device)
            .map_err(|e| load_err(&weights, e))?;
        let encoder = WhisperEncoder::load(&cfg.whisper_config(), vb.pp("audio_encoder"))
            .map_err(|e| load_err(&weights, e))?;
        let adapter = Adapter::load(
            cfg.audio_encoder.d_model,
            cfg.adapter.stack,
            cfg.adapter.hidden_size,
            cfg.lm.hidden_size,
            vb.pp("adapter"),
        )
        .map_err(|e| load_err(&weights, e))?;
        let lm = NexusLm::load(&cfg.lm, vb.pp("lm")).map_err(|e| load_err(&weights, e))?;
        let audio = cfg
            .audio_decoder
            .as_ref()
            .map(|a| AudioDecoder::load(a, cfg.lm.hidden_size, vb.pp("audio_decoder")))
            .transpose()
            .map_err(|e| load_err(&weights, e))?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| load_err(&tok_path, e))?;
        let id = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| load_err(&tok_path, format!("no {t} token")))
        };
        let audio_token = id(&cfg.tokens.audio)?;
        let end_of_turn = id(&cfg.tokens.im_end)?;
        let end_of_text = cfg.tokens.eos_id(&tokenizer);
        id(&cfg.tokens.audio_start)?;
        id(&cfg.tokens.audio_end)?;
        let mel = MelFrontend::new(cfg.audio_encoder.num_mel_bins)?;
        Ok(Self {
            cfg,
            encoder,
            adapter,
            lm,
            audio,
            tokenizer,
            mel,
            audio_token,
            end_of_turn,
            end_of_text,
            device: device.clone(),
            dtype,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &NexusConfig {
        &self.cfg
    }

    /// The log-mel frontend matching the encoder.
    pub fn mel(&self) -> &MelFrontend {
        &self.mel
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The language model.
    pub fn lm(&self) -> &NexusLm {
        &self.lm
    }

    /// The audio decoder, when the checkpoint has one (it speaks).
    pub fn audio_decoder(&self) -> Option<&AudioDecoder> {
        self.audio.as_ref()
    }

    /// The end-of-turn token (`<|im_end|>`).
    pub fn end_of_turn(&self) -> u32 {
        self.end_of_turn
    }

    /// Whether generation stops at `token` (end of turn or end of text).
    pub fn is_stop(&self, token: u32) -> bool {
        token == self.end_of_turn || self.end_of_text == Some(token)
    }

    /// Whisper encoder frames (B, T, D) of log-mel windows (B, n_mels, frames).
    pub fn encode_frames(&self, mel: &Tensor) -> Result<Tensor> {
        Ok(self.encoder.forward(&mel.to_dtype(self.dtype)?)?)
    }

    /// Audio embeddings for the LM: encoder then adapter, (B, frames/10, hidden).
    pub fn encode(&self, mel: &Tensor) -> Result<Tensor> {
        self.adapter.forward(&self.encode_frames(mel)?)
    }

    /// Log-mel (1, n_mels, frames) of 16 kHz samples, zero-padded to whole
    /// adapter frames (each is `stack` encoder frames of two mel frames) and
    /// cut at the encoder's 30 s.
    pub fn log_mel(&self, samples: &[f32]) -> Result<Tensor> {
        let per = 2 * self.cfg.adapter.stack;
        let hop = crate::mel::HOP_LENGTH;
        let frames = (samples.len() / hop).div_ceil(per).max(1) * per;
        let frames = frames.min(2 * self.cfg.audio_encoder.max_source_positions);
        let pad = (frames * hop).saturating_sub(samples.len());
        let m = self.mel.compute(samples, pad)?;
        let t = m.to_tensor(&self.device)?;
        Ok(t.narrow(2, 0, frames.min(m.frames))?)
    }

    /// Audio embeddings (n, hidden) of up to 30 s of 16 kHz samples: the
    /// window is padded to the encoder's 30 s as Whisper was trained, and
    /// only the adapter frames that cover the audio are kept.
    pub fn encode_audio(&self, samples: &[f32]) -> Result<Tensor> {
        if samples.is_empty() {
            return Err(ModelError::Input("no audio to encode".into()));
        }
        let frames = 2 * self.cfg.audio_encoder.max_source_positions;
        let samples = &samples[..samples.len().min(frames * crate::mel::HOP_LENGTH)];
        let m = self.mel.compute(samples, frames * crate::mel::HOP_LENGTH)?;
        let mel = m.to_tensor(&self.device)?.narrow(2, 0, frames)?;
        let emb = self.encode(&mel)?.squeeze(0)?;
        let per = 2 * self.cfg.adapter.stack * crate::mel::HOP_LENGTH;
        let n = samples.len().div_ceil(per).clamp(1, emb.dim(0)?);
        Ok(emb.narrow(0, 0, n)?)
    }

    /// The prompt of `task` around `n_audio` placeholders, as text.
    pub fn prompt_text(&self, task: &NexusTask, n_audio: usize) -> String {
        self.cfg.prompt_text(task, n_audio)
    }

    /// Token ids of the prompt.
    pub fn prompt_ids(&self, task: &NexusTask, n_audio: usize) -> Result<Vec<u32>> {
        prompt_ids(&self.cfg, &self.tokenizer, self.audio_token, task, n_audio)
    }

    /// Prompt embeddings with the audio (N, hidden) spliced in at the
    /// placeholders: (1, T, hidden).
    pub fn splice(&self, ids: &[u32], audio: &Tensor) -> Result<Tensor> {
        splice(&self.lm, self.audio_token, ids, audio)
    }

    /// The audio placeholder token.
    pub fn audio_token(&self) -> u32 {
        self.audio_token
    }

    /// Runs the prompt of `task` with `audio` (N, hidden) spliced in.
    pub fn start(&self, task: &NexusTask, audio: &Tensor) -> Result<LmSession> {
        let ids = self.prompt_ids(task, audio.dim(0)?)?;
        let x = self.splice(&ids, audio)?;
        self.lm.prefill(&x)
    }

    /// Text of tokens.
    pub fn decode_text(&self, tokens: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(tokens, true)
            .map_err(|e| ModelError::Input(format!("decoding tokens: {e}")))
    }

    /// Greedy decoding of up to `max_tokens` after the prompt.
    pub fn generate(
        &self,
        task: &NexusTask,
        audio: &Tensor,
        max_tokens: usize,
    ) -> Result<Generated> {
        let mut s = self.start(task, audio)?;
        let (tokens, hidden) = greedy(&self.lm, &mut s, max_tokens, |t| self.is_stop(t))?;
        let hidden = if hidden.is_empty() {
            Tensor::zeros((0, self.cfg.lm.hidden_size), self.dtype, &self.device)?
        } else {
            Tensor::stack(&hidden, 0)?
        };
        Ok(Generated {
            text: self.decode_text(&tokens)?,
            tokens,
            hidden,
        })
    }

    /// Speech codes for LM hidden states (n, hidden): frames × codebooks.
    pub fn speak(&self, hidden: &Tensor, max_frames: usize) -> Result<SpeechCodes> {
        self.audio
            .as_ref()
            .ok_or_else(|| {
                ModelError::Input(
                    "this checkpoint has no audio decoder: it writes text only".into(),
                )
            })?
            .generate(hidden, max_frames)
    }
}

/// Embeddings of `ids` (1, T, hidden) with the audio (N, hidden) spliced in
/// at the `audio_token` placeholders, one row each.
pub fn splice(lm: &NexusLm, audio_token: u32, ids: &[u32], audio: &Tensor) -> Result<Tensor> {
    let emb = lm.embed(ids)?;
    let audio = audio.to_dtype(emb.dtype())?;
    let mut pieces = Vec::new();
    let mut a = 0usize;
    let mut run = 0usize;
    for (i, id) in ids.iter().enumerate() {
        if *id == audio_token {
            if run < i {
                pieces.push(emb.narrow(0, run, i - run)?);
            }
            pieces.push(audio.i(a..a + 1)?);
            a += 1;
            run = i + 1;
        }
    }
    if run < ids.len() {
        pieces.push(emb.narrow(0, run, ids.len() - run)?);
    }
    if a != audio.dim(0)? {
        return Err(ModelError::Input(format!(
            "{} audio frames for {a} placeholders",
            audio.dim(0)?
        )));
    }
    Ok(Tensor::cat(&pieces, 0)?.unsqueeze(0)?)
}

/// Token ids of `cfg`'s prompt for `task` around `n_audio` placeholders
/// (`audio_token`), checked to hold exactly that many.
pub fn prompt_ids(
    cfg: &NexusConfig,
    tokenizer: &Tokenizer,
    audio_token: u32,
    task: &NexusTask,
    n_audio: usize,
) -> Result<Vec<u32>> {
    let enc = tokenizer
        .encode(cfg.prompt_text(task, n_audio), false)
        .map_err(|e| ModelError::Input(format!("tokenising the prompt: {e}")))?;
    let ids = enc.get_ids().to_vec();
    let found = ids.iter().filter(|i| **i == audio_token).count();
    if found != n_audio {
        return Err(ModelError::Input(format!(
            "the prompt has {found} audio placeholders for {n_audio} audio frames"
        )));
    }
    Ok(ids)
}

/// Greedy decoding of up to `max_tokens` from a started session, until a
/// token `stop` accepts: the tokens and the final-norm hidden state of the
/// position that produced each.
pub fn greedy(
    lm: &NexusLm,
    s: &mut LmSession,
    max_tokens: usize,
    stop: impl Fn(u32) -> bool,
) -> Result<(Vec<u32>, Vec<Tensor>)> {
    let mut tokens = Vec::new();
    let mut hidden = Vec::new();
    for _ in 0..max_tokens {
        let next = s.greedy()?;
        if stop(next) {
            break;
        }
        tokens.push(next);
        hidden.push(s.last_hidden().clone());
        lm.step_batch(&[next], &mut [&mut *s])?;
    }
    Ok((tokens, hidden))
}
