"""Clients of the fleet's /v1/realtime WebSocket that the fleet did not write.

  realtime_client.py sdk PORT AUDIO24K   the official openai SDK's realtime client,
                                        unchanged: prints each server event as a
                                        JSON line, then {"done": ...}
  realtime_client.py raw PORT KEY AUDIO16K AUDIO24K
                                        the `websockets` library and a raw socket:
                                        every event type, bad input, auth, resume,
                                        idle and a client that never reads;
                                        asserts, printing "ok <case>" for each

AUDIO24K / AUDIO16K: 16-bit mono PCM at 24 / 16 kHz (three LibriVox utterances
with pauses). tests/realtime.rs runs both against `nexus serve`.
"""

import asyncio
import base64
import json
import socket
import struct
import sys
import time


def b64(b):
    return base64.b64encode(b).decode()


async def sdk(port, path):
    from openai import AsyncOpenAI

    pcm = open(path, "rb").read()
    client = AsyncOpenAI(
        api_key="unused-on-an-open-server",
        base_url=f"http://127.0.0.1:{port}/v1",
        websocket_base_url=f"ws://127.0.0.1:{port}/v1",
    )
    async with client.beta.realtime.connect(
        model="whisper-1", extra_query={"intent": "transcription"}
    ) as conn:
        await conn.transcription_session.update(
            session={
                "input_audio_format": "pcm16",
                "input_audio_transcription": {"model": "whisper-1", "language": "en"},
                "turn_detection": {"type": "server_vad"},
            }
        )
        sent = asyncio.Event()

        async def send():
            step = 24000 * 2 // 10  # 100 ms
            t0 = time.monotonic()
            for n, i in enumerate(range(0, len(pcm), step)):
                await conn.input_audio_buffer.append(audio=b64(pcm[i : i + step]))
                await asyncio.sleep(max(0.0, t0 + (n + 1) * 0.1 - time.monotonic()))
            sent.set()

        task = asyncio.create_task(send())
        committed, completed = set(), set()
        while not (sent.is_set() and committed and committed == completed):
            try:
                ev = await asyncio.wait_for(conn.recv(), 0.5)
            except asyncio.TimeoutError:
                continue
            print(json.dumps(ev.model_dump()), flush=True)
            if ev.type == "input_audio_buffer.committed":
                committed.add(ev.item_id)
            if ev.type == "conversation.item.input_audio_transcription.completed":
                completed.add(ev.item_id)
            if ev.type == "error":
                break
        await task
    print(json.dumps({"done": True}), flush=True)


# --- raw clients -------------------------------------------------------------

import websockets  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402


class Conn:
    """One connection with an event reader that keeps every event."""

    def __init__(self, ws):
        self.ws = ws
        self.events = []
        self.cond = asyncio.Condition()
        self.reader = asyncio.create_task(self._read())
        self.closed = None

    async def _read(self):
        try:
            async for m in self.ws:
                async with self.cond:
                    self.events.append(json.loads(m))
                    self.cond.notify_all()
        except websockets.ConnectionClosed:
            pass
        async with self.cond:
            self.closed = self.ws.close_code
            self.cond.notify_all()

    async def wait(self, pred, what, timeout=60):
        async def check():
            async with self.cond:
                await self.cond.wait_for(lambda: pred(self.events) or self.closed is not None)
                if not pred(self.events):
                    raise AssertionError(f"connection closed ({self.closed}) before {what}: {self.events[-3:]}")

        try:
            await asyncio.wait_for(check(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"no {what} within {timeout} s: {self.events[-5:]}")

    def of(self, kind):
        return [e for e in self.events if e["type"] == kind]

    async def next_of(self, kind, after, what=None):
        await self.wait(lambda ev: any(e["type"] == kind for e in ev[after:]), what or kind)
        return [e for e in self.events[after:] if e["type"] == kind][0]

    async def send(self, **ev):
        await self.ws.send(json.dumps(ev))


def url(port, extra=""):
    return f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription{extra}"


async def open_conn(port, key, extra=""):
    ws = await connect(url(port, extra), additional_headers={"Authorization": f"Bearer {key}"}, max_size=None)
    c = Conn(ws)
    await c.wait(lambda ev: ev and ev[0]["type"] == "transcription_session.created", "transcription_session.created")
    return c


FMT16 = {"type": "audio/pcm", "rate": 16000}


async def stream(c, pcm, rate, binary=False, pace=None):
    step = rate * 2 // 10
    t0 = time.monotonic()
    for n, i in enumerate(range(0, len(pcm), step)):
        if binary:
            await c.ws.send(pcm[i : i + step])
        else:
            await c.send(type="input_audio_buffer.append", audio=b64(pcm[i : i + step]))
        if pace:
            await asyncio.sleep(max(0.0, t0 + (n + 1) * 0.1 / pace - time.monotonic()))


async def auth_and_upgrade(port, key):
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 401)):
        try:
            await connect(url(port), additional_headers=headers)
            raise AssertionError(f"connected with {headers}")
        except websockets.InvalidStatus as e:
            assert e.response.status_code == status, (headers, e.response.status_code)
            body = json.loads(e.response.body)
            assert body["error"]["type"] == "authentication_error", body
    try:
        await connect(f"ws://127.0.0.1:{port}/v1/realtime", additional_headers={"Authorization": f"Bearer {key}"})
        raise AssertionError("connected without intent")
    except websockets.InvalidStatus as e:
        assert e.response.status_code == 400, e.response.status_code
    try:
        await connect(url(port, "&resume=00000000-0000-4000-8000-000000000000"), additional_headers={"Authorization": f"Bearer {key}"})
        raise AssertionError("resumed a session that never was")
    except websockets.InvalidStatus as e:
        assert e.response.status_code == 404, e.response.status_code
    # The browser form: the key as a subprotocol; the server picks "realtime".
    ws = await connect(url(port), subprotocols=["realtime", f"openai-insecure-api-key.{key}", "openai-beta.realtime-v1"])
    assert ws.subprotocol == "realtime", ws.subprotocol
    c = Conn(ws)
    await c.wait(lambda ev: ev and ev[0]["type"] == "transcription_session.created", "created over subprotocol auth")
    await ws.close()
    print("ok auth", flush=True)


async def bad_input(port, key):
    c = await open_conn(port, key)

    async def error_for(raw, code, param=None):
        n = len(c.events)
        await c.ws.send(raw)
        e = await c.next_of("error", n, f"error {code}")
        assert e["error"]["code"] == code, (raw, e)
        if param:
            assert e["error"]["param"] == param, (raw, e)
        assert e["error"]["message"], e

    await error_for("{not json", "invalid_json")
    await error_for(json.dumps({"type": "response.create"}), "unknown_event_type", "type")
    await error_for(json.dumps({"type": "transcription_session.update", "event_id": "e1", "session": {"input_audio_format": "pcm8"}}), "invalid_value", "session.input_audio_format")
    assert c.of("error")[-1]["error"]["event_id"] == "e1"
    await error_for(json.dumps({"type": "transcription_session.update", "session": {"voice": "alloy"}}), "unknown_parameter", "session.voice")
    await error_for(json.dumps({"type": "transcription_session.update", "session": {"input_audio_transcription": {"model": "no-such-model"}}}), "invalid_value", "session.input_audio_transcription.model")
    await error_for(json.dumps({"type": "transcription_session.update", "session": {"input_audio_noise_reduction": {"type": "near_field"}}}), "invalid_value", "session.input_audio_noise_reduction")
    await error_for(json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}), "invalid_value", "audio")
    await error_for(json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty")
    n = len(c.events)
    await c.send(type="input_audio_buffer.clear")
    await c.next_of("input_audio_buffer.cleared", n)
    # Still usable after every error.
    n = len(c.events)
    await c.send(type="transcription_session.update", session={"input_audio_format": "g711_ulaw"})
    u = await c.next_of("transcription_session.updated", n)
    assert u["session"]["input_audio_format"] == "g711_ulaw", u
    await c.ws.close()
    print("ok bad-input", flush=True)


def items_in_order(c):
    """Per item: started < stopped < committed < completed, by event position."""
    pos = {}
    for i, e in enumerate(c.events):
        if "item_id" in e:
            pos.setdefault((e["type"], e["item_id"]), i)
    for e in c.of("conversation.item.input_audio_transcription.completed"):
        it = e["item_id"]
        seq = [pos.get((k, it)) for k in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed")]
        seq.append(pos[("conversation.item.input_audio_transcription.completed", it)])
        assert None not in seq and seq == sorted(seq), (it, seq)


async def vad_session(port, key, pcm):
    c = await open_conn(port, key)
    await c.send(type="transcription_session.update", session={
        "input_audio_format": FMT16,
        "input_audio_transcription": {"model": "whisper-1", "language": "en"},
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 600},
        "include": ["item.input_audio_transcription.words"],
    })
    await c.next_of("transcription_session.updated", 0)
    await stream(c, pcm, 16000, pace=1)
    await c.wait(lambda ev: len([e for e in ev if e["type"].endswith("transcription.completed")]) >= 3, "three completed")
    items_in_order(c)
    assert c.of("conversation.item.created"), "conversation.item.created"
    deltas = c.of("conversation.item.input_audio_transcription.delta")
    assert deltas, "no delta"
    done = c.of("conversation.item.input_audio_transcription.completed")
    text = " ".join(e["transcript"] for e in done).lower()
    assert "dashwood" in text, text
    for e in done:
        assert e["words"] and all(w["end_ms"] >= w["start_ms"] for w in e["words"]), e
        assert e["result_index"] > 0
    # Deltas of an item are the start of its final's words.
    for it in {d["item_id"] for d in deltas}:
        joined = "".join(d["delta"] for d in deltas if d["item_id"] == it).split()
        final = [e for e in done if e["item_id"] == it][0]["transcript"].split()
        assert len(joined) <= len(final) + 2, (joined, final)
    # Settings are fixed once audio flows.
    n = len(c.events)
    await c.send(type="transcription_session.update", session={"input_audio_format": "pcm16"})
    e = await c.next_of("error", n)
    assert e["error"]["code"] == "session_already_started", e
    # Clear drops an utterance in progress: no final for it.
    n = len(c.events)
    first = pcm[16000 * 2 : 16000 * 2 * 3]  # 2 s of speech
    await stream(c, first, 16000)
    await c.send(type="input_audio_buffer.clear")
    await c.next_of("input_audio_buffer.cleared", n)
    n2 = len(c.events)
    await c.send(type="input_audio_buffer.commit")
    e = await c.next_of("error", n2)
    assert e["error"]["code"] == "input_audio_buffer_commit_empty", e
    assert len(c.of("conversation.item.input_audio_transcription.completed")) == 3
    await c.ws.close()
    print("ok vad-session", flush=True)


async def defaults_before_update(port, key, pcm24):
    # Audio before any update: the protocol's defaults (pcm16 at 24 kHz, server VAD).
    c = await open_conn(port, key)
    await stream(c, pcm24[: 24000 * 2 * 7], 24000, pace=4)
    await c.wait(lambda ev: any(e["type"].endswith("transcription.completed") for e in ev), "completed with default settings")
    t = c.of("conversation.item.input_audio_transcription.completed")[0]["transcript"].lower()
    assert "dashwood" in t, t
    await c.ws.close()
    print("ok defaults", flush=True)


async def manual_turns(port, key, pcm):
    c = await open_conn(port, key)
    await c.send(type="transcription_session.update", session={"input_audio_format": FMT16, "turn_detection": None})
    u = await c.next_of("transcription_session.updated", 0)
    assert u["session"]["turn_detection"] is None, u
    await stream(c, pcm[: 16000 * 2 * 6], 16000, binary=True)
    await c.send(type="input_audio_buffer.commit")
    await c.wait(lambda ev: any(e["type"].endswith("transcription.completed") for e in ev), "completed after commit")
    assert not c.of("input_audio_buffer.speech_started"), "speech events with turn detection off"
    assert c.of("input_audio_buffer.committed")
    t = c.of("conversation.item.input_audio_transcription.completed")[0]["transcript"].lower()
    assert "dashwood" in t, t
    await c.ws.close()
    print("ok manual", flush=True)


async def resume(port, key, pcm):
    c = await open_conn(port, key)
    sid = c.events[0]["session"]["id"]
    await c.send(type="transcription_session.update", session={"input_audio_format": FMT16})
    cut = 16000 * 2 * 9  # inside the second utterance
    await stream(c, pcm[:cut], 16000)
    await c.wait(lambda ev: any(e["type"].endswith("transcription.completed") for e in ev), "first completed")
    first = c.of("conversation.item.input_audio_transcription.completed")
    last = max(e["result_index"] for e in first)
    c.ws.transport.abort()  # no close frame: the session parks
    await c.reader
    r = await open_conn(port, key, f"&resume={sid}&after={last}")
    assert r.events[0]["session"]["id"] == sid, r.events[0]
    await stream(r, pcm[cut:], 16000)
    await r.wait(lambda ev: len([e for e in ev if e["type"].endswith("transcription.completed")]) >= 2, "the rest after resuming")
    again = {e["item_id"] for e in r.of("conversation.item.input_audio_transcription.completed")}
    assert not again & {e["item_id"] for e in first}, ("finals delivered twice", again)
    await r.ws.close()
    print("ok resume", flush=True)


async def idle(port, key):
    # Connected, never sends audio: ended by the idle timeout.
    a = await open_conn(port, key)
    # Sends a little audio, then nothing: the session ends after its final.
    b = await open_conn(port, key)
    await b.send(type="transcription_session.update", session={"input_audio_format": FMT16})
    await stream(b, b"\0\0" * 8000, 16000)
    for c in (a, b):
        await c.wait(lambda ev: any(e["type"] == "error" for e in ev), "idle error", timeout=30)
        await c.reader
        assert c.of("error")[0]["error"]["code"] == "session_expired", c.of("error")
        assert c.closed is not None
    print("ok idle", flush=True)


def frame(payload, opcode):
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    mask = b"\x01\x02\x03\x04"
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def never_reads(port, key, pcm):
    """A client that sends audio and never reads a byte: the server must
    close on it, and a normal client beside it gets its captions."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    s.connect(("127.0.0.1", port))
    s.sendall((
        f"GET /v1/realtime?intent=transcription HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {key}\r\n\r\n"
    ).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    s.sendall(frame(json.dumps({"type": "transcription_session.update", "session": {
        "input_audio_format": FMT16, "include": ["item.input_audio_transcription.words"]}}).encode(), 1))
    s.setblocking(False)
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    step = 3200
    # Four passes of the speech, as fast as the server takes them.
    for _ in range(4):
        for i in range(0, len(pcm), step):
            await loop.sock_sendall(s, frame(pcm[i : i + step], 2))
    sent = time.monotonic() - t0
    normal = asyncio.create_task(defaults_after(port, key, pcm))
    # Now read: whatever the server wrote, then its end of the connection.
    deadline = time.monotonic() + 60
    got = 0
    while time.monotonic() < deadline:
        try:
            b = await asyncio.wait_for(loop.sock_recv(s, 65536), 60)
        except (ConnectionResetError, BrokenPipeError):
            break
        if not b:
            break
        got += len(b)
    else:
        raise AssertionError("the server kept a client that never reads")
    await normal
    print(f"ok never-reads (sent in {sent:.1f} s, {got} bytes were waiting, closed after {time.monotonic() - t0:.1f} s)", flush=True)


async def defaults_after(port, key, pcm):
    c = await open_conn(port, key)
    await c.send(type="transcription_session.update", session={"input_audio_format": FMT16})
    await stream(c, pcm[: 16000 * 2 * 7], 16000, pace=4)
    await c.wait(lambda ev: any(e["type"].endswith("transcription.completed") for e in ev), "a neighbour's completed")
    await c.ws.close()


async def raw(port, key, path16, path24):
    pcm = open(path16, "rb").read()
    pcm24 = open(path24, "rb").read()
    await auth_and_upgrade(port, key)
    await bad_input(port, key)
    await asyncio.gather(
        vad_session(port, key, pcm),
        defaults_before_update(port, key, pcm24),
        manual_turns(port, key, pcm),
        resume(port, key, pcm),
        idle(port, key),
    )
    await never_reads(port, key, pcm)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "sdk":
        asyncio.run(sdk(int(sys.argv[2]), sys.argv[3]))
    elif cmd == "raw":
        asyncio.run(raw(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]))
    else:
        sys.exit(__doc__)
