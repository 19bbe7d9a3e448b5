#!/usr/bin/env python3
"""Diarization anchor for `nexus bench diarize`: Resemblyzer's own GE2E
encoder (PyTorch) with a simple clustering, on the same recordings and the
same speech regions as the fleet.

Reads a JSON job on stdin: {"wheel": the Resemblyzer 0.1.4 wheel, "weights":
its pretrained.pt, "threshold": t, "items": [{"wav": path, "regions":
[[start_s, end_s], ...], "min": n, "max": n}]} (`nexus bench diarize` passes
the wheel and checkpoint `nexus models pull ge2e` verified). For each recording it
embeds partials every 0.25 s over the whole waveform the reference's way
(`embed_utterance(wav, return_partials=True, rate=4)`), keeps those whose
centre lies in a speech region, clusters them with SciPy's average-linkage
agglomerative clustering on cosine distance cut at 1 - threshold (held to
[min, max] clusters), and gives each region's stretches to the nearest
partial. Prints {"items": [{"turns": [[start, end, speaker], ...],
"seconds": s}]} on stdout.

    python3 -m venv /tmp/venv-ref
    /tmp/venv-ref/bin/pip install torch==2.5.1 numpy==2.1.3 librosa==0.10.2.post1 scipy
    nexus bench diarize --anchor-python /tmp/venv-ref/bin/python
"""

import json
import sys
import time
import types
import wave

import numpy as np

sys.modules.setdefault("webrtcvad", types.ModuleType("webrtcvad"))

import torch  # noqa: E402
from scipy.cluster.hierarchy import fcluster, linkage  # noqa: E402

RATE = 4.0


def read(path):
    with wave.open(path) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


def labels_for(embeds, threshold, lo, hi):
    n = len(embeds)
    if n == 1:
        return np.zeros(1, dtype=int)
    z = linkage(embeds, method="average", metric="cosine")
    lab = fcluster(z, t=1.0 - threshold, criterion="distance")
    k = len(set(lab))
    if k < lo or k > hi:
        lab = fcluster(z, t=min(max(k, lo), hi, n), criterion="maxclust")
    return lab - 1


def main():
    job = json.load(sys.stdin)
    sys.path.insert(0, job["wheel"])  # a pure-Python wheel imports as a zip
    from resemblyzer import VoiceEncoder, audio
    from resemblyzer.hparams import audio_norm_target_dBFS

    torch.set_num_threads(1)
    enc = VoiceEncoder("cpu", verbose=False, weights_fpath=job["weights"])
    out = []
    for item in job["items"]:
        wav = audio.normalize_volume(read(item["wav"]), audio_norm_target_dBFS, increase_only=True)
        t0 = time.perf_counter()
        _, partials, slices = enc.embed_utterance(wav.astype(np.float32), return_partials=True, rate=RATE)
        centres = np.array([(s.start + s.stop) / 2 / 16000 for s in slices])
        regions = item["regions"]
        keep = [i for i, c in enumerate(centres) if any(a <= c < b for a, b in regions)]
        turns = []
        if keep:
            lab = labels_for(partials[keep], job["threshold"], item["min"], item["max"])
            kc = centres[keep]
            for a, b in regions:
                step = 0.05
                t = a
                while t < b:
                    e = min(b, t + step)
                    s = int(lab[np.argmin(np.abs(kc - (t + e) / 2))])
                    if turns and turns[-1][2] == s and abs(turns[-1][1] - t) < 1e-9:
                        turns[-1][1] = e
                    else:
                        turns.append([t, e, s])
                    t = e
        out.append({"turns": turns, "seconds": time.perf_counter() - t0})
    json.dump({"items": out}, sys.stdout)


if __name__ == "__main__":
    main()
