//! HiFi-GAN (V1 and V2/V3 residual blocks): mel spectrogram → waveform, and
//! the mel spectrogram it was trained on (jik876's `mel_spectrogram`).
//!
//! Loads what `nexus models pull hifigan-universal` writes: `model.safetensors`
//! with weight norm folded, and the generator's `config.json`.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv1d, Conv1dConfig, VarBuilder};
use realfft::RealFftPlanner;
use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::mel::mel_filter_bank_range;

/// The generator's `config.json` (jik876's names).
#[derive(Debug, Clone, Deserialize)]
pub struct HifiGanConfig {
    /// `"1"` (V1) or `"2"` (V2/V3).
    pub resblock: String,
    /// Mel bins in (80).
    #[serde(default = "n_mels")]
    pub num_mels: usize,
    /// Upsampling factors; their product is the hop.
    pub upsample_rates: Vec<usize>,
    /// Kernel of each upsampling layer.
    pub upsample_kernel_sizes: Vec<usize>,
    /// Channels after the first convolution.
    pub upsample_initial_channel: usize,
    /// Kernels of the parallel residual blocks.
    pub resblock_kernel_sizes: Vec<usize>,
    /// Dilations of each residual block.
    pub resblock_dilation_sizes: Vec<Vec<usize>>,
    /// Output rate (22050).
    pub sampling_rate: u32,
    /// STFT size of the mel frontend.
    #[serde(default = "n_fft")]
    pub n_fft: usize,
    /// Hop of the mel frontend.
    #[serde(default = "hop")]
    pub hop_size: usize,
    /// Window of the mel frontend.
    #[serde(default = "n_fft")]
    pub win_size: usize,
    /// Lowest mel frequency.
    #[serde(default)]
    pub fmin: f64,
    /// Highest mel frequency.
    #[serde(default = "fmax")]
    pub fmax: f64,
}

fn n_mels() -> usize {
    80
}
fn n_fft() -> usize {
    1024
}
fn hop() -> usize {
    256
}
fn fmax() -> f64 {
    8000.0
}

#[derive(Debug, Clone)]
enum ResBlock {
    One {
        convs1: Vec<Conv1d>,
        convs2: Vec<Conv1d>,
    },
    Two {
        convs: Vec<Conv1d>,
    },
}

fn leaky(x: &Tensor, slope: f64) -> Result<Tensor> {
    Ok(x.maximum(&(x * slope)?)?)
}

fn conv(cin: usize, cout: usize, k: usize, dilation: usize, vb: VarBuilder) -> Result<Conv1d> {
    let cfg = Conv1dConfig {
        padding: (k * dilation - dilation) / 2,
        dilation,
        ..Default::default()
    };
    Ok(candle_nn::conv1d(cin, cout, k, cfg, vb)?)
}

impl ResBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        match self {
            Self::One { convs1, convs2 } => {
                for (c1, c2) in convs1.iter().zip(convs2) {
                    let y = c2.forward(&leaky(&c1.forward(&leaky(&x, 0.1)?)?, 0.1)?)?;
                    x = (x + y)?;
                }
            }
            Self::Two { convs } => {
                for c in convs {
                    x = (&x + c.forward(&leaky(&x, 0.1)?)?)?;
                }
            }
        }
        Ok(x)
    }
}

/// A HiFi-GAN generator.
#[derive(Debug, Clone)]
pub struct HifiGan {
    cfg: HifiGanConfig,
    conv_pre: Conv1d,
    ups: Vec<super::TransConv1d>,
    resblocks: Vec<ResBlock>,
    conv_post: Conv1d,
    /// Mel filters of [`HifiGan::mel_spectrogram`], made on first use (a
    /// generator inside VITS never needs them).
    filters: Arc<std::sync::OnceLock<Vec<f32>>>,
    device: Device,
}

impl HifiGan {
    /// Loads a folder with `config.json` and `model.safetensors`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg: HifiGanConfig = serde_json::from_slice(
            &std::fs::read(&cfg_path)
                .map_err(|e| ModelError::Load(format!("{}: {e}", cfg_path.display())))?,
        )
        .map_err(|e| {
            ModelError::Load(format!(
                "{}: not a HiFi-GAN config: {e}",
                cfg_path.display()
            ))
        })?;
        let weights = dir.join("model.safetensors");
        let bytes = std::fs::read(&weights).map_err(|e| {
            ModelError::Load(format!(
                "{}: {e}; convert the checkpoint first (`nexus models pull hifigan-universal`)",
                weights.display()
            ))
        })?;
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, device)?;
        Self::new(cfg, vb).map_err(|e| ModelError::Load(format!("{}: {e}", weights.display())))
    }

    /// Builds the generator from weights.
    pub fn new(cfg: HifiGanConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.upsample_rates.len() != cfg.upsample_kernel_sizes.len()
            || cfg.resblock_kernel_sizes.len() != cfg.resblock_dilation_sizes.len()
        {
            return Err(ModelError::Load(
                "HiFi-GAN config lists of unequal length".into(),
            ));
        }
        let ch = cfg.upsample_initial_channel;
        let conv_pre = conv(cfg.num_mels, ch, 7, 1, vb.pp("conv_pre"))?;
        let mut ups = Vec::new();
        let mut resblocks = Vec::new();
        for (i, (u, k)) in cfg
            .upsample_rates
            .iter()
            .zip(&cfg.upsample_kernel_sizes)
            .enumerate()
        {
            let (cin, cout) = (ch >> i, ch >> (i + 1));
            ups.push(super::TransConv1d::load(
                cin,
                cout,
                *k,
                *u,
                (k - u) / 2,
                vb.pp(format!("ups.{i}")),
            )?);
            for (j, (k, ds)) in cfg
                .resblock_kernel_sizes
                .iter()
                .zip(&cfg.resblock_dilation_sizes)
                .enumerate()
            {
                let vb = vb.pp(format!(
                    "resblocks.{}",
                    i * cfg.resblock_kernel_sizes.len() + j
                ));
                let block = match cfg.resblock.as_str() {
                    "1" => ResBlock::One {
                        convs1: ds
                            .iter()
                            .enumerate()
                            .map(|(m, d)| conv(cout, cout, *k, *d, vb.pp(format!("convs1.{m}"))))
                            .collect::<Result<_>>()?,
                        convs2: (0..ds.len())
                            .map(|m| conv(cout, cout, *k, 1, vb.pp(format!("convs2.{m}"))))
                            .collect::<Result<_>>()?,
                    },
                    "2" => ResBlock::Two {
                        convs: ds
                            .iter()
                            .enumerate()
                            .map(|(m, d)| conv(cout, cout, *k, *d, vb.pp(format!("convs.{m}"))))
                            .collect::<Result<_>>()?,
                    },
                    other => {
                        return Err(ModelError::Load(format!(
                            "resblock type {other:?} is not HiFi-GAN's \"1\" or \"2\""
                        )));
                    }
                };
                resblocks.push(block);
            }
        }
        let post_in = ch >> cfg.upsample_rates.len();
        // VITS generators (Piper) have no bias on the last convolution.
        let conv_post = if vb.contains_tensor("conv_post.bias") {
            conv(post_in, 1, 7, 1, vb.pp("conv_post"))?
        } else {
            let cfg = Conv1dConfig {
                padding: 3,
                ..Default::default()
            };
            candle_nn::conv1d_no_bias(post_in, 1, 7, cfg, vb.pp("conv_post"))?
        };
        Ok(Self {
            conv_pre,
            ups,
            resblocks,
            conv_post,
            filters: Arc::default(),
            device: vb.device().clone(),
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &HifiGanConfig {
        &self.cfg
    }

    /// Output samples per mel frame.
    pub fn hop(&self) -> usize {
        self.cfg.upsample_rates.iter().product()
    }

    /// Waveform (B, frames · hop) of log-mel (B, num_mels, frames).
    pub fn forward(&self, mel: &Tensor) -> Result<Tensor> {
        let nk = self.cfg.resblock_kernel_sizes.len();
        let mut x = self.conv_pre.forward(mel)?;
        for (i, up) in self.ups.iter().enumerate() {
            x = up.forward(&leaky(&x, 0.1)?)?;
            let mut sum = self.resblocks[i * nk].forward(&x)?;
            for j in 1..nk {
                sum = (sum + self.resblocks[i * nk + j].forward(&x)?)?;
            }
            x = (sum / nk as f64)?;
        }
        // The last activation uses PyTorch's default slope.
        let x = self.conv_post.forward(&leaky(&x, 0.01)?)?.tanh()?;
        Ok(x.squeeze(1)?)
    }

    /// Waveform of 1-D samples' worth of log-mel, as f32 samples.
    pub fn synthesize(&self, mel: &Tensor) -> Result<Vec<f32>> {
        let mel = if mel.rank() == 2 {
            mel.unsqueeze(0)?
        } else {
            mel.clone()
        };
        Ok(self
            .forward(&mel.to_device(&self.device)?)?
            .squeeze(0)?
            .to_vec1::<f32>()?)
    }

    /// The log-mel spectrogram HiFi-GAN takes, (num_mels, frames) with one
    /// frame per hop: reflect-padded by (n_fft − hop)/2, Hann window, STFT
    /// magnitude, mel filters over fmin..fmax, natural log clamped at 1e-5.
    pub fn mel_spectrogram(&self, samples: &[f32]) -> Result<Tensor> {
        let c = &self.cfg;
        let filters = self.filters.get_or_init(|| {
            mel_filter_bank_range(c.sampling_rate, c.n_fft, c.num_mels, c.fmin, c.fmax)
        });
        let pad = (c.n_fft - c.hop_size) / 2;
        if samples.len() <= pad {
            return Err(ModelError::Input(format!(
                "{} samples are too few for a mel frame (more than {pad} needed)",
                samples.len()
            )));
        }
        let n = samples.len() as isize;
        let at = |i: isize| -> f32 {
            let j = if i < 0 {
                -i
            } else if i >= n {
                2 * (n - 1) - i
            } else {
                i
            };
            samples[j as usize]
        };
        let padded: Vec<f32> = (-(pad as isize)..n + pad as isize).map(at).collect();
        let frames = (padded.len() - c.n_fft) / c.hop_size + 1;
        // Periodic Hann window of win_size, centred in n_fft.
        let off = (c.n_fft - c.win_size) / 2;
        let window: Vec<f32> = (0..c.n_fft)
            .map(|i| {
                if i < off || i >= off + c.win_size {
                    0.0
                } else {
                    let k = (i - off) as f64;
                    (0.5 - 0.5 * (2.0 * std::f64::consts::PI * k / c.win_size as f64).cos()) as f32
                }
            })
            .collect();
        let n_freq = c.n_fft / 2 + 1;
        let fft = RealFftPlanner::<f32>::new().plan_fft_forward(c.n_fft);
        let mut input = fft.make_input_vec();
        let mut spec = fft.make_output_vec();
        let mut out = vec![0f32; c.num_mels * frames];
        let mut mag = vec![0f32; n_freq];
        for t in 0..frames {
            let start = t * c.hop_size;
            for (i, v) in input.iter_mut().enumerate() {
                *v = padded[start + i] * window[i];
            }
            fft.process(&mut input, &mut spec)
                .map_err(|e| ModelError::Input(format!("STFT: {e}")))?;
            for (m, s) in mag.iter_mut().zip(&spec) {
                *m = (s.re * s.re + s.im * s.im + 1e-9).sqrt();
            }
            for m in 0..c.num_mels {
                let row = &filters[m * n_freq..(m + 1) * n_freq];
                let e: f32 = row.iter().zip(&mag).map(|(w, x)| w * x).sum();
                out[m * frames + t] = e.max(1e-5).ln();
            }
        }
        Ok(Tensor::from_vec(out, (c.num_mels, frames), &self.device)?)
    }
}
