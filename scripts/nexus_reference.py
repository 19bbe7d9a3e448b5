#!/usr/bin/env python3
"""Independent PyTorch reference for the NEXUS-O model family.

Builds small seeded checkpoints of every NEXUS-O part and writes the outputs
the Rust implementation (crates/models/src/nexus, hifigan) must reproduce:

  nexus-tiny/     config.json, model.safetensors, tokenizer.json
                  tiny Whisper encoder (transformers' WhisperEncoder), the
                  5-frame adapter, a 2-layer Qwen2 LM (transformers'
                  Qwen2ForCausalLM) and a 6-layer audio decoder over 8
                  codebooks; the layout `nexus models import` accepts
  firefly-tiny/   config.json, model.safetensors: a FireFly-GAN decoder
                  (grouped FSQ dequantisation, ConvNeXt upsampling, causal
                  HiFi-GAN-style head with SiLU and parallel resblocks)
  hifigan-tiny/   config.json, generator.pth.tar: a HiFi-GAN V1 generator
                  saved like the universal checkpoint (legacy non-zip torch
                  pickle, weight norm as weight_g / weight_v)
  golden.safetensors  inputs and expected outputs

Run by `scripts/setup.sh --nexus-reference` (only to regenerate; the outputs
are committed). Needs torch==2.5.1 and transformers==4.46.3. Every output is
byte-for-byte repeatable except generator.pth.tar, whose legacy pickle names
storages by memory address (its tensors repeat).
"""

import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_multimodal_rotary_pos_emb
from transformers.models.whisper.modeling_whisper import WhisperEncoder

SEED = 20261124
OUT = sys.argv[1] if len(sys.argv) > 1 else "crates/models/tests/golden/nexus"

torch.manual_seed(SEED)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)


def jitter(module: nn.Module, gen: torch.Generator) -> None:
    """Re-draws every parameter so that biases, norms and scales all matter."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("weight") or name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


GEN = torch.Generator().manual_seed(SEED)
golden: dict[str, torch.Tensor] = {}

# ---------------------------------------------------------------- tokenizer
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_start|>", "<|audio_end|>", "<|audio|>"]
alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
tok.decoder = decoders.ByteLevel()
tok.add_special_tokens(SPECIALS)
VOCAB = tok.get_vocab_size()
ids_of = {s: tok.token_to_id(s) for s in SPECIALS}

# ---------------------------------------------------------- Whisper encoder
wcfg = WhisperConfig(
    vocab_size=VOCAB, num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4,
    decoder_layers=1, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
    max_source_positions=1500, max_target_positions=64, attn_implementation="eager",
)
encoder = WhisperEncoder(wcfg).eval()
jitter(encoder, GEN)


def sinusoids(length: int, channels: int) -> torch.Tensor:
    inc = math.log(10000) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2, dtype=torch.float64))
    t = torch.arange(length, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([t.sin(), t.cos()], dim=1).float()


with torch.no_grad():
    encoder.embed_positions.weight.copy_(sinusoids(1500, 64))

mel = (torch.rand((1, 80, 3000), generator=GEN) * 2.0 - 1.0)
with torch.no_grad():
    enc = encoder(mel).last_hidden_state
golden["whisper.mel"] = mel
golden["whisper.hidden"] = enc


# ------------------------------------------------------------------ adapter
class Adapter(nn.Module):
    """Concatenates `stack` consecutive encoder frames, then linear, GELU, linear."""

    def __init__(self, d_enc: int, stack: int, hidden: int, d_lm: int):
        super().__init__()
        self.stack = stack
        self.linear1 = nn.Linear(d_enc * stack, hidden)
        self.linear2 = nn.Linear(hidden, d_lm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        n = t // self.stack
        x = x[:, : n * self.stack].reshape(b, n, d * self.stack)
        return self.linear2(F.gelu(self.linear1(x)))


LM_HIDDEN = 64
adapter = Adapter(64, 5, 96, LM_HIDDEN).eval()
jitter(adapter, GEN)
with torch.no_grad():
    audio_embeds = adapter(enc)
golden["adapter.out"] = audio_embeds
# A short window: 347 encoder frames keep 69 groups of five.
with torch.no_grad():
    golden["adapter.short_out"] = adapter(enc[:, :347])

# ----------------------------------------------------------------- Qwen2 LM
qcfg = Qwen2Config(
    vocab_size=VOCAB, hidden_size=LM_HIDDEN, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    attn_implementation="eager", torch_dtype="float32",
)
lm = Qwen2ForCausalLM(qcfg).eval()
jitter(lm, GEN)
PROMPTS = {
    "system": "You are a helpful assistant.",
    "transcribe": "Transcribe the audio.",
    "transcribe_language": "Transcribe the audio. The speech is in {language}.",
    "translate": "Translate the audio into {target}.",
    "chat": "Answer the speaker.",
}


def chatml(user: str) -> str:
    return (
        f"<|im_start|>system\n{PROMPTS['system']}<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )


n_audio = audio_embeds.shape[1]
prompt = chatml("<|audio_start|>" + "<|audio|>" * n_audio + "<|audio_end|>" + PROMPTS["transcribe"])
prompt_ids = tok.encode(prompt, add_special_tokens=False).ids
assert prompt_ids.count(ids_of["<|audio|>"]) == n_audio
prompt_ids_t = torch.tensor([prompt_ids])


def spliced(ids: torch.Tensor) -> torch.Tensor:
    emb = lm.get_input_embeddings()(ids).clone()
    mask = ids[0] == ids_of["<|audio|>"]
    emb[0, mask] = audio_embeds[0]
    return emb


with torch.no_grad():
    out = lm(inputs_embeds=spliced(prompt_ids_t), output_hidden_states=True)
golden["lm.prompt_ids"] = prompt_ids_t.to(torch.int64)
golden["lm.logits"] = out.logits[0]

# Greedy decoding, recomputing the whole sequence at every step (no cache),
# with the final-norm hidden state of the position that produced each token.
ids = list(prompt_ids)
generated, hiddens = [], []
with torch.no_grad():
    for _ in range(16):
        o = lm(inputs_embeds=spliced(torch.tensor([ids])), output_hidden_states=True)
        nxt = int(o.logits[0, -1].argmax())
        if nxt == ids_of["<|im_end|>"]:
            break
        generated.append(nxt)
        hiddens.append(o.hidden_states[-1][0, -1])
        ids.append(nxt)
golden["lm.greedy"] = torch.tensor(generated, dtype=torch.int64)
golden["lm.greedy_hidden"] = torch.stack(hiddens)

# Multimodal RoPE (Qwen2-VL): three position rows (time, height, width) over
# sections of the rotary half; equal rows reduce to 1-D RoPE.
HEAD_DIM = 16
MROPE = [2, 3, 3]
q = torch.randn((1, 4, 6, HEAD_DIM), generator=GEN)
k = torch.randn((1, 2, 6, HEAD_DIM), generator=GEN)
pos = torch.tensor([[[0, 1, 2, 3, 3, 5]], [[0, 1, 2, 4, 5, 5]], [[0, 1, 2, 2, 7, 5]]])
inv = 1.0 / (1000000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
freqs = pos[..., None].float() * inv
emb = torch.cat([freqs, freqs], dim=-1)
qr, kr = apply_multimodal_rotary_pos_emb(q, k, emb.cos(), emb.sin(), MROPE)
golden["mrope.q"], golden["mrope.k"], golden["mrope.positions"] = q, k, pos[:, 0].to(torch.int64)
golden["mrope.q_rot"], golden["mrope.k_rot"] = qr, kr


# ------------------------------------------------------------ audio decoder
class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    d = x.shape[-1]
    inv_f = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    f = positions[:, None].float() * inv_f
    cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class AudioLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.input_layernorm = RMSNorm(d)
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.post_attention_layernorm = RMSNorm(d)
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x, theta):
        b, t, d = x.shape
        h = self.input_layernorm(x)
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        pos = torch.arange(t)
        qh, kh, vh = split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h))
        qh, kh = rope(qh, pos, theta), rope(kh, pos, theta)
        att = (qh @ kh.transpose(-1, -2)) / math.sqrt(d // self.heads)
        att = att.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
        y = (att.softmax(-1) @ vh).transpose(1, 2).reshape(b, t, d)
        x = x + self.o_proj(y)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class AudioDecoder(nn.Module):
    """8 codebooks, delay pattern; input = mean of the 8 code embeddings and the LM state."""

    def __init__(self, d_lm, d, layers, heads, ffn, codebooks, codebook_size, theta=10000.0):
        super().__init__()
        self.k, self.v, self.theta = codebooks, codebook_size, theta
        # rows: codebook_size codes, EOS (= codebook_size), PAD/BOS (= codebook_size + 1)
        self.embeddings = nn.ModuleList(nn.Embedding(codebook_size + 2, d) for _ in range(codebooks))
        self.lm_proj = nn.Linear(d_lm, d)
        self.layers = nn.ModuleList(AudioLayer(d, heads, ffn) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.heads = nn.ModuleList(nn.Linear(d, codebook_size + 1, bias=False) for _ in range(codebooks))

    def forward(self, codes_prev: torch.Tensor, lm_h: torch.Tensor) -> torch.Tensor:
        e = sum(self.embeddings[i](codes_prev[..., i]) for i in range(self.k))
        x = (e + self.lm_proj(lm_h)) / (self.k + 1)
        for layer in self.layers:
            x = layer(x, self.theta)
        x = self.norm(x)
        return torch.stack([h(x) for h in self.heads], dim=2)

    def generate(self, lm_h: torch.Tensor, max_frames: int):
        """Greedy codes in the delay pattern; returns (steps x K delayed, frames x K)."""
        eos, pad = self.v, self.v + 1
        steps = [[pad] * self.k]  # step -1: BOS for every codebook
        conds = []
        frames = None
        t = 0
        while True:
            cond = lm_h[t] if t < lm_h.shape[0] else torch.zeros(lm_h.shape[1])
            conds.append(cond)
            logits = self.forward(torch.tensor([steps]), torch.stack(conds)[None])[0, -1]
            row = []
            for i in range(self.k):
                f = t - i
                if f < 0:
                    row.append(pad)
                elif frames is not None and f >= frames:
                    row.append(eos)
                elif i == 0:
                    c = int(logits[0].argmax())
                    if f >= max_frames:
                        c = eos
                    row.append(c)
                else:
                    row.append(int(logits[i, : self.v].argmax()))
            if frames is None and row[0] == eos:
                frames = t
            steps.append(row)
            t += 1
            if frames is not None and t >= frames + self.k:
                break
        delayed = torch.tensor(steps[1:])
        undone = torch.stack([delayed[f: f + self.k].diagonal() for f in range(frames)]) if frames else torch.zeros((0, self.k), dtype=torch.int64)
        return delayed, undone


CODEBOOK = 15  # the tiny FireFly's FSQ levels [5, 3]
audio_dec = AudioDecoder(LM_HIDDEN, 32, 6, 4, 64, 8, CODEBOOK).eval()
jitter(audio_dec, GEN)
with torch.no_grad():
    h_text = golden["lm.greedy_hidden"]
    tf_codes = torch.randint(0, CODEBOOK + 2, (1, 9, 8), generator=GEN)
    tf_h = torch.randn((1, 9, LM_HIDDEN), generator=GEN)
    golden["audio.tf_codes"], golden["audio.tf_h"] = tf_codes, tf_h
    golden["audio.tf_logits"] = audio_dec(tf_codes, tf_h)
    delayed, undone = audio_dec.generate(h_text, max_frames=40)
golden["audio.delayed"], golden["audio.codes"] = delayed.to(torch.int64), undone.to(torch.int64)
print(f"text tokens {len(generated)}, audio frames {undone.shape[0]}", file=sys.stderr)

# ------------------------------------------------------------------ FireFly


class FishConvNet(nn.Module):
    """Causal conv: all padding on the left."""

    def __init__(self, cin, cout, k, dilation=1, groups=1):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, k, dilation=dilation, groups=groups)
        self.pad = (k - 1) * dilation

    def forward(self, x):
        return self.conv(F.pad(x, (self.pad, 0)))


class FishTransConvNet(nn.Module):
    """Transposed conv that keeps T * stride samples (drops the right overhang)."""

    def __init__(self, cin, cout, k, stride):
        super().__init__()
        self.conv = nn.ConvTranspose1d(cin, cout, k, stride=stride)
        self.trim = k - stride

    def forward(self, x):
        y = self.conv(x)
        return y[..., : y.shape[-1] - self.trim] if self.trim else y


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim, k=7):
        super().__init__()
        self.dwconv = FishConvNet(dim, dim, k, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = self.dwconv(x).transpose(1, 2)
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + y.transpose(1, 2)


class ProjectOut(nn.Module):
    def __init__(self, n_levels, d):
        super().__init__()
        self.project_out = nn.Linear(n_levels, d)


class ResBlock1(nn.Module):
    def __init__(self, ch, k, dilations):
        super().__init__()
        self.convs1 = nn.ModuleList(FishConvNet(ch, ch, k, dilation=d) for d in dilations)
        self.convs2 = nn.ModuleList(FishConvNet(ch, ch, k) for _ in dilations)

    def forward(self, x):
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.silu(c1(F.silu(x))))
        return x


class ParallelBlock(nn.Module):
    def __init__(self, ch, kernels, dilations):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock1(ch, k, d) for k, d in zip(kernels, dilations))

    def forward(self, x):
        return torch.stack([b(x) for b in self.blocks]).mean(0)


class FireflyHead(nn.Module):
    def __init__(self, c):
        super().__init__()
        ch = c["upsample_initial_channel"]
        self.conv_pre = FishConvNet(c["num_mels"], ch, c["pre_conv_kernel_size"])
        self.ups = nn.ModuleList(
            FishTransConvNet(ch >> i, ch >> (i + 1), k, u)
            for i, (u, k) in enumerate(zip(c["upsample_rates"], c["upsample_kernel_sizes"]))
        )
        self.resblocks = nn.ModuleList(
            ParallelBlock(ch >> (i + 1), c["resblock_kernel_sizes"], c["resblock_dilation_sizes"])
            for i in range(len(self.ups))
        )
        self.conv_post = FishConvNet(ch >> len(self.ups), 1, c["post_conv_kernel_size"])

    def forward(self, x):
        x = self.conv_pre(x)
        for up, rb in zip(self.ups, self.resblocks):
            x = rb(up(F.silu(x)))
        return torch.tanh(self.conv_post(F.silu(x)))


class Quantizer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.levels = c["levels"]
        d = c["input_dim"]
        self.residual_fsq = nn.Module()
        self.residual_fsq.rvqs = nn.ModuleList(ProjectOut(len(self.levels), d // c["n_groups"]) for _ in range(c["n_groups"]))
        self.upsample = nn.ModuleList(
            nn.Sequential(FishTransConvNet(d, d, f, f), ConvNeXtBlock(d)) for f in reversed(c["downsample_factor"])
        )

    def decode(self, indices):  # (B, groups, T)
        lv = torch.tensor(self.levels)
        basis = torch.cumprod(torch.tensor([1] + self.levels[:-1]), 0)
        parts = []
        for g, rvq in enumerate(self.residual_fsq.rvqs):
            li = (indices[:, g, :, None] // basis) % lv
            half = lv // 2
            codes = (li - half).float() / half.float()
            parts.append(rvq.project_out(codes))
        z = torch.cat(parts, -1).transpose(1, 2)
        for up in self.upsample:
            z = up(z)
        return z


FIREFLY = {
    "model_type": "firefly-gan", "sample_rate": 16000,
    "quantizer": {"input_dim": 32, "n_groups": 8, "levels": [5, 3], "downsample_factor": [2, 2]},
    "head": {
        "num_mels": 32, "upsample_initial_channel": 32, "upsample_rates": [4, 4],
        "upsample_kernel_sizes": [8, 8], "resblock_kernel_sizes": [3, 5],
        "resblock_dilation_sizes": [[1, 3], [1, 3]], "pre_conv_kernel_size": 7, "post_conv_kernel_size": 7,
    },
}


class Firefly(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.quantizer = Quantizer(c["quantizer"])
        self.head = FireflyHead(c["head"])

    def decode(self, indices):
        return self.head(self.quantizer.decode(indices))[:, 0]


firefly = Firefly(FIREFLY).eval()
jitter(firefly, GEN)
with torch.no_grad():
    ff_codes = torch.randint(0, CODEBOOK, (1, 8, 23), generator=GEN)
    golden["firefly.codes"] = ff_codes.to(torch.int64)
    golden["firefly.latent"] = firefly.quantizer.decode(ff_codes)
    golden["firefly.wave"] = firefly.decode(ff_codes)
    # The audio decoder's own codes, frames x codebooks -> groups x frames.
    if undone.shape[0]:
        golden["firefly.from_audio"] = firefly.decode(undone.T[None])


# ----------------------------------------------------------------- HiFi-GAN V1
class HResBlock1(nn.Module):
    def __init__(self, ch, k, dilations):
        super().__init__()
        wn = nn.utils.weight_norm
        self.convs1 = nn.ModuleList(wn(nn.Conv1d(ch, ch, k, 1, dilation=d, padding=(k * d - d) // 2)) for d in dilations)
        self.convs2 = nn.ModuleList(wn(nn.Conv1d(ch, ch, k, 1, dilation=1, padding=(k - 1) // 2)) for _ in dilations)

    def forward(self, x):
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, 0.1)), 0.1))
        return x


class HifiGan(nn.Module):
    def __init__(self, h):
        super().__init__()
        wn = nn.utils.weight_norm
        ch = h["upsample_initial_channel"]
        self.nk = len(h["resblock_kernel_sizes"])
        self.conv_pre = wn(nn.Conv1d(h["num_mels"], ch, 7, 1, padding=3))
        self.ups = nn.ModuleList(
            wn(nn.ConvTranspose1d(ch >> i, ch >> (i + 1), k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(h["upsample_rates"], h["upsample_kernel_sizes"]))
        )
        self.resblocks = nn.ModuleList(
            HResBlock1(ch >> (i + 1), k, d)
            for i in range(len(self.ups))
            for k, d in zip(h["resblock_kernel_sizes"], h["resblock_dilation_sizes"])
        )
        self.conv_post = wn(nn.Conv1d(ch >> len(self.ups), 1, 7, 1, padding=3))

    def forward(self, x):
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, 0.1))
            x = sum(self.resblocks[i * self.nk + j](x) for j in range(self.nk)) / self.nk
        return torch.tanh(self.conv_post(F.leaky_relu(x)))


HIFIGAN = {
    "resblock": "1", "num_mels": 80, "upsample_rates": [4, 4], "upsample_kernel_sizes": [8, 8],
    "upsample_initial_channel": 32, "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "sampling_rate": 22050,
    "hop_size": 16, "n_fft": 64, "win_size": 64, "fmin": 0, "fmax": 8000,
}
hifigan = HifiGan(HIFIGAN).eval()
jitter(hifigan, GEN)
with torch.no_grad():
    hmel = torch.randn((1, 80, 30), generator=GEN) - 5.0
    golden["hifigan.mel"] = hmel
    golden["hifigan.wave"] = hifigan(hmel)[:, 0]

# -------------------------------------------------------------------- write
for sub in ("nexus-tiny", "firefly-tiny", "hifigan-tiny"):
    os.makedirs(os.path.join(OUT, sub), exist_ok=True)

tensors = {}
for n, p in encoder.state_dict().items():
    if n != "embed_positions.weight":  # sinusoidal: recomputed by the loader
        tensors["audio_encoder." + n] = p
tensors.update({"adapter." + n: p for n, p in adapter.state_dict().items()})
tensors.update({"lm." + n: p for n, p in lm.state_dict().items()})
tensors.update({"audio_decoder." + n: p for n, p in audio_dec.state_dict().items()})
save_file({n: t.contiguous() for n, t in tensors.items()}, os.path.join(OUT, "nexus-tiny", "model.safetensors"))
tok.save(os.path.join(OUT, "nexus-tiny", "tokenizer.json"))
config = {
    "model_type": "nexus-o",
    "audio_encoder": {k: getattr(wcfg, k) for k in (
        "num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
        "max_source_positions")},
    "adapter": {"stack": 5, "hidden_size": 96, "activation": "gelu"},
    "lm": {k: getattr(qcfg, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings")}
    | {"mrope_section": MROPE},
    "audio_decoder": {"hidden_size": 32, "num_hidden_layers": 6, "num_attention_heads": 4,
                      "intermediate_size": 64, "codebooks": 8, "codebook_size": CODEBOOK,
                      "rope_theta": 10000.0, "rms_norm_eps": 1e-6},
    "tokens": {"audio": "<|audio|>", "audio_start": "<|audio_start|>", "audio_end": "<|audio_end|>",
               "im_start": "<|im_start|>", "im_end": "<|im_end|>", "eos": "<|endoftext|>"},
    "prompts": PROMPTS,
    "vocoder": "firefly-tiny",
}
with open(os.path.join(OUT, "nexus-tiny", "config.json"), "w") as f:
    json.dump(config, f, indent=2)
    f.write("\n")

save_file({n: t.contiguous() for n, t in firefly.state_dict().items()}, os.path.join(OUT, "firefly-tiny", "model.safetensors"))
with open(os.path.join(OUT, "firefly-tiny", "config.json"), "w") as f:
    json.dump(FIREFLY, f, indent=2)
    f.write("\n")

torch.save({"generator": hifigan.state_dict()}, os.path.join(OUT, "hifigan-tiny", "generator.pth.tar"),
           _use_new_zipfile_serialization=False)
with open(os.path.join(OUT, "hifigan-tiny", "config.json"), "w") as f:
    json.dump(HIFIGAN, f, indent=2)
    f.write("\n")

golden["meta.greedy_text"] = torch.tensor(list(tok.decode(generated).encode("utf-8")), dtype=torch.int64)
save_file({n: t.contiguous() for n, t in golden.items()}, os.path.join(OUT, "golden.safetensors"))
total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(OUT) for f in fs)
print(f"wrote {OUT}: {total / 1e6:.2f} MB", file=sys.stderr)
