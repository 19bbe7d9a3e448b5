#!/usr/bin/env python3
"""Independent PyTorch reference of one step of `nexus train adapter`.

A small seeded Qwen2 language model (transformers' Qwen2ForCausalLM, frozen)
and a seeded NEXUS-O adapter (5 encoder frames concatenated -> Linear -> exact
GELU -> Linear). The adapter's output replaces the audio placeholder rows of a
prompt's embeddings; the loss is the mean cross-entropy of the reply tokens
given everything before them; one torch.optim.AdamW step follows.

Writes crates/train/tests/golden/adapter_step.safetensors: the LM weights
(Hugging Face names), the adapter's initial weights, the frames, the prompt and
reply ids, the loss, the adapter's gradients and its weights after the step.
The Rust test (crates/train/tests/adapter_golden.rs) must reproduce them.

Run: scripts/setup.sh --nexus-reference installs torch==2.5.1 and
transformers==4.46.3 into .venv-ref; then
  .venv-ref/bin/python scripts/adapter_step_reference.py crates/train/tests/golden
"""

import os
import sys

import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

D_ENC, STACK, HIDDEN, D_LM, VOCAB = 16, 5, 24, 32, 256
AUDIO, START, END, IM_START, IM_END = 250, 251, 252, 253, 254
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01


def main(out):
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=D_LM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    lm = Qwen2ForCausalLM(cfg).eval()
    # Larger weights than the init's 0.02 so the gradients are not tiny.
    with torch.no_grad():
        for p in lm.parameters():
            p.normal_(0.0, 0.3)
        for n, p in lm.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    for p in lm.parameters():
        p.requires_grad_(False)

    lin1 = torch.nn.Linear(D_ENC * STACK, HIDDEN)
    lin2 = torch.nn.Linear(HIDDEN, D_LM)
    groups = 3
    frames = torch.randn(groups * STACK, D_ENC)
    prompt = [IM_START, 10, 11, 12, IM_END, IM_START, 13, START] + [AUDIO] * groups + [END, 14, 15, IM_END, IM_START, 16]
    reply = [40, 41, 42, 43, 44, IM_END]
    init = {
        "adapter.linear1.weight": lin1.weight.detach().clone(),
        "adapter.linear1.bias": lin1.bias.detach().clone(),
        "adapter.linear2.weight": lin2.weight.detach().clone(),
        "adapter.linear2.bias": lin2.bias.detach().clone(),
    }

    x = frames.reshape(1, groups, D_ENC * STACK)
    audio = lin2(torch.nn.functional.gelu(lin1(x), approximate="none"))[0]
    ids = torch.tensor(prompt + reply)
    emb = lm.model.embed_tokens(ids).clone()
    rows = [i for i, t in enumerate(prompt) if t == AUDIO]
    emb = torch.cat([emb[: rows[0]], audio, emb[rows[-1] + 1 :]], 0)
    logits = lm(inputs_embeds=emb[None]).logits[0]
    p = len(prompt)
    loss = torch.nn.functional.cross_entropy(logits[p - 1 : p - 1 + len(reply)], torch.tensor(reply))
    loss.backward()
    grads = {
        "grad.linear1.weight": lin1.weight.grad.clone(),
        "grad.linear1.bias": lin1.bias.grad.clone(),
        "grad.linear2.weight": lin2.weight.grad.clone(),
        "grad.linear2.bias": lin2.bias.grad.clone(),
    }
    opt = torch.optim.AdamW([lin1.weight, lin1.bias, lin2.weight, lin2.bias], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    opt.step()
    after = {
        "after.linear1.weight": lin1.weight.detach().clone(),
        "after.linear1.bias": lin1.bias.detach().clone(),
        "after.linear2.weight": lin2.weight.detach().clone(),
        "after.linear2.bias": lin2.bias.detach().clone(),
    }
    lm_w = {f"lm.{k}": v.contiguous() for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    t = {
        **lm_w,
        **init,
        **grads,
        **after,
        "frames": frames,
        "prompt_ids": torch.tensor(prompt, dtype=torch.int64),
        "reply_ids": torch.tensor(reply, dtype=torch.int64),
        "loss": loss.detach().reshape(1),
    }
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(out, "adapter_step.safetensors"))
    print(f"loss {loss.item():.6f}; wrote {out}/adapter_step.safetensors")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "crates/train/tests/golden")
