"""Anchor for `nexus bench asr`: faster-whisper on the same CTranslate2 weights.

Prints one JSON object: per-file hypothesis text, total audio seconds, wall
seconds of transcription (model load excluded), and the process's peak RSS.

    python3 faster_whisper_anchor.py MODEL_DIR COMPUTE_TYPE THREADS BEAM FILE...
"""

import json
import resource
import sys
import time
import wave


def duration(path: str) -> float:
    with wave.open(path) as w:
        return w.getnframes() / w.getframerate()


def main() -> None:
    model_dir, compute_type, threads, beam = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    files = sys.argv[5:]
    from faster_whisper import WhisperModel

    model = WhisperModel(model_dir, device="cpu", compute_type=compute_type, cpu_threads=threads, num_workers=1)
    out = {"files": {}, "audio_s": 0.0, "wall_s": 0.0}
    for f in files:
        t0 = time.perf_counter()
        segments, info = model.transcribe(f, beam_size=beam, language=None, vad_filter=False)
        text = "".join(s.text for s in segments)
        out["wall_s"] += time.perf_counter() - t0
        out["audio_s"] += duration(f)
        out["files"][f] = text.strip()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps(out))


if __name__ == "__main__":
    main()
