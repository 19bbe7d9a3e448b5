//! `nexus train adapter`: the NEXUS-O paper's first training stage. The
//! Whisper encoder and the Qwen2.5 language model stay frozen; only the
//! adapter (five encoder frames concatenated → linear → GELU → linear into
//! the LM's width) learns, so that the LM, given the adapted audio in the
//! paper's prompt format, writes what was said.
//!
//! The loss is the cross-entropy of the reply (the transcript and the end of
//! the turn) given the prompt with the audio spliced in, back-propagated
//! through the frozen LM ([`Kernels::Differentiable`]) into the adapter.
//! AdamW with warm-up and cosine decay ([`optim`]), gradient accumulation
//! over a batch, clipping by global norm, checkpoints that hold the whole
//! state (training resumes bit for bit), and validation WER by greedy
//! decoding.

pub mod ctc;
pub mod export;
pub mod features;
pub mod optim;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use nexus_models::nexus::config::{AdapterConfig, EncoderConfig, LmConfig, Tokens};
use nexus_models::nexus::{
    Adapter, Kernels, NexusConfig, NexusLm, NexusTask, Prompts, greedy, prompt_ids, splice,
};
use tokenizers::Tokenizer;

pub use ctc::CtcHead;
pub use features::Example;
pub use optim::{AdamW, Schedule};

use crate::error::{Result, TrainError, io, read_json, write_json};
use crate::rng::Rng;

/// NEXUS-mini's special tokens, in Qwen2.5's vocabulary: the vision
/// markers and pad stand for audio (their embeddings stay as trained; the
/// adapter learns to fill the placeholders).
pub fn mini_tokens() -> Tokens {
    Tokens {
        audio: "<|image_pad|>".into(),
        audio_start: "<|vision_start|>".into(),
        audio_end: "<|vision_end|>".into(),
        im_start: "<|im_start|>".into(),
        im_end: "<|im_end|>".into(),
        eos: Some("<|endoftext|>".into()),
    }
}

/// The frozen language model with its tokenizer and the checkpoint's configuration.
pub struct Frozen {
    /// The language model (f32, no variables: it carries no gradient of its own).
    pub lm: NexusLm,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// The NEXUS-O configuration the adapter is trained for.
    pub config: NexusConfig,
    audio_token: u32,
    end_of_turn: u32,
}

impl std::fmt::Debug for Frozen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frozen")
            .field("lm", &self.config.lm.num_hidden_layers)
            .finish_non_exhaustive()
    }
}

impl Frozen {
    /// Builds the frozen part from LM tensors (Hugging Face names), its
    /// tokenizer, the encoder's dimensions and the adapter's.
    pub fn new(
        lm_config: LmConfig,
        tensors: HashMap<String, Tensor>,
        tokenizer: Tokenizer,
        encoder: EncoderConfig,
        adapter: AdapterConfig,
    ) -> Result<Self> {
        let device = Device::Cpu;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let lm = NexusLm::load(&lm_config, vb)?;
        let config = NexusConfig {
            model_type: "nexus-o".into(),
            audio_encoder: encoder,
            adapter,
            lm: lm_config,
            // NEXUS-mini trains no speech decoder: it writes text only.
            audio_decoder: None,
            tokens: mini_tokens(),
            prompts: Prompts::default(),
            vocoder: None,
        };
        let id = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| TrainError::Config(format!("the tokenizer has no {t} token")))
        };
        let audio_token = id(&config.tokens.audio)?;
        let end_of_turn = id(&config.tokens.im_end)?;
        id(&config.tokens.audio_start)?;
        id(&config.tokens.audio_end)?;
        Ok(Self {
            lm,
            tokenizer,
            config,
            audio_token,
            end_of_turn,
        })
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| TrainError::Config(format!("tokenising {text:?}: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// Prompt ids of `task` with `n` audio placeholders.
    pub fn prompt_ids(&self, task: &NexusTask, n: usize) -> Result<Vec<u32>> {
        Ok(prompt_ids(
            &self.config,
            &self.tokenizer,
            self.audio_token,
            task,
            n,
        )?)
    }

    /// The reply's ids: the text, then the end of the turn.
    pub fn reply_ids(&self, text: &str, max_tokens: usize) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        ids.truncate(max_tokens);
        ids.push(self.end_of_turn);
        Ok(ids)
    }
}

/// What the adapter learns from.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Objective {
    /// The paper's: the cross-entropy of the reply through the frozen LM.
    #[default]
    Reply,
    /// CTC of the adapted positions against the LM's token embeddings at
    /// a temperature ([`ctc`]): a cheap alignment before the reply loss.
    Ctc {
        /// τ in `log p(v | a) ∝ −‖a − E_v‖² / τ`.
        temperature: f64,
    },
}

/// A training run's settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// What the adapter learns from.
    #[serde(default)]
    pub objective: Objective,
    /// Seed of the adapter's initial weights and of the data order.
    pub seed: u64,
    /// Examples per optimiser step (their gradients are averaged).
    pub batch: usize,
    /// Examples per forward pass (padded into one batch); the step's
    /// gradients accumulate over `batch / micro_batch` passes.
    pub micro_batch: usize,
    /// The optimiser and its schedule (`schedule.steps` is the run's length).
    pub schedule: Schedule,
    /// Largest global gradient norm (larger ones are scaled down).
    pub clip_norm: f64,
    /// Save a checkpoint every this many steps (and at the end).
    pub checkpoint_every: u64,
    /// Measure validation WER every this many steps (and at the end).
    pub validate_every: u64,
    /// Validation examples decoded each time.
    pub validation_samples: usize,
    /// Most reply tokens trained per example.
    pub max_reply_tokens: usize,
}

impl Default for TrainConfig {
    /// `nexus train adapter`'s defaults.
    fn default() -> Self {
        Self {
            objective: Objective::Reply,
            seed: 1,
            batch: 8,
            micro_batch: 1,
            schedule: Schedule {
                lr: 1e-3,
                min_lr: 1e-5,
                warmup: 100,
                steps: 2000,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
            },
            clip_norm: 1.0,
            checkpoint_every: 100,
            validate_every: 100,
            validation_samples: 20,
            max_reply_tokens: 96,
        }
    }
}

impl TrainConfig {
    /// Checks every bound; the error names the field.
    pub fn check(&self) -> Result<()> {
        let s = &self.schedule;
        let bad = |field: &str, why: String| Err(TrainError::Config(format!("{field}: {why}")));
        if let Objective::Ctc { temperature } = self.objective
            && !(temperature.is_finite() && temperature > 0.0 && temperature <= 1e6)
        {
            return bad(
                "ctc_temperature",
                format!("{temperature} is outside (0, 1000000]"),
            );
        }
        if !(1..=4096).contains(&self.batch) {
            return bad("batch", format!("{} is outside 1..=4096", self.batch));
        }
        if !(1..=64).contains(&self.micro_batch) {
            return bad(
                "micro_batch",
                format!("{} is outside 1..=64", self.micro_batch),
            );
        }
        if !(1..=10_000_000).contains(&s.steps) {
            return bad("steps", format!("{} is outside 1..=10000000", s.steps));
        }
        if s.warmup > s.steps {
            return bad(
                "warmup",
                format!("{} is more than the {} steps", s.warmup, s.steps),
            );
        }
        if !(s.lr > 0.0 && s.lr <= 1.0 && (0.0..=s.lr).contains(&s.min_lr)) {
            return bad(
                "lr",
                format!(
                    "{} (min {}) must satisfy 0 < min_lr ≤ lr ≤ 1",
                    s.lr, s.min_lr
                ),
            );
        }
        let betas = (0.0..1.0).contains(&s.beta1) && (0.0..1.0).contains(&s.beta2);
        if !(betas && s.eps.is_finite() && s.eps > 0.0 && s.eps < 1.0) {
            return bad(
                "betas",
                "β₁, β₂ must lie in [0, 1) and ε be positive".into(),
            );
        }
        if !(0.0..=1.0).contains(&s.weight_decay) {
            return bad(
                "weight_decay",
                format!("{} is outside 0..=1", s.weight_decay),
            );
        }
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0 && self.clip_norm < 1e9) {
            return bad("clip_norm", format!("{} must be positive", self.clip_norm));
        }
        if self.checkpoint_every == 0 || self.validate_every == 0 {
            return bad(
                "checkpoint_every",
                "checkpoint and validation intervals must be at least 1".into(),
            );
        }
        if self.validation_samples > 100_000 {
            return bad(
                "validation_samples",
                format!("{} is more than 100000", self.validation_samples),
            );
        }
        if !(1..=1024).contains(&self.max_reply_tokens) {
            return bad(
                "max_reply_tokens",
                format!("{} is outside 1..=1024", self.max_reply_tokens),
            );
        }
        Ok(())
    }
}

/// What one optimiser step did.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepReport {
    /// Step number (1-based).
    pub step: u64,
    /// Mean loss of the batch (nats per reply token).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Examples seen so far.
    pub examples: u64,
    /// Hours of audio seen so far.
    pub hours: f64,
}

/// The adapter being trained, with its optimiser.
pub struct AdapterTrainer {
    config: TrainConfig,
    adapter: Adapter,
    /// The CTC classifier when the objective is CTC.
    ctc: Option<CtcHead>,
    opt: AdamW,
    examples: u64,
    hours: f64,
}

impl std::fmt::Debug for AdapterTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterTrainer")
            .field("step", &self.opt.steps_taken())
            .finish_non_exhaustive()
    }
}

/// Names of the adapter's tensors in a NEXUS-O checkpoint (under `adapter.`).
const PARAMS: [&str; 4] = [
    "linear1.bias",
    "linear1.weight",
    "linear2.bias",
    "linear2.weight",
];

impl AdapterTrainer {
    /// A new adapter for `frozen`, its weights drawn from the seed as
    /// PyTorch's `nn.Linear` draws them (uniform in ±1/√fan_in).
    pub fn new(frozen: &Frozen, config: TrainConfig) -> Result<Self> {
        config.check()?;
        let c = &frozen.config;
        let d_in = c.audio_encoder.d_model * c.adapter.stack;
        let (hidden, d_lm) = (c.adapter.hidden_size, c.lm.hidden_size);
        let mut rng = Rng::derive(config.seed, u64::MAX);
        let mut draw = |shape: (usize, usize), fan_in: usize| {
            let b = 1.0 / (fan_in as f32).sqrt();
            let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.uniform(-b, b)).collect();
            Tensor::from_vec(v, shape, &Device::Cpu)
        };
        let init: HashMap<&str, Tensor> = [
            ("linear1.weight", draw((hidden, d_in), d_in)?),
            ("linear1.bias", draw((1, hidden), d_in)?.squeeze(0)?),
            ("linear2.weight", draw((d_lm, hidden), hidden)?),
            ("linear2.bias", draw((1, d_lm), hidden)?.squeeze(0)?),
        ]
        .into_iter()
        .collect();
        Self::from_weights(frozen, config, &init)
    }

    /// An adapter with given weights (checkpoint names: `linear1.weight`, …).
    pub fn from_weights(
        frozen: &Frozen,
        config: TrainConfig,
        w: &HashMap<&str, Tensor>,
    ) -> Result<Self> {
        config.check()?;
        let c = &frozen.config;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let adapter = Adapter::load(
            c.audio_encoder.d_model,
            c.adapter.stack,
            c.adapter.hidden_size,
            c.lm.hidden_size,
            vb,
        )?;
        let mut params = Vec::new();
        {
            let data = varmap
                .data()
                .lock()
                .map_err(|_| TrainError::Config("poisoned variables".into()))?;
            for name in PARAMS {
                let var = data
                    .get(name)
                    .ok_or_else(|| TrainError::Config(format!("the adapter has no {name}")))?;
                let value = w
                    .get(name)
                    .ok_or_else(|| TrainError::Mismatch(format!("no adapter weight {name}")))?;
                if value.dims() != var.as_tensor().dims() {
                    return Err(TrainError::Mismatch(format!(
                        "adapter weight {name} is {:?}, the model needs {:?}",
                        value.dims(),
                        var.as_tensor().dims()
                    )));
                }
                var.set(value)?;
                params.push((name.to_string(), var.clone()));
            }
        }
        let opt = AdamW::new(params, config.schedule.clone())?;
        let ctc = match config.objective {
            Objective::Ctc { temperature } => Some(CtcHead::new(frozen, temperature)?),
            Objective::Reply => None,
        };
        Ok(Self {
            config,
            adapter,
            ctc,
            opt,
            examples: 0,
            hours: 0.0,
        })
    }

    /// The settings.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Steps taken.
    pub fn step_count(&self) -> u64 {
        self.opt.steps_taken()
    }

    /// The adapter.
    pub fn adapter(&self) -> &Adapter {
        &self.adapter
    }

    /// The trained variables, by checkpoint name.
    pub fn params(&self) -> &[(String, Var)] {
        self.opt.params()
    }

    /// Mean cross-entropy of the reply of one example (a scalar tensor
    /// that back-propagates into the adapter).
    pub fn loss(&self, frozen: &Frozen, ex: &Example) -> Result<Tensor> {
        let audio = self.adapt(&ex.frames)?;
        let prompt = frozen.prompt_ids(&NexusTask::Transcribe { language: None }, audio.dim(0)?)?;
        let reply = frozen.reply_ids(&ex.text, self.config.max_reply_tokens)?;
        self.reply_loss(frozen, &audio, &prompt, &reply)
    }

    /// The adapter's output (n, d_lm) for encoder frames (n · stack, d_enc),
    /// differentiable.
    pub fn adapt(&self, frames: &Tensor) -> Result<Tensor> {
        Ok(self
            .adapter
            .forward_with(&frames.unsqueeze(0)?, Kernels::Differentiable)?
            .squeeze(0)?)
    }

    /// Mean cross-entropy of `reply` after `prompt` (whose audio
    /// placeholders take the rows of `audio`), through the frozen LM.
    pub fn reply_loss(
        &self,
        frozen: &Frozen,
        audio: &Tensor,
        prompt: &[u32],
        reply: &[u32],
    ) -> Result<Tensor> {
        self.sequences_loss(frozen, &[(audio.clone(), prompt.to_vec(), reply.to_vec())])
    }

    /// Cross-entropy summed over every reply token of several sequences
    /// (adapted audio, prompt, reply), run as one right-padded batch: the
    /// causal mask keeps each real position from the padding after it.
    fn sequences_sum(
        &self,
        frozen: &Frozen,
        seqs: &[(Tensor, Vec<u32>, Vec<u32>)],
    ) -> Result<Tensor> {
        let mut xs = Vec::with_capacity(seqs.len());
        let mut lens = Vec::with_capacity(seqs.len());
        for (audio, prompt, reply) in seqs {
            if prompt.is_empty() || reply.is_empty() {
                return Err(TrainError::Config("an empty prompt or reply".into()));
            }
            let ids: Vec<u32> = prompt.iter().chain(reply).copied().collect();
            xs.push(splice(&frozen.lm, frozen.audio_token, &ids, audio)?);
            lens.push(ids.len());
        }
        let longest = lens.iter().copied().max().unwrap_or(0);
        let padded = xs
            .into_iter()
            .zip(&lens)
            .map(|(x, &n)| {
                if n == longest {
                    Ok(x)
                } else {
                    let pad = Tensor::zeros((1, longest - n, x.dim(2)?), x.dtype(), x.device())?;
                    Tensor::cat(&[&x, &pad], 1)
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let h = frozen
            .lm
            .forward_differentiable(&Tensor::cat(&padded, 0)?)?;
        // The states that predict each reply token.
        let mut rows = Vec::with_capacity(seqs.len());
        let mut targets = Vec::new();
        for (b, (_, prompt, reply)) in seqs.iter().enumerate() {
            rows.push(h.i((b, prompt.len() - 1..prompt.len() - 1 + reply.len()))?);
            targets.extend_from_slice(reply);
        }
        let logits = frozen.lm.logits_differentiable(&Tensor::cat(&rows, 0)?)?;
        let logp = candle_nn::ops::log_softmax(&logits, 1)?;
        let target = Tensor::new(targets.as_slice(), &Device::Cpu)?.unsqueeze(1)?;
        Ok(logp.gather(&target, 1)?.sum_all()?.neg()?)
    }

    /// [`AdapterTrainer::sequences_sum`] divided by the reply tokens.
    fn sequences_loss(
        &self,
        frozen: &Frozen,
        seqs: &[(Tensor, Vec<u32>, Vec<u32>)],
    ) -> Result<Tensor> {
        let tokens: usize = seqs.iter().map(|s| s.2.len()).sum();
        Ok((self.sequences_sum(frozen, seqs)? / tokens.max(1) as f64)?)
    }

    /// Gradients of the loss over `batch` (the mean over all its reply
    /// tokens), one per variable, and that loss. The batch runs
    /// `micro_batch` examples at a time, their gradients accumulated.
    pub fn gradients(&self, frozen: &Frozen, batch: &[&Example]) -> Result<(Vec<Tensor>, f64)> {
        if let Some(head) = &self.ctc {
            return self.ctc_gradients(frozen, head, batch);
        }
        let mut seqs = Vec::with_capacity(batch.len());
        for ex in batch {
            let audio = self.adapt(&ex.frames)?;
            let prompt =
                frozen.prompt_ids(&NexusTask::Transcribe { language: None }, audio.dim(0)?)?;
            let reply = frozen.reply_ids(&ex.text, self.config.max_reply_tokens)?;
            seqs.push((audio, prompt, reply));
        }
        let tokens: usize = seqs.iter().map(|s| s.2.len()).sum();
        if tokens == 0 {
            return Err(TrainError::Config("an empty batch".into()));
        }
        let mut sums: Vec<Option<Tensor>> = vec![None; PARAMS.len()];
        let mut loss_sum = 0.0;
        for chunk in seqs.chunks(self.config.micro_batch) {
            // Each chunk's share of the batch mean.
            let part = (self.sequences_sum(frozen, chunk)? / tokens as f64)?;
            loss_sum += f64::from(part.to_scalar::<f32>()?);
            let grads = part.backward()?;
            accumulate(&mut sums, self.opt.params(), &grads)?;
        }
        Ok((summed(sums)?, loss_sum))
    }

    /// Gradients of the CTC loss over `batch` (summed over its examples,
    /// divided by its labels), one example at a time; examples whose
    /// labels do not fit their positions are left out.
    fn ctc_gradients(
        &self,
        frozen: &Frozen,
        head: &CtcHead,
        batch: &[&Example],
    ) -> Result<(Vec<Tensor>, f64)> {
        let stack = frozen.config.adapter.stack;
        let mut items = Vec::with_capacity(batch.len());
        for ex in batch {
            let labels = frozen.encode(&ex.text)?;
            let labels = &labels[..labels.len().min(self.config.max_reply_tokens)];
            if !labels.is_empty() && ctc::positions_needed(labels) <= ex.frames.dim(0)? / stack {
                items.push((ex, labels.to_vec()));
            }
        }
        let tokens: usize = items.iter().map(|(_, l)| l.len()).sum();
        if tokens == 0 {
            return Err(TrainError::Config(
                "no example of the batch has its transcript fit its positions".into(),
            ));
        }
        let mut sums: Vec<Option<Tensor>> = vec![None; PARAMS.len()];
        let mut loss_sum = 0.0;
        for (ex, labels) in items {
            let a = self.adapt(&ex.frames)?;
            let Some((nll, surrogate)) = head.loss(frozen, &a, &labels)? else {
                continue;
            };
            loss_sum += nll / tokens as f64;
            let grads = (surrogate / tokens as f64)?.backward()?;
            accumulate(&mut sums, self.opt.params(), &grads)?;
        }
        Ok((summed(sums)?, loss_sum))
    }

    /// The examples of step `step` (1-based): the data in a fresh seeded
    /// order each epoch, `batch` at a time.
    pub fn batch_of<'a>(&self, train: &'a [Example], step: u64) -> Vec<&'a Example> {
        let n = train.len() as u64;
        let b = self.config.batch as u64;
        let mut order_of: Option<(u64, Vec<usize>)> = None;
        (0..b)
            .map(|j| {
                let k = (step - 1) * b + j;
                let epoch = k / n;
                if order_of.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    let mut o: Vec<usize> = (0..train.len()).collect();
                    Rng::derive(self.config.seed, epoch).shuffle(&mut o);
                    order_of = Some((epoch, o));
                }
                let order = order_of.as_ref().map(|(_, o)| o.as_slice()).unwrap_or(&[]);
                &train[order[(k % n) as usize]]
            })
            .collect()
    }

    /// One optimiser step on the next batch of `train`.
    pub fn step(&mut self, frozen: &Frozen, train: &[Example]) -> Result<StepReport> {
        if train.is_empty() {
            return Err(TrainError::Config("no training examples".into()));
        }
        let batch = self.batch_of(train, self.step_count() + 1);
        let (grads, loss) = self.gradients(frozen, &batch)?;
        let (lr, norm) = self.apply(grads)?;
        self.examples += batch.len() as u64;
        self.hours += batch.iter().map(|e| f64::from(e.seconds)).sum::<f64>() / 3600.0;
        Ok(StepReport {
            step: self.step_count(),
            loss,
            lr,
            grad_norm: norm,
            examples: self.examples,
            hours: self.hours,
        })
    }

    /// One optimiser update with gradients (one per [`AdapterTrainer::params`]
    /// entry), clipped to `clip_norm`; returns the learning rate and the
    /// norm before clipping.
    pub fn apply(&mut self, mut grads: Vec<Tensor>) -> Result<(f64, f64)> {
        let mut sq = 0f64;
        for g in &grads {
            sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
        let norm = sq.sqrt();
        if !norm.is_finite() {
            return Err(TrainError::Config(format!(
                "the gradient norm is {norm} at step {}: lower the learning rate",
                self.step_count() + 1
            )));
        }
        if norm > self.config.clip_norm {
            let s = self.config.clip_norm / norm;
            grads = grads
                .into_iter()
                .map(|g| g * s)
                .collect::<candle_core::Result<_>>()?;
        }
        Ok((self.opt.step(&grads)?, norm))
    }

    /// Greedy transcript of an example by the frozen LM with the adapter as it is now.
    pub fn transcribe(
        &self,
        frozen: &Frozen,
        frames: &Tensor,
        task: &NexusTask,
        max_tokens: usize,
    ) -> Result<String> {
        let audio = self.adapter.forward(&frames.unsqueeze(0)?)?.squeeze(0)?;
        let ids = frozen.prompt_ids(task, audio.dim(0)?)?;
        let x = splice(&frozen.lm, frozen.audio_token, &ids, &audio)?;
        let mut s = frozen.lm.prefill(&x)?;
        let eos = frozen.config.tokens.eos_id(&frozen.tokenizer);
        let (out, _) = greedy(&frozen.lm, &mut s, max_tokens, |t| {
            t == frozen.end_of_turn || Some(t) == eos
        })?;
        frozen
            .tokenizer
            .decode(&out, true)
            .map_err(|e| TrainError::Config(format!("decoding: {e}")))
    }

    /// Word error rate of greedy transcripts over `examples` (Whisper's
    /// English normalisation), with each hypothesis.
    pub fn validate(&self, frozen: &Frozen, examples: &[Example]) -> Result<(f64, Vec<String>)> {
        wer_of(examples, |ex| {
            let budget = frozen
                .reply_ids(&ex.text, self.config.max_reply_tokens)?
                .len()
                + 8;
            self.transcribe(
                frozen,
                &ex.frames,
                &NexusTask::Transcribe { language: None },
                budget,
            )
        })
    }

    /// Word error rate of the CTC head's best paths over `examples`, with
    /// each hypothesis; `None` unless the objective is CTC.
    pub fn validate_ctc(
        &self,
        frozen: &Frozen,
        examples: &[Example],
    ) -> Result<Option<(f64, Vec<String>)>> {
        let Some(head) = &self.ctc else {
            return Ok(None);
        };
        wer_of(examples, |ex| {
            let a = self.adapter.forward(&ex.frames.unsqueeze(0)?)?.squeeze(0)?;
            let ids = head.greedy(frozen, &a)?;
            frozen
                .tokenizer
                .decode(&ids, true)
                .map_err(|e| TrainError::Config(format!("decoding: {e}")))
        })
        .map(Some)
    }

    /// The adapter's weights under their checkpoint names.
    pub fn weights(&self) -> HashMap<String, Tensor> {
        self.params()
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Writes the whole state into `dir`: `adapter.safetensors`,
    /// `optimizer.safetensors`, `state.json`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let tmp = dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        candle_core::safetensors::save(&self.weights(), tmp.join("adapter.safetensors"))?;
        candle_core::safetensors::save(&self.opt.state(), tmp.join("optimizer.safetensors"))?;
        let state = SavedState {
            step: self.step_count(),
            examples: self.examples,
            hours: self.hours,
            config: self.config.clone(),
        };
        write_json(&tmp.join("state.json"), &state)?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::rename(&tmp, dir).map_err(io(dir))
    }

    /// Loads a state saved by [`AdapterTrainer::save`]; its settings must equal `config`.
    pub fn load(frozen: &Frozen, config: TrainConfig, dir: &Path) -> Result<Self> {
        let state: SavedState = read_json(&dir.join("state.json"))?;
        if state.config != config {
            return Err(TrainError::Mismatch(format!(
                "{} was trained with other settings: use another output folder, or the same settings to resume",
                dir.display()
            )));
        }
        let w = candle_core::safetensors::load(dir.join("adapter.safetensors"), &Device::Cpu)?;
        let w: HashMap<&str, Tensor> = PARAMS
            .iter()
            .filter_map(|n| w.get(*n).map(|t| (*n, t.clone())))
            .collect();
        let mut t = Self::from_weights(frozen, config, &w)?;
        let opt = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu)?;
        t.opt.restore(&opt, state.step)?;
        t.examples = state.examples;
        t.hours = state.hours;
        Ok(t)
    }
}

/// Adds each variable's gradient in `grads` to its running sum.
fn accumulate(
    sums: &mut [Option<Tensor>],
    params: &[(String, Var)],
    grads: &candle_core::backprop::GradStore,
) -> Result<()> {
    for ((name, var), sum) in params.iter().zip(sums.iter_mut()) {
        let g = grads
            .get(var.as_tensor())
            .ok_or_else(|| TrainError::Config(format!("no gradient reached {name}")))?;
        *sum = Some(match sum.take() {
            Some(s) => (s + g)?,
            None => g.clone(),
        });
    }
    Ok(())
}

/// The summed gradients, one per variable.
fn summed(sums: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
    sums.into_iter()
        .map(|s| s.ok_or_else(|| TrainError::Config("an empty batch".into())))
        .collect()
}

/// Word error rate of `hyp`'s text for each example against its words
/// (Whisper's English normalisation), with each hypothesis.
fn wer_of(
    examples: &[Example],
    mut hyp: impl FnMut(&Example) -> Result<String>,
) -> Result<(f64, Vec<String>)> {
    let (mut errors, mut words) = (0usize, 0usize);
    let mut hyps = Vec::with_capacity(examples.len());
    for ex in examples {
        let h = hyp(ex)?;
        let c = nexus_eval::wer(&ex.text, &h);
        errors += c.errors;
        words += c.reference_len;
        hyps.push(h);
    }
    Ok((errors as f64 / words.max(1) as f64, hyps))
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SavedState {
    step: u64,
    examples: u64,
    hours: f64,
    config: TrainConfig,
}

/// The newest checkpoint folder (`step-NNNNNNNN`) under `dir`, if any.
pub fn latest_checkpoint(dir: &Path) -> Option<(u64, PathBuf)> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse::<u64>().ok()?;
            e.path()
                .join("state.json")
                .exists()
                .then(|| (step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
}

/// The folder of step `step`'s checkpoint under `dir`.
pub fn checkpoint_dir(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step-{step:08}"))
}
