//! FireFly-GAN decoder (Fish-Speech 1.4's codec): codes → waveform.
//!
//! Decoding runs the codec's quantiser backwards and then its generator:
//!
//! 1. Grouped FSQ dequantisation: each of `n_groups` codebooks holds an index
//!    into the implicit grid of `levels` (e.g. 8·5·5·5 = 1000 codes); its
//!    digits map to values in [-1, 1) and `project_out` lifts them to the
//!    group's share of `input_dim`; groups are concatenated.
//! 2. Upsampling to the generator's rate: per `downsample_factor` (in
//!    reverse) a transposed convolution of kernel = stride = factor and a
//!    ConvNeXt block (causal depthwise conv, LayerNorm, MLP, layer scale).
//! 3. The generator: HiFi-GAN-shaped with causal convolutions, SiLU, and
//!    parallel residual blocks averaged.
//!
//! Every convolution is causal, so [`FireflyStream`] decodes in chunks with
//! a bounded left context and gives the same samples as one whole decode.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv1d, Conv1dConfig, LayerNorm, Linear, VarBuilder, layer_norm, linear};
use serde::Deserialize;

use crate::error::{ModelError, Result};

/// Quantiser dimensions.
#[derive(Debug, Clone, Deserialize)]
pub struct QuantizerConfig {
    /// Latent width (512).
    pub input_dim: usize,
    /// Codebooks (8).
    pub n_groups: usize,
    /// FSQ levels of each codebook (`[8, 5, 5, 5]`).
    pub levels: Vec<u32>,
    /// Time downsampling of the encoder side (`[2, 2]`).
    pub downsample_factor: Vec<usize>,
}

/// Generator dimensions.
#[derive(Debug, Clone, Deserialize)]
pub struct HeadConfig {
    /// Input channels (the latent width).
    pub num_mels: usize,
    /// Channels after the first convolution.
    pub upsample_initial_channel: usize,
    /// Upsampling factors.
    pub upsample_rates: Vec<usize>,
    /// Their kernels.
    pub upsample_kernel_sizes: Vec<usize>,
    /// Kernels of the parallel residual blocks.
    pub resblock_kernel_sizes: Vec<usize>,
    /// Dilations of each.
    pub resblock_dilation_sizes: Vec<Vec<usize>>,
    /// First convolution's kernel.
    pub pre_conv_kernel_size: usize,
    /// Last convolution's kernel.
    pub post_conv_kernel_size: usize,
}

/// `config.json` of a FireFly checkpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct FireflyConfig {
    /// `firefly-gan`.
    pub model_type: String,
    /// Output rate (44100 for Fish-Speech 1.4).
    pub sample_rate: u32,
    /// Quantiser.
    pub quantizer: QuantizerConfig,
    /// Generator.
    pub head: HeadConfig,
}

#[derive(Debug, Clone)]
struct CausalConv {
    conv: Conv1d,
    pad: usize,
}

impl CausalConv {
    fn load(
        cin: usize,
        cout: usize,
        k: usize,
        dilation: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cfg = Conv1dConfig {
            dilation,
            groups,
            ..Default::default()
        };
        Ok(Self {
            conv: candle_nn::conv1d(cin, cout, k, cfg, vb.pp("conv"))?,
            pad: (k - 1) * dilation,
        })
    }

    /// Left context in samples.
    fn context(&self) -> usize {
        self.pad
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.conv.forward(&x.pad_with_zeros(2, self.pad, 0)?)?)
    }
}

#[derive(Debug, Clone)]
struct CausalTransConv {
    conv: super::TransConv1d,
    trim: usize,
    stride: usize,
}

impl CausalTransConv {
    fn load(cin: usize, cout: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: super::TransConv1d::load(cin, cout, k, stride, 0, vb.pp("conv"))?,
            trim: k - stride,
            stride,
        })
    }

    /// Left context in input samples.
    fn context(&self) -> usize {
        self.trim.div_ceil(self.stride)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv.forward(x)?;
        let n = y.dim(2)? - self.trim;
        Ok(y.narrow(2, 0, n)?)
    }
}

#[derive(Debug, Clone)]
struct ConvNeXt {
    dwconv: CausalConv,
    norm: LayerNorm,
    pwconv1: Linear,
    pwconv2: Linear,
    gamma: Tensor,
}

impl ConvNeXt {
    fn load(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            dwconv: CausalConv::load(dim, dim, 7, 1, dim, vb.pp("dwconv"))?,
            norm: layer_norm(dim, 1e-6, vb.pp("norm"))?,
            pwconv1: linear(dim, 4 * dim, vb.pp("pwconv1"))?,
            pwconv2: linear(4 * dim, dim, vb.pp("pwconv2"))?,
            gamma: vb.get(dim, "gamma")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.dwconv.forward(x)?.transpose(1, 2)?;
        let y = self.norm.forward(&y)?;
        let y = self
            .pwconv2
            .forward(&crate::ops::gelu_erf(&self.pwconv1.forward(&y)?)?)?;
        let y = y.broadcast_mul(&self.gamma)?.transpose(1, 2)?;
        Ok((x + y)?)
    }
}

#[derive(Debug, Clone)]
struct ResBlock {
    convs1: Vec<CausalConv>,
    convs2: Vec<CausalConv>,
}

impl ResBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for (c1, c2) in self.convs1.iter().zip(&self.convs2) {
            let y = c2.forward(&c1.forward(&x.silu()?)?.silu()?)?;
            x = (x + y)?;
        }
        Ok(x)
    }

    fn context(&self) -> usize {
        self.convs1
            .iter()
            .chain(&self.convs2)
            .map(CausalConv::context)
            .sum()
    }
}

/// A FireFly-GAN decoder.
#[derive(Debug, Clone)]
pub struct Firefly {
    cfg: FireflyConfig,
    project_out: Vec<Linear>,
    upsample: Vec<(CausalTransConv, ConvNeXt)>,
    conv_pre: CausalConv,
    ups: Vec<CausalTransConv>,
    resblocks: Vec<Vec<ResBlock>>,
    conv_post: CausalConv,
    device: Device,
}

impl Firefly {
    /// Loads a folder with `config.json` and `model.safetensors` (weight norm folded).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg: FireflyConfig = serde_json::from_slice(
            &std::fs::read(&cfg_path)
                .map_err(|e| ModelError::Load(format!("{}: {e}", cfg_path.display())))?,
        )
        .map_err(|e| {
            ModelError::Load(format!("{}: not a FireFly config: {e}", cfg_path.display()))
        })?;
        if cfg.model_type != "firefly-gan" {
            return Err(ModelError::Load(format!(
                "{}: model_type {:?} is not \"firefly-gan\"",
                cfg_path.display(),
                cfg.model_type
            )));
        }
        let weights = dir.join("model.safetensors");
        let bytes = std::fs::read(&weights)
            .map_err(|e| ModelError::Load(format!("{}: {e}", weights.display())))?;
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, device)?;
        Self::new(cfg, vb).map_err(|e| ModelError::Load(format!("{}: {e}", weights.display())))
    }

    /// Builds the decoder from weights.
    pub fn new(cfg: FireflyConfig, vb: VarBuilder) -> Result<Self> {
        let q = &cfg.quantizer;
        if q.n_groups == 0 || !q.input_dim.is_multiple_of(q.n_groups) {
            return Err(ModelError::Load(format!(
                "input_dim {} is not a multiple of n_groups {}",
                q.input_dim, q.n_groups
            )));
        }
        let qv = vb.pp("quantizer");
        let project_out = (0..q.n_groups)
            .map(|g| {
                linear(
                    q.levels.len(),
                    q.input_dim / q.n_groups,
                    qv.pp(format!("residual_fsq.rvqs.{g}.project_out")),
                )
            })
            .collect::<candle_core::Result<_>>()?;
        let upsample = q
            .downsample_factor
            .iter()
            .rev()
            .enumerate()
            .map(|(i, f)| {
                let v = qv.pp(format!("upsample.{i}"));
                Ok((
                    CausalTransConv::load(q.input_dim, q.input_dim, *f, *f, v.pp("0"))?,
                    ConvNeXt::load(q.input_dim, v.pp("1"))?,
                ))
            })
            .collect::<Result<_>>()?;
        let h = &cfg.head;
        let hv = vb.pp("head");
        let ch = h.upsample_initial_channel;
        let conv_pre = CausalConv::load(
            h.num_mels,
            ch,
            h.pre_conv_kernel_size,
            1,
            1,
            hv.pp("conv_pre"),
        )?;
        let mut ups = Vec::new();
        let mut resblocks = Vec::new();
        for (i, (u, k)) in h
            .upsample_rates
            .iter()
            .zip(&h.upsample_kernel_sizes)
            .enumerate()
        {
            let cout = ch >> (i + 1);
            ups.push(CausalTransConv::load(
                ch >> i,
                cout,
                *k,
                *u,
                hv.pp(format!("ups.{i}")),
            )?);
            let blocks = h
                .resblock_kernel_sizes
                .iter()
                .zip(&h.resblock_dilation_sizes)
                .enumerate()
                .map(|(j, (k, ds))| {
                    let v = hv.pp(format!("resblocks.{i}.blocks.{j}"));
                    Ok(ResBlock {
                        convs1: ds
                            .iter()
                            .enumerate()
                            .map(|(m, d)| {
                                CausalConv::load(cout, cout, *k, *d, 1, v.pp(format!("convs1.{m}")))
                            })
                            .collect::<Result<_>>()?,
                        convs2: (0..ds.len())
                            .map(|m| {
                                CausalConv::load(cout, cout, *k, 1, 1, v.pp(format!("convs2.{m}")))
                            })
                            .collect::<Result<_>>()?,
                    })
                })
                .collect::<Result<_>>()?;
            resblocks.push(blocks);
        }
        let conv_post = CausalConv::load(
            ch >> h.upsample_rates.len(),
            1,
            h.post_conv_kernel_size,
            1,
            1,
            hv.pp("conv_post"),
        )?;
        Ok(Self {
            project_out,
            upsample,
            conv_pre,
            ups,
            resblocks,
            conv_post,
            device: vb.device().clone(),
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FireflyConfig {
        &self.cfg
    }

    /// Output rate.
    pub fn sample_rate(&self) -> u32 {
        self.cfg.sample_rate
    }

    /// Codes per codebook (the product of the FSQ levels).
    pub fn codebook_size(&self) -> usize {
        self.cfg
            .quantizer
            .levels
            .iter()
            .map(|l| *l as usize)
            .product()
    }

    /// Codebooks.
    pub fn codebooks(&self) -> usize {
        self.cfg.quantizer.n_groups
    }

    /// Output samples per code frame.
    pub fn hop(&self) -> usize {
        self.cfg
            .quantizer
            .downsample_factor
            .iter()
            .product::<usize>()
            * self.cfg.head.upsample_rates.iter().product::<usize>()
    }

    /// Code frames of left context that fully determine a frame's samples.
    pub fn receptive_frames(&self) -> usize {
        // Sum, layer by layer, the left context each needs at its own rate,
        // rounded up to whole code frames.
        let mut frames = 0usize;
        let mut rate = 1usize;
        for (up, block) in &self.upsample {
            frames += up.context().div_ceil(rate);
            rate *= up.stride;
            frames += block.dwconv.context().div_ceil(rate);
        }
        frames += self.conv_pre.context().div_ceil(rate);
        for (up, blocks) in self.ups.iter().zip(&self.resblocks) {
            frames += up.context().div_ceil(rate);
            rate *= up.stride;
            let widest = blocks.iter().map(ResBlock::context).max().unwrap_or(0);
            frames += widest.div_ceil(rate);
        }
        frames + self.conv_post.context().div_ceil(rate)
    }

    /// The latent (1, input_dim, frames · Π downsample) of codes (1, groups, frames).
    pub fn dequantize(&self, codes: &Tensor) -> Result<Tensor> {
        let (b, g, t) = codes.dims3()?;
        let q = &self.cfg.quantizer;
        if g != q.n_groups {
            return Err(ModelError::Input(format!(
                "{g} codebooks for a FireFly of {}",
                q.n_groups
            )));
        }
        let size = self.codebook_size() as u32;
        let idx = codes
            .to_dtype(DType::U32)?
            .flatten_all()?
            .to_vec1::<u32>()?;
        if let Some(bad) = idx.iter().find(|i| **i >= size) {
            return Err(ModelError::Input(format!(
                "code {bad} is outside the codebook of {size}"
            )));
        }
        let nl = q.levels.len();
        let mut parts = Vec::with_capacity(g);
        for (gi, proj) in self.project_out.iter().enumerate() {
            let mut vals = Vec::with_capacity(b * t * nl);
            for bi in 0..b {
                for ti in 0..t {
                    let mut i = idx[(bi * g + gi) * t + ti];
                    for l in &q.levels {
                        let digit = i % l;
                        i /= l;
                        let half = (l / 2) as f32;
                        vals.push((digit as f32 - half) / half);
                    }
                }
            }
            let v = Tensor::from_vec(vals, (b, t, nl), &self.device)?;
            parts.push(proj.forward(&v)?);
        }
        let mut z = Tensor::cat(&parts, 2)?.transpose(1, 2)?.contiguous()?;
        for (up, block) in &self.upsample {
            z = block.forward(&up.forward(&z)?)?;
        }
        Ok(z)
    }

    /// Waveform (1, frames · hop) of codes (1, groups, frames).
    pub fn decode(&self, codes: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_pre.forward(&self.dequantize(codes)?)?;
        for (up, blocks) in self.ups.iter().zip(&self.resblocks) {
            x = up.forward(&x.silu()?)?;
            let mut sum = blocks[0].forward(&x)?;
            for b in &blocks[1..] {
                sum = (sum + b.forward(&x)?)?;
            }
            x = (sum / blocks.len() as f64)?;
        }
        Ok(self.conv_post.forward(&x.silu()?)?.tanh()?.squeeze(1)?)
    }

    /// Samples of frames (F × groups).
    pub fn decode_frames(&self, frames: &[Vec<u32>]) -> Result<Vec<f32>> {
        if frames.is_empty() {
            return Ok(Vec::new());
        }
        let codes = crate::nexus::AudioDecoder::frames_tensor(frames, &self.device)?;
        Ok(self.decode(&codes)?.squeeze(0)?.to_vec1::<f32>()?)
    }
}

/// Chunked decoding: each [`FireflyStream::push`] returns the samples of the
/// frames it was given, computed over them and [`Firefly::receptive_frames`]
/// frames of history, so the concatenated chunks equal one whole decode.
#[derive(Debug, Clone)]
pub struct FireflyStream {
    model: Arc<Firefly>,
    history: Vec<Vec<u32>>,
    context: usize,
}

impl FireflyStream {
    /// A stream over `model`.
    pub fn new(model: Arc<Firefly>) -> Self {
        let context = model.receptive_frames();
        Self {
            model,
            history: Vec::new(),
            context,
        }
    }

    /// Samples of `frames` (F × groups), continuing what came before.
    pub fn push(&mut self, frames: &[Vec<u32>]) -> Result<Vec<f32>> {
        if frames.is_empty() {
            return Ok(Vec::new());
        }
        let keep = self.history.len().min(self.context);
        let start = self.history.len() - keep;
        let mut window: Vec<Vec<u32>> = self.history[start..].to_vec();
        window.extend_from_slice(frames);
        let wave = self.model.decode_frames(&window)?;
        let skip = keep * self.model.hop();
        self.history.extend_from_slice(frames);
        if self.history.len() > self.context {
            self.history.drain(..self.history.len() - self.context);
        }
        Ok(wave[skip..].to_vec())
    }
}
