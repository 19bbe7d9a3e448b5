//! The NEXUS-O language model: Qwen2.5 (the language part of Qwen2.5-VL)
//! taking embeddings, so audio can stand in for placeholder tokens, with
//! multimodal rotary positions and a KV cache per session.

use candle_core::{IndexOp, Module, Tensor};
use candle_nn::{Embedding, Linear, RmsNorm, VarBuilder, embedding, linear_no_bias, rms_norm};

use super::config::LmConfig;
use super::transformer::{
    BlockConfig, Kernels, KvCache, Position, Rotary, Stack, argmax, text_position,
};
use crate::error::{ModelError, Result};

/// Qwen2.5 weights (Hugging Face `Qwen2ForCausalLM` names under `lm.`).
#[derive(Debug, Clone)]
pub struct NexusLm {
    embed: Embedding,
    stack: Stack,
    norm: RmsNorm,
    head: Linear,
    eps: f64,
    max_positions: usize,
}

/// One sequence being decoded: its cache, the next position, and the
/// logits and final hidden state of its last position.
#[derive(Debug, Clone)]
pub struct LmSession {
    cache: KvCache,
    next_position: u32,
    logits: Tensor,
    hidden: Tensor,
}

impl LmSession {
    /// Logits (vocab) of the last position.
    pub fn logits(&self) -> &Tensor {
        &self.logits
    }

    /// Final-norm hidden state (hidden) of the last position.
    pub fn last_hidden(&self) -> &Tensor {
        &self.hidden
    }

    /// The most likely next token.
    pub fn greedy(&self) -> Result<u32> {
        argmax(&self.logits)
    }

    /// The most likely next token and its log-probability (natural log,
    /// softmax over the vocabulary).
    pub fn greedy_with_logprob(&self) -> Result<(u32, f32)> {
        let logits: Vec<f32> = self.logits.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        let (best, max) =
            logits
                .iter()
                .copied()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, x)| if x > b.1 { (i, x) } else { b },
                );
        let sum: f32 = logits.iter().map(|x| (x - max).exp()).sum();
        // The best token's logit is the maximum: its log-probability is -ln(sum).
        Ok((best as u32, -sum.ln()))
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether nothing has run yet.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
}

impl NexusLm {
    /// Loads `model.*` and `lm_head` under `vb`.
    pub fn load(cfg: &LmConfig, vb: VarBuilder) -> Result<Self> {
        let m = vb.pp("model");
        let embed = embedding(cfg.vocab_size, cfg.hidden_size, m.pp("embed_tokens"))?;
        let rotary = Rotary::new(cfg.head_dim(), cfg.rope_theta, cfg.sections())?;
        let stack = Stack::load(
            BlockConfig {
                hidden: cfg.hidden_size,
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_key_value_heads,
                ffn: cfg.intermediate_size,
                eps: cfg.rms_norm_eps,
                attn_prefix: "self_attn.",
                mlp_prefix: "mlp.",
            },
            cfg.num_hidden_layers,
            rotary,
            m.pp("layers"),
        )?;
        let norm = rms_norm(cfg.hidden_size, cfg.rms_norm_eps, m.pp("norm"))?;
        let head = if cfg.tie_word_embeddings {
            Linear::new(embed.embeddings().clone(), None)
        } else {
            linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?
        };
        Ok(Self {
            embed,
            stack,
            norm,
            head,
            eps: cfg.rms_norm_eps,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// The embedding table (vocab, hidden).
    pub fn embeddings(&self) -> &Tensor {
        self.embed.embeddings()
    }

    /// Token embeddings (T, hidden).
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let t = Tensor::new(ids, self.embed.embeddings().device())?;
        Ok(self.embed.forward(&t)?)
    }

    /// Final-norm hidden states and logits of all positions of x (1, T, hidden)
    /// placed at `positions` after what `cache` holds.
    pub fn forward(
        &self,
        x: &Tensor,
        positions: &[Position],
        cache: &mut KvCache,
    ) -> Result<(Tensor, Tensor)> {
        let h = self
            .norm
            .forward(&self.stack.forward(x, positions, cache)?)?;
        let logits = self.head.forward(&h)?;
        Ok((h, logits))
    }

    /// Final-norm hidden states (1, T, hidden) of a whole sequence x
    /// (1, T, hidden) at positions 0..T, through operations candle
    /// differentiates: the forward pass of training through the frozen model.
    pub fn forward_differentiable(&self, x: &Tensor) -> Result<Tensor> {
        let positions = self.whole(x)?;
        let mut cache = self.new_cache();
        let h = self
            .stack
            .forward_with(x, &positions, &mut cache, Kernels::Differentiable)?;
        Ok(candle_nn::ops::rms_norm_slow(
            &h,
            self.norm.weight(),
            self.eps as f32,
        )?)
    }

    /// Logits of final-norm hidden states (…, hidden), the gradient flowing
    /// back to them (the head itself is frozen).
    pub fn logits_differentiable(&self, hidden: &Tensor) -> Result<Tensor> {
        Kernels::Differentiable.linear(&self.head, hidden)
    }

    /// Positions 0..T of a whole sequence x (B, T, hidden), which the model must hold.
    fn whole(&self, x: &Tensor) -> Result<Vec<Position>> {
        let t = x.dim(1)?;
        if t == 0 || t > self.max_positions {
            return Err(ModelError::Input(format!(
                "a prompt of {t} positions (the model holds 1 to {})",
                self.max_positions
            )));
        }
        Ok((0..t as u32).map(text_position).collect())
    }

    /// A new cache.
    pub fn new_cache(&self) -> KvCache {
        self.stack.new_cache()
    }

    /// Runs a prompt (1, T, hidden) of text and audio embeddings: positions 0..T.
    pub fn prefill(&self, x: &Tensor) -> Result<LmSession> {
        let positions = self.whole(x)?;
        let t = positions.len();
        let mut cache = self.new_cache();
        let (h, logits) = self.forward(x, &positions, &mut cache)?;
        Ok(LmSession {
            cache,
            next_position: t as u32,
            logits: logits.i((0, t - 1))?,
            hidden: h.i((0, t - 1))?,
        })
    }

    /// Appends one token to each session, all in one batch.
    pub fn step_batch(&self, tokens: &[u32], sessions: &mut [&mut LmSession]) -> Result<()> {
        if tokens.len() != sessions.len() || tokens.is_empty() {
            return Err(ModelError::Input(format!(
                "{} tokens for {} sessions",
                tokens.len(),
                sessions.len()
            )));
        }
        if let Some(s) = sessions
            .iter()
            .find(|s| s.next_position as usize >= self.max_positions)
        {
            return Err(ModelError::Input(format!(
                "a session reached the model's {} positions ({} held)",
                self.max_positions,
                s.cache.len()
            )));
        }
        let x = self.embed(tokens)?.unsqueeze(1)?;
        let positions: Vec<Position> = sessions
            .iter()
            .map(|s| text_position(s.next_position))
            .collect();
        let mut caches: Vec<&mut KvCache> = sessions.iter_mut().map(|s| &mut s.cache).collect();
        let h = self.stack.step_batch(&x, &positions, &mut caches)?;
        let h = self.norm.forward(&h)?;
        let logits = self.head.forward(&h)?;
        for (i, s) in sessions.iter_mut().enumerate() {
            s.next_position += 1;
            s.logits = logits.i((i, 0))?;
            s.hidden = h.i((i, 0))?;
        }
        Ok(())
    }
}
