"""Asks the fleet's HTTP API for a diarized transcript with OpenAI's own
Python client (the extension field `diarize` through `extra_body`), and reads
the WebVTT answer's voices with the independent `webvtt-py`.

Usage: diarize_client.py BASE_URL AUDIO_FILE

Prints {"segments": [[start, end, speaker], ...], "words": n,
"words_with_speaker": n, "vtt_voices": [...], "one": [...]} on stdout.
"""

import io
import json
import sys

import openai
import webvtt


def main():
    base, path = sys.argv[1:3]
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)
    audio = open(path, "rb").read()

    def transcribe(**kw):
        return client.audio.transcriptions.create(
            model="whisper-1", file=("meeting.wav", audio, "audio/wav"), **kw
        )

    v = transcribe(response_format="verbose_json", extra_body={"diarize": "true"})
    segs = [[s.start, s.end, s.model_extra.get("speaker")] for s in v.segments]
    words = v.words or []
    vtt = transcribe(response_format="vtt", extra_body={"diarize": "true"})
    voices = [c.voice for c in webvtt.from_buffer(io.StringIO(vtt))]
    one = transcribe(response_format="verbose_json", extra_body={"max_speakers": "1"})
    json.dump(
        {
            "segments": segs,
            "words": len(words),
            "words_with_speaker": sum(1 for w in words if w.model_extra.get("speaker")),
            "vtt_voices": voices,
            "one": sorted({s.model_extra.get("speaker") for s in one.segments}),
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
