#!/usr/bin/env python3
"""Golden outputs of the GE2E speaker encoder, from its reference implementation.

Runs Resemblyzer 0.1.4's own `VoiceEncoder` (PyTorch) and `audio` module
(librosa) on real speech and writes what crates/models/src/speaker must
reproduce: the 40-bin mel spectrogram, the embeddings of the 1.6 s partials
and the utterance embedding (their normalised mean), for three clips of three
different readers.

    python3 -m venv /tmp/venv-ref
    /tmp/venv-ref/bin/pip install torch==2.5.1 numpy==2.1.3 librosa==0.10.2.post1 scipy
    pip download --no-deps resemblyzer==0.1.4 && unzip Resemblyzer-0.1.4-py3-none-any.whl -d /tmp/rz
    PYTHONPATH=/tmp/rz /tmp/venv-ref/bin/python \
        crates/models/tests/golden/speaker/make_speaker_golden.py .cache/testdata \
        crates/models/tests/golden/speaker/golden.json

Only the reference's `webrtcvad` silence trimming is left out (the fleet cuts
speech with its own VAD): the waveform is read, volume-normalised the
reference's way (`normalize_volume`, -30 dBFS, increase only) and embedded
with `embed_utterance` (rate 1.3, min coverage 0.75).
"""

import json
import sys
import types
import wave

import numpy as np

# resemblyzer.audio imports webrtcvad (a C extension) for the trimming this
# script does not use; a stand-in module keeps the import from failing.
sys.modules.setdefault("webrtcvad", types.ModuleType("webrtcvad"))

import torch  # noqa: E402
from resemblyzer import VoiceEncoder, audio  # noqa: E402
from resemblyzer.hparams import audio_norm_target_dBFS  # noqa: E402

CLIPS = [
    ("librivox/sense_and_sensibility_01_austen_64kb-0870.wav", "austen"),
    ("speechbrain/ASR/spk1_snt1.wav", "spk1"),
    ("speechbrain/ASR/spk2_snt1.wav", "spk2"),
]


def read16k(path):
    with wave.open(path) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


def main():
    data, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    enc = VoiceEncoder("cpu", verbose=False)
    clips = []
    for rel, reader in CLIPS:
        wav = audio.normalize_volume(read16k(f"{data}/{rel}"), audio_norm_target_dBFS, increase_only=True)
        wav = wav.astype(np.float32)
        mel = audio.wav_to_mel_spectrogram(wav)
        embed, partials, slices = enc.embed_utterance(wav, return_partials=True)
        clips.append({
            "path": rel,
            "reader": reader,
            "mel_frames": int(mel.shape[0]),
            "mel_head": mel[:8].tolist(),
            "mel_frame_sums": mel.sum(axis=1).tolist(),
            "partial_starts": [int(s.start) for s in slices],
            "partials": partials.tolist(),
            "embed": embed.tolist(),
        })
    sims = [[float(np.dot(a["embed"], b["embed"])) for b in clips] for a in clips]
    with open(out, "w") as f:
        json.dump({"reference": "resemblyzer 0.1.4, torch 2.5.1, librosa 0.10.2.post1",
                   "clips": clips, "cosine": sims}, f)
    for row in sims:
        print(" ".join(f"{x:.3f}" for x in row))


if __name__ == "__main__":
    main()
