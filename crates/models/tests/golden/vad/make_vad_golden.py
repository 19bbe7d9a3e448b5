"""Reference Silero VAD probabilities for nexus-models' candle implementation.

The reference is the silero-vad 6.2.3 package's own `tinygrad_model.py`
forward pass, executed by tinygrad on the package's `silero_vad_16k.safetensors`,
fed as its docstring shows: 512 new samples per call preceded by the previous
call's last 64 samples, LSTM state carried.

Note: that safetensors checkpoint is not the one inside the package's ONNX
exports (only the STFT basis is shared), so onnxruntime on the ONNX files is
not a reference for it.

Run from this folder (writes vad_clip.wav and vad_probs.npy):

    pip download --no-deps silero-vad==6.2.3 && unzip -o silero_vad-6.2.3-py3-none-any.whl 'silero_vad/*'
    pip install tinygrad numpy && DEV=CPU python3 make_vad_golden.py  # tinygrad CPU needs clang SPEECH_16K_MONO.wav
"""

import sys
import wave

import importlib.util

import numpy as np
from tinygrad import Tensor
from tinygrad.nn.state import load_state_dict, safe_load

# Load the reference module by path: the package's __init__ imports torch, which is not needed here.
_spec = importlib.util.spec_from_file_location("tinygrad_model", "silero_vad/tinygrad_model.py")
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
TinySileroVAD = _mod.TinySileroVAD


def main() -> None:
    with wave.open(sys.argv[1]) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        speech = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768.0
    rng = np.random.default_rng(6)
    # 1 s of silence, 3 s of speech, 1 s of faint noise, 1 s of a loud hum.
    clip = np.concatenate([
        np.zeros(16000, np.float32),
        speech[:48000],
        (0.003 * rng.standard_normal(16000)).astype(np.float32),
        (0.3 * np.sin(2 * np.pi * 120 * np.arange(16000) / 16000)).astype(np.float32),
    ])
    pcm = np.clip(np.round(clip * 32767), -32768, 32767).astype(np.int16)
    with wave.open("vad_clip.wav", "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    x = pcm.astype(np.float32) / 32768.0

    model = TinySileroVAD()
    load_state_dict(model, safe_load("silero_vad/data/silero_vad_16k.safetensors"))
    state = None
    context = np.zeros((1, 64), np.float32)
    probs = []
    for start in range(0, len(x) - 511, 512):
        chunk = np.concatenate([context, x[None, start : start + 512]], axis=1)
        out, state = model(Tensor(chunk), state)
        state = state.realize()
        probs.append(float(out.numpy().reshape(-1)[0]))
        context = chunk[:, -64:]
    np.save("vad_probs.npy", np.array(probs, dtype=np.float32))
    print(len(probs), "steps; speech steps:", int((np.array(probs) > 0.5).sum()))


if __name__ == "__main__":
    main()
