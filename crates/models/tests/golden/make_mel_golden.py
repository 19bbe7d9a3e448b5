"""Golden log-mel values for nexus-models, from an independent implementation.

Builds the features the way OpenAI's whisper/audio.py does, but with numpy for
the STFT and librosa for the filter bank (Whisper's shipped mel_filters.npz was
made with librosa.filters.mel). Run from this folder:

    pip install numpy librosa && python3 make_mel_golden.py
"""

import librosa
import numpy as np

SR, N_FFT, HOP = 16000, 400, 160


def log_mel(audio: np.ndarray, n_mels: int) -> np.ndarray:
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    padded = np.pad(audio.astype(np.float64), N_FFT // 2, mode="reflect")
    n_frames = 1 + (len(padded) - N_FFT) // HOP
    frames = np.stack([padded[i * HOP : i * HOP + N_FFT] * window for i in range(n_frames)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (frames, 201)
    power = power[:-1].T  # drop the last frame, as whisper does
    filters = librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=n_mels).astype(np.float64)
    mel = filters @ power
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def main() -> None:
    rng = np.random.default_rng(20261123)
    t = np.arange(SR) / SR
    # A chirp, two steady tones and noise: energy across the whole band, silence at the end.
    audio = 0.3 * np.sin(2 * np.pi * (200 * t + 3000 * t**2)) + 0.2 * np.sin(2 * np.pi * 440 * t)
    audio += 0.1 * np.sin(2 * np.pi * 5000 * t) + 0.02 * rng.standard_normal(SR)
    audio[-2000:] = 0.0
    audio = audio.astype(np.float32)
    np.save("mel_input.npy", audio)
    for n in (80, 128):
        np.save(f"mel_filters_{n}.npy", librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=n).astype(np.float32))
        np.save(f"log_mel_{n}.npy", log_mel(audio, n))


if __name__ == "__main__":
    main()
