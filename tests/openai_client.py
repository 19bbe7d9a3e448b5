"""Drives the fleet's HTTP API with OpenAI's own Python client, the way users do.

Usage: openai_client.py BASE_URL API_KEY AUDIO_FILE SHORT_AUDIO_FILE

Checks every response format, word and segment timestamps, streaming, the
translation endpoint with another target language, /v1/models and the error
codes; parses the SRT and WebVTT answers with the independent `srt` and
`webvtt-py` packages and checks their cue times against the word timings.
Prints one JSON object with the texts for the caller to score; exits non-zero
on the first failed check.
"""

import io
import json
import re
import sys

import openai
import srt
import webvtt


def check(cond, what):
    if not cond:
        raise SystemExit(f"check failed: {what}")


def main():
    base, key, path, short_path = sys.argv[1:5]
    client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=600)
    audio = open(path, "rb").read()

    def transcribe(model="whisper-1", **kw):
        return client.audio.transcriptions.create(
            model=model, file=("speech.wav", audio, "audio/wav"), **kw
        )

    out = {}
    # json (the default) and text.
    j = transcribe(language="en")
    check(isinstance(j.text, str) and len(j.text.split()) > 10, f"json text: {j!r}")
    out["json"] = j.text
    t = transcribe(response_format="text")
    check(isinstance(t, str) and t.strip(), f"text: {t!r}")
    out["text"] = t

    # verbose_json with words and segments.
    v = transcribe(
        response_format="verbose_json", timestamp_granularities=["word", "segment"]
    )
    check(v.language == "en", f"language {v.language}")
    check(v.duration > 10, f"duration {v.duration}")
    check(len(v.segments) >= 3, f"segments {v.segments}")
    check(len(v.words) > 20, f"words {len(v.words or [])}")
    for s in v.segments:
        check(0 <= s.start < s.end <= v.duration + 0.01, f"segment span {s}")
    words_only = transcribe(response_format="verbose_json", timestamp_granularities=["word"])
    check(words_only.words and not words_only.segments, "words without segments")
    out["verbose_text"] = v.text

    # SRT and WebVTT parse, and their cues are the segments, with every word
    # of a segment inside its cue.
    srt_text = transcribe(response_format="srt")
    cues = list(srt.parse(srt_text))
    vtt = webvtt.from_buffer(io.StringIO(transcribe(response_format="vtt")))
    vcues = list(vtt)
    check(len(cues) == len(v.segments) == len(vcues), f"{len(cues)} srt, {len(vcues)} vtt cues, {len(v.segments)} segments")
    words = list(v.words)
    for cue, vcue, seg in zip(cues, vcues, v.segments):
        start, end = cue.start.total_seconds(), cue.end.total_seconds()
        check(abs(start - seg.start) < 0.002 and abs(end - seg.end) < 0.002, f"srt cue {cue} vs {seg}")
        check(abs(_vtt_seconds(vcue.start) - seg.start) < 0.002, f"vtt cue {vcue.start} vs {seg.start}")
        check(abs(_vtt_seconds(vcue.end) - seg.end) < 0.002, f"vtt cue end {vcue.end} vs {seg.end}")
        check(cue.content.strip() == seg.text.strip() == vcue.text.strip(), f"cue text {cue.content!r} / {vcue.text!r} vs {seg.text!r}")
        # The timed words that fall inside the cue spell exactly its text.
        inside = [w for w in words if w.start >= start - 0.01 and w.end <= end + 0.01]
        spelled = _letters("".join(w.word for w in inside))
        check(spelled == _letters(seg.text), f"words inside cue {start}-{end}: {spelled!r} vs {seg.text!r}")
    out["cues"] = len(cues)

    # Streaming: deltas add up to the final text.
    deltas, done = [], None
    for ev in transcribe(stream=True):
        if ev.type == "transcript.text.delta":
            deltas.append(ev.delta)
        elif ev.type == "transcript.text.done":
            done = ev.text
    check(done is not None and len(deltas) >= 2, f"stream events: {deltas} / {done!r}")
    check("".join(deltas) == done, "deltas add up to the done text")
    out["stream"] = done

    # Translation into any target language (an extra field of ours).
    tr = client.audio.translations.create(
        model="whisper-1",
        file=("short.wav", open(short_path, "rb").read(), "audio/wav"),
        response_format="verbose_json",
        extra_body={"target_language": "de"},
    )
    check(tr.text and tr.segments and tr.segments[0].translation, f"translation {tr!r}")
    out["translation"] = tr.text
    out["translation_language"] = getattr(tr, "target_language", None)

    # Models.
    ids = [m.id for m in client.models.list()]
    check("whisper-1" in ids, f"models {ids}")
    out["models"] = ids

    # Errors come back as the exceptions OpenAI's client raises.
    try:
        transcribe(model="whisper-9000")
        check(False, "unknown model accepted")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "not served here" in e.message, f"bad model: {e}")
        out["bad_model"] = e.message
    try:
        transcribe(response_format="yaml")
        check(False, "unknown format accepted")
    except openai.BadRequestError as e:
        check("use text, json" in e.message, f"bad format: {e}")
    try:
        transcribe(response_format="srt", timestamp_granularities=["word"])
        check(False, "granularities with srt accepted")
    except openai.BadRequestError as e:
        check("verbose_json" in e.message, f"granularity: {e}")
    try:
        client.audio.transcriptions.create(model="whisper-1", file=("x.wav", b"RIFF....junk", "audio/wav"))
        check(False, "junk audio accepted")
    except openai.BadRequestError as e:
        check("could not be read" in e.message, f"junk audio: {e}")
    bad = openai.OpenAI(base_url=base, api_key="not-a-key", max_retries=0)
    try:
        bad.models.list()
        check(False, "bad key accepted")
    except openai.AuthenticationError as e:
        check(e.status_code == 401 and "not valid" in e.message, f"bad key: {e}")
        out["bad_key"] = e.message
    print(json.dumps(out))


def _letters(text):
    return re.sub(r"\W", "", text).lower()


def _vtt_seconds(ts):
    h, m, s = ts.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


if __name__ == "__main__":
    main()
