"""WhisperLive's server as the live anchor of `nexus-loadtest --protocol whisperlive`.

Runs WhisperLive (PyPI `whisper-live`, faster-whisper backend, CPU int8,
one model shared by every client, faster-whisper's own Silero VAD per
client request) on the given port, over the CTranslate2 weights in
MODEL_DIR: the same weights `nexus bench asr` gives faster-whisper.

    python whisperlive.py PORT MODEL_DIR MAX_CLIENTS

WhisperLive imports PyTorch at module level only to ask whether CUDA is
there; its faster-whisper path runs no PyTorch code. Where PyTorch is not
installed (its wheels with their CUDA libraries are gigabytes), a module
that answers "no CUDA" stands in for it. Install:

    python3 -m venv /tmp/wlvenv
    /tmp/wlvenv/bin/pip install faster-whisper==1.2.1
    /tmp/wlvenv/bin/pip install --no-deps whisper-live==0.10.0
    /tmp/wlvenv/bin/pip install fastapi uvicorn python-multipart websockets
"""

import importlib.util
import logging
import sys
import types


def no_cuda_torch() -> types.ModuleType:
    torch = types.ModuleType("torch")
    cuda = types.ModuleType("torch.cuda")
    cuda.is_available = lambda: False

    def capability(*_args, **_kwargs):
        raise RuntimeError("no CUDA in this stand-in")

    cuda.get_device_capability = capability
    torch.cuda = cuda
    return torch


def main() -> None:
    port, model_dir, max_clients = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    if importlib.util.find_spec("torch") is None:
        torch = no_cuda_torch()
        sys.modules["torch"] = torch
        sys.modules["torch.cuda"] = torch.cuda
    logging.basicConfig(level=logging.WARNING)
    from whisper_live.server import TranscriptionServer

    TranscriptionServer().run(
        "127.0.0.1",
        port=port,
        backend="faster_whisper",
        faster_whisper_custom_model_path=model_dir,
        single_model=True,
        max_clients=max_clients,
        max_connection_time=3600,
    )


if __name__ == "__main__":
    main()
