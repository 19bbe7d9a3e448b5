#!/usr/bin/env python3
"""Reference outputs of the Piper en_US-joe-medium voice from ONNX Runtime.

The Rust port of VITS (crates/models/src/tts/piper.rs) must reproduce them
with the noise scales at zero (deterministic): the text encoder's prior
means, the predicted durations and the waveform. Writes
crates/models/tests/golden/piper/golden.safetensors.

  python scripts/piper_reference.py MODEL_DIR [OUT]

MODEL_DIR is the fetched voice (`nexus models pull piper-en-us-joe-medium`,
its source/ folder). Needs onnx==1.17.0 and onnxruntime==1.20.1.
"""
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import save_file

src = sys.argv[1]
out = sys.argv[2] if len(sys.argv) > 2 else "crates/models/tests/golden/piper"
model = onnx.load(os.path.join(src, "model.onnx"))
voice = json.load(open(os.path.join(src, "model.onnx.json")))
idmap = voice["phoneme_id_map"]

# "Hello there." as espeak-ng writes it in IPA, framed as Piper frames it:
# ^ BOS, a pad after every phoneme, $ EOS.
phonemes = "həlˈoʊ ðˈɛɹ."
ids = idmap["^"] + idmap["_"]
for ch in phonemes:
    ids += idmap[ch] + idmap["_"]
ids += idmap["$"]

wanted = {}
for node in model.graph.node:
    if node.name == "/enc_p/Split":
        wanted["m_p"], wanted["logs_p"] = node.output[0], node.output[1]
    if node.name == "/Ceil":
        wanted["w"] = node.input[0]
    if node.name == "/dec/conv_pre/Conv":
        wanted["z"] = node.input[0]
for name in wanted.values():
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
names = [o.name for o in sess.get_outputs()]
res = sess.run(None, {
    "input": np.array([ids], dtype=np.int64),
    "input_lengths": np.array([len(ids)], dtype=np.int64),
    "scales": np.array([0.0, 1.0, 0.0], dtype=np.float32),
})
by = dict(zip(names, res))
golden = {"ids": np.array(ids, dtype=np.int64), "wave": by["output"].reshape(-1).astype(np.float32)}
for k, name in wanted.items():
    golden[k] = by[name].astype(np.float32)
os.makedirs(out, exist_ok=True)
save_file(golden, os.path.join(out, "golden.safetensors"))
print({k: v.shape for k, v in golden.items()}, file=sys.stderr)
