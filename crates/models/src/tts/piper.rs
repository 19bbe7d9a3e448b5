//! Piper voices: VITS inference in candle.
//!
//! Loads what `nexus models pull piper-en-us-joe-medium` converts from the
//! voice's ONNX export: `model.safetensors` (module-path names), `arch.json`
//! (each convolution's dilation, stride, padding and groups, which the
//! weights do not tell) and `voice.json` (phoneme map, rate, scales).
//!
//! Inference is VITS's: a text encoder (transformer with windowed relative
//! positions) gives a prior per phoneme; the stochastic duration predictor
//! run backwards (spline flows) gives each phoneme's length; the prior is
//! stretched to frames, sampled, sent back through the coupling flow, and a
//! HiFi-GAN generator makes the waveform.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{D, DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Conv1d, Conv1dConfig, VarBuilder};
use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::vocoder::hifigan::{HifiGan, HifiGanConfig};

/// Geometry of one convolution, from `arch.json`.
#[derive(Debug, Clone, Copy, Deserialize)]
struct ConvGeometry {
    dilation: usize,
    stride: usize,
    pad: usize,
    groups: usize,
}

#[derive(Debug, Deserialize)]
struct Arch {
    convs: HashMap<String, ConvGeometry>,
}

/// `voice.json`: what Piper ships beside the model.
#[derive(Debug, Clone, Deserialize)]
pub struct VoiceConfig {
    /// Output rate.
    pub audio: AudioInfo,
    /// espeak-ng voice for phonemes.
    pub espeak: EspeakInfo,
    /// Default noise and length scales.
    pub inference: InferenceScales,
    /// Phoneme (one character) → ids.
    pub phoneme_id_map: HashMap<String, Vec<i64>>,
}

/// `voice.json` `audio`.
#[derive(Debug, Clone, Deserialize)]
pub struct AudioInfo {
    /// Samples per second.
    pub sample_rate: u32,
}

/// `voice.json` `espeak`.
#[derive(Debug, Clone, Deserialize)]
pub struct EspeakInfo {
    /// espeak-ng voice name (`en-us`).
    pub voice: String,
}

/// Noise and length scales.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct InferenceScales {
    /// Prior sampling noise.
    pub noise_scale: f32,
    /// Duration multiplier (larger is slower).
    pub length_scale: f32,
    /// Duration sampling noise.
    pub noise_w: f32,
}

struct Weights<'a> {
    vb: VarBuilder<'a>,
    arch: &'a Arch,
}

impl Weights<'_> {
    /// The convolution `name` (`.weight`, `.bias` when present) with its geometry.
    fn conv(&self, name: &str) -> Result<Conv1d> {
        let w = self.vb.get_unchecked(&format!("{name}.weight"))?;
        let b = if self.vb.contains_tensor(&format!("{name}.bias")) {
            Some(self.vb.get_unchecked(&format!("{name}.bias"))?)
        } else {
            None
        };
        let g = self
            .arch
            .convs
            .get(&format!("{name}.weight"))
            .copied()
            .ok_or_else(|| ModelError::Load(format!("arch.json has no geometry for {name}")))?;
        let cfg = Conv1dConfig {
            padding: g.pad,
            stride: g.stride,
            dilation: g.dilation,
            groups: g.groups,
            cudnn_fwd_algo: None,
        };
        Ok(Conv1d::new(w, b, cfg))
    }

    fn get(&self, name: &str) -> Result<Tensor> {
        Ok(self.vb.get_unchecked(name)?)
    }

    fn count(&self, prefix: &str, suffix: &str) -> usize {
        (0..)
            .take_while(|i| self.vb.contains_tensor(&format!("{prefix}.{i}.{suffix}")))
            .count()
    }
}

/// LayerNorm over channels of (B, C, T).
#[derive(Debug, Clone)]
struct ChannelNorm {
    gamma: Tensor,
    beta: Tensor,
}

impl ChannelNorm {
    fn load(w: &Weights, name: &str) -> Result<Self> {
        Ok(Self {
            gamma: w.get(&format!("{name}.gamma"))?,
            beta: w.get(&format!("{name}.beta"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.transpose(1, 2)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
        let y = y.broadcast_mul(&self.gamma)?.broadcast_add(&self.beta)?;
        Ok(y.transpose(1, 2)?)
    }
}

#[derive(Debug, Clone)]
struct AttentionLayer {
    q: Conv1d,
    k: Conv1d,
    v: Conv1d,
    o: Conv1d,
    rel_k: Tensor,
    rel_v: Tensor,
    heads: usize,
    window: usize,
    norm1: ChannelNorm,
    ffn1: Conv1d,
    ffn2: Conv1d,
    ffn_pad: usize,
    norm2: ChannelNorm,
}

impl AttentionLayer {
    /// Scores of windowed relative keys, placed in (B, H, T, T).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, t) = x.dims3()?;
        let hd = c / self.heads;
        let split = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, self.heads, hd, t))?
                .transpose(2, 3)?
                .contiguous()?)
        };
        let q = (split(self.q.forward(x)?)? / (hd as f64).sqrt())?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let mut scores = q.matmul(&k.t()?.contiguous()?)?;
        let w = self.window;
        let dev = x.device();
        // Relative positions j - i within ±window use their embedding, others none.
        let rel = q.broadcast_matmul(&self.rel_k.t()?.contiguous()?)?; // (B, H, T, 2w+1)
        let rel = Tensor::cat(
            &[
                &rel,
                &Tensor::zeros((b, self.heads, t, 1), rel.dtype(), dev)?,
            ],
            3,
        )?;
        let band: Vec<u32> = (0..t)
            .flat_map(|i| {
                (0..t).map(move |j| {
                    let d = j as isize - i as isize;
                    if d.unsigned_abs() <= w {
                        (d + w as isize) as u32
                    } else {
                        (2 * w + 1) as u32
                    }
                })
            })
            .collect();
        let band = Tensor::from_vec(band, (1, 1, t, t), dev)?
            .broadcast_as((b, self.heads, t, t))?
            .contiguous()?;
        scores = (scores + rel.contiguous()?.gather(&band, 3)?)?;
        let p = candle_nn::ops::softmax_last_dim(&scores)?;
        let mut out = p.matmul(&v)?;
        // Attention weights by relative position, then their value embeddings.
        let pz = Tensor::cat(
            &[&p, &Tensor::zeros((b, self.heads, t, 1), p.dtype(), dev)?],
            3,
        )?;
        let idx: Vec<u32> = (0..t)
            .flat_map(|i| {
                (0..2 * w + 1).map(move |r| {
                    let j = i as isize + r as isize - w as isize;
                    if j >= 0 && (j as usize) < t {
                        j as u32
                    } else {
                        t as u32
                    }
                })
            })
            .collect();
        let idx = Tensor::from_vec(idx, (1, 1, t, 2 * w + 1), dev)?
            .broadcast_as((b, self.heads, t, 2 * w + 1))?
            .contiguous()?;
        let rw = pz.contiguous()?.gather(&idx, 3)?;
        out = (out + rw.broadcast_matmul(&self.rel_v)?)?;
        let out = out.transpose(2, 3)?.reshape((b, c, t))?;
        let x = self.norm1.forward(&(x + self.o.forward(&out)?)?)?;
        let p = self.ffn_pad;
        let y = self.ffn1.forward(&x.pad_with_zeros(2, p, p)?)?.relu()?;
        let y = self.ffn2.forward(&y.pad_with_zeros(2, p, p)?)?;
        self.norm2.forward(&(x + y)?)
    }
}

/// Dilated depthwise-separable convolutions (the duration predictor's body).
#[derive(Debug, Clone)]
struct Dds {
    sep: Vec<Conv1d>,
    one: Vec<Conv1d>,
    norms1: Vec<ChannelNorm>,
    norms2: Vec<ChannelNorm>,
}

impl Dds {
    fn load(w: &Weights, name: &str) -> Result<Self> {
        let n = w.count(&format!("{name}.convs_sep"), "weight");
        let mut d = Dds {
            sep: Vec::new(),
            one: Vec::new(),
            norms1: Vec::new(),
            norms2: Vec::new(),
        };
        for i in 0..n {
            d.sep.push(w.conv(&format!("{name}.convs_sep.{i}"))?);
            d.one.push(w.conv(&format!("{name}.convs_1x1.{i}"))?);
            d.norms1
                .push(ChannelNorm::load(w, &format!("{name}.norms_1.{i}"))?);
            d.norms2
                .push(ChannelNorm::load(w, &format!("{name}.norms_2.{i}"))?);
        }
        Ok(d)
    }

    fn forward(&self, x: &Tensor, g: Option<&Tensor>) -> Result<Tensor> {
        let mut x = match g {
            Some(g) => (x + g)?,
            None => x.clone(),
        };
        for i in 0..self.sep.len() {
            let y = crate::ops::gelu_erf(&self.norms1[i].forward(&self.sep[i].forward(&x)?)?)?;
            let y = crate::ops::gelu_erf(&self.norms2[i].forward(&self.one[i].forward(&y)?)?)?;
            x = (x + y)?;
        }
        Ok(x)
    }
}

#[derive(Debug, Clone)]
struct SplineFlow {
    pre: Conv1d,
    dds: Dds,
    proj: Conv1d,
    bins: usize,
    filter: usize,
}

#[derive(Debug, Clone)]
struct Coupling {
    pre: Conv1d,
    ins: Vec<Conv1d>,
    res_skip: Vec<Conv1d>,
    post: Conv1d,
    hidden: usize,
}

impl Coupling {
    /// Reverse of a mean-only residual coupling layer.
    fn reverse(&self, x: &Tensor) -> Result<Tensor> {
        let half = x.dim(1)? / 2;
        let x0 = x.narrow(1, 0, half)?;
        let x1 = x.narrow(1, half, half)?;
        let mut h = self.pre.forward(&x0)?;
        let mut out: Option<Tensor> = None;
        let n = self.ins.len();
        for i in 0..n {
            let a = self.ins[i].forward(&h)?;
            let acts = (a.narrow(1, 0, self.hidden)?.tanh()?
                * candle_nn::ops::sigmoid(&a.narrow(1, self.hidden, self.hidden)?)?)?;
            let rs = self.res_skip[i].forward(&acts)?;
            let skip = if i + 1 < n {
                h = (h + rs.narrow(1, 0, self.hidden)?)?;
                rs.narrow(1, self.hidden, self.hidden)?
            } else {
                rs
            };
            out = Some(match out {
                Some(o) => (o + skip)?,
                None => skip,
            });
        }
        let m = self
            .post
            .forward(&out.ok_or_else(|| ModelError::Load("a WN with no layers".into()))?)?;
        Ok(Tensor::cat(&[&x0, &(x1 - m)?], 1)?)
    }
}

/// A loaded Piper voice.
pub struct PiperVoice {
    cfg: VoiceConfig,
    emb: Tensor,
    layers: Vec<AttentionLayer>,
    proj: Conv1d,
    dp_pre: Conv1d,
    dp_dds: Dds,
    dp_proj: Conv1d,
    dp_flows: Vec<SplineFlow>,
    dp_m: Tensor,
    dp_exp_neg_logs: Tensor,
    couplings: Vec<Coupling>,
    dec: HifiGan,
    device: Device,
}

impl std::fmt::Debug for PiperVoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PiperVoice")
            .field("sample_rate", &self.cfg.audio.sample_rate)
            .field("layers", &self.layers.len())
            .finish()
    }
}

/// What one synthesis produced, beside the samples.
#[derive(Debug, Clone)]
pub struct Synthesis {
    /// Samples at [`PiperVoice::sample_rate`].
    pub samples: Vec<f32>,
    /// Frames (hops) each phoneme id lasted.
    pub durations: Vec<u32>,
}

/// Scales and seed of one synthesis.
#[derive(Debug, Clone, Copy)]
pub struct SynthesisOptions {
    /// Prior sampling noise.
    pub noise_scale: f32,
    /// Duration multiplier (larger is slower).
    pub length_scale: f32,
    /// Duration sampling noise.
    pub noise_w: f32,
    /// Seed of the sampling noise (the same seed gives the same audio).
    pub seed: u64,
}

/// Gaussian samples from a fixed-seed generator (splitmix64 + Box–Muller).
fn normal(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u1, u2) = (next().max(1e-12), next());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}

/// Inverse of the rational-quadratic spline with linear tails (Durkan et al.),
/// for one value: `w`, `h` unnormalised widths and heights (bins), `d`
/// unnormalised inner derivatives (bins − 1).
fn spline_inverse(y: f32, w: &[f32], h: &[f32], d: &[f32], bound: f32) -> f32 {
    const MIN_W: f32 = 1e-3;
    const MIN_H: f32 = 1e-3;
    const MIN_D: f32 = 1e-3;
    if y < -bound || y > bound {
        return y;
    }
    let n = w.len();
    let softmax = |v: &[f32]| -> Vec<f32> {
        let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = v.iter().map(|x| (x - m).exp()).collect();
        let s: f32 = e.iter().sum();
        e.into_iter().map(|x| x / s).collect()
    };
    let knots = |v: &[f32]| -> Vec<f32> {
        let p = softmax(v);
        let mut c = vec![-bound];
        let mut acc = 0f32;
        for x in &p {
            acc += MIN_W + (1.0 - MIN_W * n as f32) * x;
            c.push(2.0 * bound * acc - bound);
        }
        c[n] = bound;
        c
    };
    let _ = MIN_H;
    let cw = knots(w);
    let ch = knots(h);
    let softplus = |x: f32| if x > 20.0 { x } else { x.exp().ln_1p() };
    let edge = (1.0 - MIN_D).exp_m1().ln();
    let mut der = Vec::with_capacity(n + 1);
    der.push(MIN_D + softplus(edge));
    der.extend(d.iter().map(|x| MIN_D + softplus(*x)));
    der.push(MIN_D + softplus(edge));
    // The bin whose height interval holds y (the last edge nudged up as searchsorted is).
    let mut k = 0;
    for (i, c) in ch.iter().enumerate().take(n + 1) {
        let c = if i == n { c + 1e-6 } else { *c };
        if y >= c {
            k = i;
        }
    }
    let k = k.min(n - 1);
    let (x0, wk) = (cw[k], cw[k + 1] - cw[k]);
    let (y0, hk) = (ch[k], ch[k + 1] - ch[k]);
    let delta = hk / wk;
    let (d0, d1) = (der[k], der[k + 1]);
    let dy = y - y0;
    let a = dy * (d0 + d1 - 2.0 * delta) + hk * (delta - d0);
    let b = hk * d0 - dy * (d0 + d1 - 2.0 * delta);
    let c = -delta * dy;
    let disc = (b * b - 4.0 * a * c).max(0.0);
    let root = (2.0 * c) / (-b - disc.sqrt());
    root * wk + x0
}

impl PiperVoice {
    /// Loads a converted voice folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let read = |f: &str| -> Result<Vec<u8>> {
            let p = dir.join(f);
            std::fs::read(&p).map_err(|e| {
                ModelError::Load(format!(
                    "{}: {e}; convert the voice first (`nexus models pull piper-en-us-joe-medium`)",
                    p.display()
                ))
            })
        };
        let cfg: VoiceConfig = serde_json::from_slice(&read("voice.json")?)
            .map_err(|e| ModelError::Load(format!("voice.json: {e}")))?;
        let arch: Arch = serde_json::from_slice(&read("arch.json")?)
            .map_err(|e| ModelError::Load(format!("arch.json: {e}")))?;
        let vb =
            VarBuilder::from_buffered_safetensors(read("model.safetensors")?, DType::F32, device)?;
        let w = Weights { vb, arch: &arch };
        let layers = (0..w.count("enc_p.encoder.attn_layers", "conv_q.weight"))
            .map(|i| {
                let a = format!("enc_p.encoder.attn_layers.{i}");
                let rel_k = w.get(&format!("{a}.emb_rel_k"))?.squeeze(0)?;
                let c = w.get(&format!("{a}.conv_q.weight"))?.dim(0)?;
                let heads = c / rel_k.dim(1)?;
                let ffn1 = w.conv(&format!("enc_p.encoder.ffn_layers.{i}.conv_1"))?;
                let k = ffn1.weight().dim(2)?;
                Ok(AttentionLayer {
                    q: w.conv(&format!("{a}.conv_q"))?,
                    k: w.conv(&format!("{a}.conv_k"))?,
                    v: w.conv(&format!("{a}.conv_v"))?,
                    o: w.conv(&format!("{a}.conv_o"))?,
                    window: (rel_k.dim(0)? - 1) / 2,
                    rel_v: w.get(&format!("{a}.emb_rel_v"))?.squeeze(0)?,
                    rel_k,
                    heads,
                    norm1: ChannelNorm::load(&w, &format!("enc_p.encoder.norm_layers_1.{i}"))?,
                    ffn1,
                    ffn2: w.conv(&format!("enc_p.encoder.ffn_layers.{i}.conv_2"))?,
                    ffn_pad: (k - 1) / 2,
                    norm2: ChannelNorm::load(&w, &format!("enc_p.encoder.norm_layers_2.{i}"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if layers.is_empty() {
            return Err(ModelError::Load(
                "no text encoder layers in the voice".into(),
            ));
        }
        // The duration predictor's flows as run backwards: ConvFlows from last to first,
        // the one after the affine flow skipped (VITS drops it at inference).
        let mut dp_flows = Vec::new();
        let mut i = 1;
        let mut found = Vec::new();
        while i < 16 {
            if w.vb.contains_tensor(&format!("dp.flows.{i}.proj.weight")) {
                found.push(i);
            }
            i += 1;
        }
        for i in found.iter().rev() {
            let f = format!("dp.flows.{i}");
            let proj = w.conv(&format!("{f}.proj"))?;
            let pre = w.conv(&format!("{f}.pre"))?;
            let filter = pre.weight().dim(0)?;
            let bins = (proj.weight().dim(0)? + 1) / 3;
            dp_flows.push(SplineFlow {
                pre,
                dds: Dds::load(&w, &format!("{f}.convs"))?,
                proj,
                bins,
                filter,
            });
        }
        let couplings = (0..8)
            .filter(|i| w.vb.contains_tensor(&format!("flow.flows.{i}.pre.weight")))
            .map(|i| {
                let f = format!("flow.flows.{i}");
                let n = w.count(&format!("{f}.enc.in_layers"), "weight");
                let pre = w.conv(&format!("{f}.pre"))?;
                Ok(Coupling {
                    hidden: pre.weight().dim(0)?,
                    pre,
                    ins: (0..n)
                        .map(|j| w.conv(&format!("{f}.enc.in_layers.{j}")))
                        .collect::<Result<_>>()?,
                    res_skip: (0..n)
                        .map(|j| w.conv(&format!("{f}.enc.res_skip_layers.{j}")))
                        .collect::<Result<_>>()?,
                    post: w.conv(&format!("{f}.post"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // The generator's shape from its weights and geometry.
        let ups = w.count("dec.ups", "weight");
        let nk = w.count("dec.resblocks", "convs.0.weight") / ups.max(1);
        let geo = |n: &str| {
            arch.convs
                .get(n)
                .copied()
                .ok_or_else(|| ModelError::Load(format!("arch.json has no geometry for {n}")))
        };
        let mut dec_cfg = HifiGanConfig {
            resblock: "2".into(),
            num_mels: w.get("dec.conv_pre.weight")?.dim(1)?,
            upsample_rates: Vec::new(),
            upsample_kernel_sizes: Vec::new(),
            upsample_initial_channel: w.get("dec.conv_pre.weight")?.dim(0)?,
            resblock_kernel_sizes: Vec::new(),
            resblock_dilation_sizes: Vec::new(),
            sampling_rate: cfg.audio.sample_rate,
            n_fft: 1024,
            hop_size: 256,
            win_size: 1024,
            fmin: 0.0,
            fmax: 8000.0,
        };
        for u in 0..ups {
            dec_cfg
                .upsample_rates
                .push(geo(&format!("dec.ups.{u}.weight"))?.stride);
            dec_cfg
                .upsample_kernel_sizes
                .push(w.get(&format!("dec.ups.{u}.weight"))?.dim(2)?);
        }
        for j in 0..nk {
            dec_cfg.resblock_kernel_sizes.push(
                w.get(&format!("dec.resblocks.{j}.convs.0.weight"))?
                    .dim(2)?,
            );
            let convs = w.count(&format!("dec.resblocks.{j}.convs"), "weight");
            dec_cfg.resblock_dilation_sizes.push(
                (0..convs)
                    .map(|m| {
                        geo(&format!("dec.resblocks.{j}.convs.{m}.weight")).map(|g| g.dilation)
                    })
                    .collect::<Result<_>>()?,
            );
        }
        let dec = HifiGan::new(dec_cfg, w.vb.pp("dec"))?;
        Ok(Self {
            emb: w.get("enc_p.emb.weight")?,
            proj: w.conv("enc_p.proj")?,
            dp_pre: w.conv("dp.pre")?,
            dp_dds: Dds::load(&w, "dp.convs")?,
            dp_proj: w.conv("dp.proj")?,
            dp_m: w.get("dp.flows.0.m")?,
            dp_exp_neg_logs: w.get("dp.flows.0.exp_neg_logs")?,
            layers,
            dp_flows,
            couplings,
            dec,
            device: device.clone(),
            cfg,
        })
    }

    /// The voice's configuration.
    pub fn config(&self) -> &VoiceConfig {
        &self.cfg
    }

    /// Output rate.
    pub fn sample_rate(&self) -> u32 {
        self.cfg.audio.sample_rate
    }

    /// Samples per frame.
    pub fn hop(&self) -> usize {
        self.dec.hop()
    }

    /// The voice's default scales.
    pub fn default_options(&self) -> SynthesisOptions {
        let s = self.cfg.inference;
        SynthesisOptions {
            noise_scale: s.noise_scale,
            length_scale: s.length_scale,
            noise_w: s.noise_w,
            seed: 0,
        }
    }

    /// Phoneme ids of IPA phonemes, framed as Piper frames them: `^`, a pad
    /// after every phoneme, `$`. Characters the voice lacks are skipped.
    pub fn phoneme_ids(&self, phonemes: &str) -> Vec<i64> {
        let map = &self.cfg.phoneme_id_map;
        let get = |c: &str| map.get(c).cloned().unwrap_or_default();
        let pad = get("_");
        let mut ids = get("^");
        ids.extend(&pad);
        for ch in phonemes.chars() {
            let ch = ch.to_string();
            if let Some(v) = map.get(&ch) {
                ids.extend(v);
                ids.extend(&pad);
            }
        }
        ids.extend(get("$"));
        ids
    }

    /// Text encoder: prior means and log-scales (B, C, T) and the hidden states.
    fn encode(&self, ids: &[i64]) -> Result<(Tensor, Tensor, Tensor)> {
        let idx = Tensor::from_vec(
            ids.iter().map(|i| *i as u32).collect::<Vec<_>>(),
            ids.len(),
            &self.device,
        )?;
        let c = self.emb.dim(1)?;
        let x = (self.emb.index_select(&idx, 0)? * (c as f64).sqrt())?;
        let mut x = x.t()?.unsqueeze(0)?.contiguous()?;
        for l in &self.layers {
            x = l.forward(&x)?;
        }
        let stats = self.proj.forward(&x)?;
        let half = stats.dim(1)? / 2;
        Ok((stats.narrow(1, 0, half)?, stats.narrow(1, half, half)?, x))
    }

    /// Log-durations (T) of the text encoder's states, the duration predictor run backwards.
    fn log_durations(&self, x: &Tensor, noise_w: f32, seed: u64) -> Result<Vec<f32>> {
        let t = x.dim(2)?;
        let h = self
            .dp_proj
            .forward(&self.dp_dds.forward(&self.dp_pre.forward(x)?, None)?)?;
        let noise = normal(2 * t, seed.wrapping_add(1));
        let mut z: Vec<Vec<f32>> = (0..2)
            .map(|c| (0..t).map(|i| noise[c * t + i] * noise_w).collect())
            .collect();
        for f in &self.dp_flows {
            z.swap(0, 1); // Flip
            let x0 = Tensor::from_vec(z[0].clone(), (1, 1, t), &self.device)?;
            let g = f.dds.forward(&f.pre.forward(&x0)?, Some(&h))?;
            let p = f.proj.forward(&g)?.squeeze(0)?; // (3·bins − 1, T)
            let p: Vec<Vec<f32>> = p.t()?.to_vec2()?;
            let s = (f.filter as f32).sqrt();
            for (i, row) in p.iter().enumerate() {
                let b = f.bins;
                let w: Vec<f32> = row[..b].iter().map(|v| v / s).collect();
                let hh: Vec<f32> = row[b..2 * b].iter().map(|v| v / s).collect();
                z[1][i] = spline_inverse(z[1][i], &w, &hh, &row[2 * b..], 5.0);
            }
        }
        z.swap(0, 1); // the last Flip before the affine flow
        let m: Vec<f32> = self.dp_m.flatten_all()?.to_vec1()?;
        let e: Vec<f32> = self.dp_exp_neg_logs.flatten_all()?.to_vec1()?;
        Ok(z[0].iter().map(|v| (v - m[0]) * e[0]).collect())
    }

    /// Synthesises phoneme ids.
    pub fn synthesize_ids(&self, ids: &[i64], opts: &SynthesisOptions) -> Result<Synthesis> {
        if ids.len() < 2 {
            return Err(ModelError::Input("nothing to say".into()));
        }
        let (m, logs, x) = self.encode(ids)?;
        let logw = self.log_durations(&x, opts.noise_w, opts.seed)?;
        let durations: Vec<u32> = logw
            .iter()
            .map(|l| (l.exp() * opts.length_scale).ceil().max(0.0) as u32)
            .collect();
        let frames: usize = durations.iter().map(|d| *d as usize).sum::<usize>().max(1);
        // Stretch the prior: phoneme i fills its frames.
        let mut index = Vec::with_capacity(frames);
        for (i, d) in durations.iter().enumerate() {
            index.extend(std::iter::repeat_n(i as u32, *d as usize));
        }
        if index.is_empty() {
            index.push(0);
        }
        let index = Tensor::from_vec(index, frames, &self.device)?;
        let m = m.index_select(&index, 2)?;
        let logs = logs.index_select(&index, 2)?;
        let c = m.dim(1)?;
        let eps = Tensor::from_vec(normal(c * frames, opts.seed), (1, c, frames), &self.device)?;
        let mut z = (m + (eps * logs.exp()?)?.affine(f64::from(opts.noise_scale), 0.0)?)?;
        for cpl in self.couplings.iter().rev() {
            z = z.flip(&[1])?; // Flip
            z = cpl.reverse(&z)?;
        }
        let wave = self.dec.forward(&z)?.i(0)?.to_vec1::<f32>()?;
        Ok(Synthesis {
            samples: wave,
            durations,
        })
    }

    /// One sentence of text: espeak-ng phonemes, then VITS, peak-normalised
    /// as Piper does (to 0.95 of full scale).
    pub fn synthesize_sentence(
        &self,
        sentence: &super::Sentence,
        opts: &SynthesisOptions,
    ) -> Result<Vec<f32>> {
        let phonemes = super::phonemize(sentence, &self.cfg.espeak.voice)?;
        let ids = self.phoneme_ids(&phonemes);
        let mut samples = self.synthesize_ids(&ids, opts)?.samples;
        let peak = samples.iter().fold(0f32, |m, x| m.max(x.abs())).max(0.01);
        for x in &mut samples {
            *x *= 0.95 / peak;
        }
        Ok(samples)
    }

    /// Samples of the pause spoken between sentences (0.2 s, as Piper).
    pub fn sentence_gap(&self) -> usize {
        self.sample_rate() as usize / 5
    }

    /// The frames (B, C, T) the generator takes for ids, with no noise: for tests.
    pub fn latent_without_noise(&self, ids: &[i64]) -> Result<(Tensor, Vec<f32>, Tensor)> {
        let (m, _, x) = self.encode(ids)?;
        let logw = self.log_durations(&x, 0.0, 0)?;
        Ok((m, logw.iter().map(|l| l.exp()).collect(), x))
    }
}
