"""Writes tone.m4a (AAC-LC in MP4) for the AAC decoding test: Debian main has no
AAC encoder, so this one fixture is made with PyAV (pip install av) and committed.
The signal is the test's own: 0.4 sin(440 Hz) + 0.2 sin(1000 Hz), 1 s at 16 kHz."""

import av
import numpy as np

RATE = 16000
t = np.arange(RATE) / RATE
x = (0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
with av.open("tone.m4a", "w", format="mp4") as out:
    s = out.add_stream("aac", rate=RATE, layout="mono")
    s.bit_rate = 64000
    frame = av.AudioFrame.from_ndarray(x[None, :], format="fltp", layout="mono")
    frame.sample_rate = RATE
    for p in s.encode(frame):
        out.mux(p)
    for p in s.encode(None):
        out.mux(p)
