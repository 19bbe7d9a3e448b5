#!/usr/bin/env python3
"""Anchor of `nexus bench tts`: the Piper voice's own ONNX export on ONNX
Runtime, on the same phoneme ids and scales. Prints JSON with the seconds
spent and samples produced per utterance.

  python piper_ort_anchor.py MODEL.onnx IDS.json THREADS
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort

model, ids_path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
opts = ort.SessionOptions()
opts.intra_op_num_threads = threads
sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
job = json.load(open(ids_path))
scales = np.array(job["scales"], dtype=np.float32)
out = []
for ids in job["utterances"]:
    x = np.array([ids], dtype=np.int64)
    t0 = time.perf_counter()
    y = sess.run(None, {"input": x, "input_lengths": np.array([len(ids)], dtype=np.int64), "scales": scales})[0]
    out.append({"seconds": time.perf_counter() - t0, "samples": int(y.size)})
print(json.dumps(out))
