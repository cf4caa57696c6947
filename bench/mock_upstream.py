"""Fast mock OpenAI upstream: a raw asyncio protocol (uvloop when installed), no framework.

Run: ``python -m bench.mock_upstream --port PORT [--host 127.0.0.1]``. It serves HTTP/1.1 with
keep-alive, Content-Length or chunked request bodies and ``Expect: 100-continue``:

- ``POST /v1/chat/completions`` - a fixed chat.completion JSON (Content-Length). With
  ``"stream": true`` in the body, an SSE stream (chunked transfer encoding, as OpenAI sends
  it) of N ``chat.completion.chunk`` events, chunk i written at t0 + i*interval, then a finish
  chunk and ``data: [DONE]``. Each chunk's ``delta.content`` is ``"ts=<ns> seq=<i> "`` where
  ns is ``time.monotonic_ns()`` (CLOCK_MONOTONIC, the same clock in every process) taken just
  before the write, so a client computes the delay of every chunk as receive time - ts.
  Any body size is accepted; the reply's ``usage.prompt_tokens`` is the body length, so a
  client can see the whole body arrived.
- ``POST /v1/audio/speech`` - a deterministic binary body (default 10 MiB, audio/mpeg).
- ``POST /v1/embeddings``, ``GET /v1/models`` - small fixed JSON.
- ``GET /healthz`` - 200 ``ok``. ``GET /_stats`` - counters as JSON: open connections, streams
  in progress, and totals. The hang-up test reads these to see whether a proxy closed its
  upstream connections after its clients went away.
- ``GET /_lateness`` - how late the mock sent the chunks of ``"mock_delta"`` streams against
  their schedule since the last call (count, p50, p99, max in µs), then starts over. A mock that
  cannot keep its schedule shows here instead of passing as proxy delay.

With ``"mock_delta": 1`` a stream's chunks are shaped and sized like a model's token deltas:
``data: {"choices":[{"delta":{"content":"ts=<ns> ..."}}]}`` padded to 60-120 bytes per event
(the size cycles with the chunk number), instead of the full ~200-byte chunk above.

Knobs, first match wins: headers ``x-mock-chunks``, ``x-mock-interval-ms``, ``x-mock-bytes``;
then top-level body keys ``"mock_chunks"``, ``"mock_interval_ms"``, ``"mock_bytes"`` (bodies
pass through a proxy byte-for-byte, headers might not); then the CLI defaults. Keys are found
by a byte search of the first 4 KiB of the body, so the bench puts them first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import time
from typing import cast

CHAT_JSON = json.dumps(
    {
        "id": "chatcmpl-bench0000000000000000000000",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench-model",
        "system_fingerprint": "fp_bench",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello! A fixed reply from the oaimux benchmark mock.",
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 16, "total_tokens": 16},
    },
    separators=(",", ":"),
).encode()
EMBEDDINGS_JSON = json.dumps(
    {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 0.1, 0.2, 0.3]}],
        "model": "bench-model",
        "usage": {"prompt_tokens": 1, "total_tokens": 1},
    },
    separators=(",", ":"),
).encode()
MODELS_JSON = b'{"object":"list","data":[{"id":"bench-model","object":"model","owned_by":"bench"}]}'

CHUNK_PREFIX = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"bench-model","choices":[{"index":0,"delta":{"content":"'
)
CHUNK_SUFFIX = b'"},"logprobs":null,"finish_reason":null}]}\n\n'
FINISH_EVENT = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"bench-model","choices":[{"index":0,"delta":{},"logprobs":null,'
    b'"finish_reason":"stop"}]}\n\n'
)
DONE_EVENT = b"data: [DONE]\n\n"

# Token-delta shaped events (the token-rate phase): 60-120 bytes each, like a model's deltas.
DELTA_PREFIX = b'data: {"choices":[{"delta":{"content":"ts='
DELTA_SUFFIX = b'"}}]}\n\n'
DELTA_FILLER = b" lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod"
DELTA_MIN_BYTES, DELTA_MAX_BYTES = 60, 120


def delta_event(ts: int, seq: int) -> bytes:
    """One delta-shaped SSE event carrying ``ts``; its size cycles over 60-120 bytes with
    ``seq`` (37 is coprime to the 61 sizes, so every size comes up once in 61 chunks)."""
    head = DELTA_PREFIX + b"%d" % ts
    want = DELTA_MIN_BYTES + (seq * 37) % (DELTA_MAX_BYTES - DELTA_MIN_BYTES + 1)
    pad = want - len(head) - len(DELTA_SUFFIX)
    return head + DELTA_FILLER[: max(0, pad)] + DELTA_SUFFIX


_KNOB_RE = {
    "chunks": re.compile(rb'"mock_chunks"\s*:\s*(\d+)'),
    "interval_ms": re.compile(rb'"mock_interval_ms"\s*:\s*(\d+(?:\.\d+)?)'),
    "bytes": re.compile(rb'"mock_bytes"\s*:\s*(\d+)'),
    "delta": re.compile(rb'"mock_delta"\s*:\s*(\d+)'),
}
_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
KNOB_SCAN_BYTES = 4096
MAX_REQUEST_BODY = 256 * 1024 * 1024  # refuse anything absurd rather than exhaust memory
LATENESS_KEPT = 5_000_000  # lateness samples kept between two reads of /_lateness (~40 MB)


def binary_payload(size: int) -> bytes:
    """Deterministic bytes (a repeating 256-byte pattern) so a client can check integrity."""
    pattern = bytes((31 * i + 7) & 255 for i in range(256))
    reps, rest = divmod(size, 256)
    return pattern * reps + pattern[:rest]


class Stats:
    """Process-wide counters, served at GET /_stats."""

    def __init__(self) -> None:
        self.open_connections = 0
        self.total_connections = 0
        self.requests = 0
        self.active_streams = 0
        self.streams_started = 0
        self.streams_completed = 0
        self.streams_aborted = 0
        self.request_body_bytes_max = 0
        # Send time minus scheduled time of each delta-stream chunk (ns), since the last read.
        self.lateness: list[int] = []

    def as_json(self) -> bytes:
        return json.dumps({k: v for k, v in self.__dict__.items() if k != "lateness"}).encode()

    def take_lateness(self) -> bytes:
        """Percentiles of the lateness recorded since the last call, as JSON; then forget it."""
        late, self.lateness = sorted(self.lateness), []
        n = len(late)

        def pct(q: float) -> float:
            return late[min(n - 1, max(0, -(-n * q // 100) - 1))] / 1000 if n else 0.0

        return json.dumps(
            {
                "count": n,
                "p50_us": pct(50),
                "p99_us": pct(99),
                "max_us": late[-1] / 1000 if n else 0.0,
            }
        ).encode()


class Config:
    """Defaults for knobs not given per request."""

    def __init__(self, chunks: int, interval_ms: float, binary_bytes: int) -> None:
        self.chunks = chunks
        self.interval_ms = interval_ms
        self.binary_bytes = binary_bytes
        self._payloads: dict[int, bytes] = {}

    def payload(self, size: int) -> bytes:
        # Cached: building 10 MiB per request would make the mock, not the proxy, the cost.
        if size not in self._payloads:
            if len(self._payloads) > 8:
                self._payloads.clear()
            self._payloads[size] = binary_payload(size)
        return self._payloads[size]


class MockProtocol(asyncio.Protocol):
    """One client connection: parse requests, answer them, stream SSE on timers."""

    def __init__(self, stats: Stats, cfg: Config) -> None:
        self.stats = stats
        self.cfg = cfg
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.head: tuple[str, str, dict[str, str]] | None = None
        self.body = bytearray()
        self.body_len = 0
        self.need = 0  # Content-Length bytes still to read
        self.chunked = False
        self.chunk_left = -1  # chunked body: bytes left in this chunk, -1 = reading size line
        self.streaming: asyncio.TimerHandle | None = None
        self.stream_active = False

    # -- connection lifecycle ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.stats.open_connections += 1
        self.stats.total_connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.open_connections -= 1
        if self.streaming is not None:
            self.streaming.cancel()
            self.streaming = None
        if self.stream_active:
            self.stream_active = False
            self.stats.active_streams -= 1
            self.stats.streams_aborted += 1

    # -- request parsing ----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.buf += data
        # Bounded by the buffer: each pass consumes a head or body bytes, or returns.
        while self.buf:
            if self.head is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > 65536:
                        self._reply(431, b"text/plain", b"head too large", close=True)
                    return
                if not self._parse_head(bytes(self.buf[:end])):
                    return
                del self.buf[: end + 4]
                if self.need == 0 and not self.chunked:
                    self._dispatch()
                    continue
            if not self._read_body():
                return
            self._dispatch()

    def _parse_head(self, head: bytes) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            self._reply(400, b"text/plain", b"bad request line", close=True)
            return False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.head = (parts[0], parts[1], headers)
        self.body = bytearray()
        self.body_len = 0
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self.need = 0 if self.chunked else int(headers.get("content-length", "0") or 0)
        self.chunk_left = -1
        if self.need > MAX_REQUEST_BODY:
            self._reply(413, b"text/plain", b"too large", close=True)
            return False
        if headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def _keep(self, data: bytes | bytearray) -> None:
        # Only the start of the body is kept (knob search); the rest is just counted, so a
        # 10 MB body costs the mock a copy, not a parse.
        if len(self.body) < KNOB_SCAN_BYTES:
            self.body += data[: KNOB_SCAN_BYTES - len(self.body)]
        self.body_len += len(data)

    def _read_body(self) -> bool:
        """Consume body bytes from ``buf``; True once the whole body is in."""
        if not self.chunked:
            take = min(self.need, len(self.buf))
            self._keep(self.buf[:take])
            del self.buf[:take]
            self.need -= take
            return self.need == 0
        # chunk_left: >0 data bytes left, 0 = CRLF after data, -1 = size line, -2 = trailers.
        while True:  # bounded: every pass consumes buffer bytes or returns
            if self.chunk_left == -1:
                eol = self.buf.find(b"\r\n")
                if eol < 0:
                    return False
                size = int(bytes(self.buf[:eol]).split(b";")[0], 16)
                del self.buf[: eol + 2]
                self.chunk_left = size if size else -2
            elif self.chunk_left == -2:
                eol = self.buf.find(b"\r\n")
                if eol < 0:
                    return False
                del self.buf[: eol + 2]
                if eol == 0:
                    return True
            elif self.chunk_left == 0:
                if len(self.buf) < 2:
                    return False
                del self.buf[:2]
                self.chunk_left = -1
            else:
                if not self.buf:
                    return False
                take = min(self.chunk_left, len(self.buf))
                self._keep(self.buf[:take])
                del self.buf[:take]
                self.chunk_left -= take

    # -- responses -----------------------------------------------------------------------------
    def _dispatch(self) -> None:
        assert self.head is not None
        method, target, headers = self.head
        self.head = None
        st = self.stats
        st.requests += 1
        st.request_body_bytes_max = max(st.request_body_bytes_max, self.body_len)
        path = target.split("?", 1)[0]
        close = headers.get("connection", "").lower() == "close"
        if path == "/v1/chat/completions" and method == "POST":
            if _STREAM_RE.search(self.body):
                self._start_stream(headers)
            else:
                # Report the body size back so the client can confirm a big body arrived whole.
                body = CHAT_JSON.replace(
                    b'"prompt_tokens":0', b'"prompt_tokens":%d' % self.body_len
                )
                self._reply(200, b"application/json", body, close)
        elif path == "/v1/audio/speech" and method == "POST":
            size = int(self._knob(headers, "bytes", self.cfg.binary_bytes))
            self._reply(200, b"audio/mpeg", self.cfg.payload(size), close)
        elif path == "/v1/embeddings" and method == "POST":
            self._reply(200, b"application/json", EMBEDDINGS_JSON, close)
        elif path == "/v1/models" and method == "GET":
            self._reply(200, b"application/json", MODELS_JSON, close)
        elif path == "/healthz":
            self._reply(200, b"text/plain", b"ok", close)
        elif path == "/_stats":
            self._reply(200, b"application/json", st.as_json(), close)
        elif path == "/_lateness":
            self._reply(200, b"application/json", st.take_lateness(), close)
        else:
            self._reply(404, b"application/json", b'{"error":{"message":"not found"}}', close)

    def _knob(self, headers: dict[str, str], name: str, default: float) -> float:
        value = headers.get(f"x-mock-{name.replace('_', '-')}")
        if value is not None:
            return float(value)
        m = _KNOB_RE[name].search(self.body)
        return float(m.group(1)) if m else default

    def _reply(self, status: int, ctype: bytes, body: bytes, close: bool = False) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        reason = {
            200: b"OK",
            400: b"Bad Request",
            404: b"Not Found",
            413: b"Too Large",
            431: b"Too Large",
        }.get(status, b"X")
        head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n" % (
            status,
            reason,
            ctype,
            len(body),
            b"Connection: close\r\n" if close else b"",
        )
        if len(body) > 65536:
            self.transport.writelines((head, body))  # no 10 MiB concatenation copy
        else:
            self.transport.write(head + body)
        if close:
            self.transport.close()

    def _start_stream(self, headers: dict[str, str]) -> None:
        assert self.transport is not None
        chunks = max(0, int(self._knob(headers, "chunks", self.cfg.chunks)))
        interval = self._knob(headers, "interval_ms", self.cfg.interval_ms) / 1000.0
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        self.stats.active_streams += 1
        self.stats.streams_started += 1
        self.stream_active = True
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        if self._knob(headers, "delta", 0):
            self._send_delta(0, chunks, t0, interval)
        else:
            self._send_chunk(0, chunks, t0, interval)

    def _send_chunk(self, seq: int, chunks: int, t0: float, interval: float) -> None:
        self.streaming = None
        tr = self.transport
        if tr is None or tr.is_closing():
            return
        if seq < chunks:
            content = b"ts=%d seq=%d " % (time.monotonic_ns(), seq)
            event = CHUNK_PREFIX + content + CHUNK_SUFFIX
            tr.write(b"%x\r\n%s\r\n" % (len(event), event))
            loop = asyncio.get_running_loop()
            # Scheduled against t0, not the previous send, so late timers do not accumulate.
            self.streaming = loop.call_at(
                t0 + (seq + 1) * interval, self._send_chunk, seq + 1, chunks, t0, interval
            )
            return
        self._finish_stream(tr)

    def _send_delta(self, seq: int, chunks: int, t0: float, interval: float) -> None:
        """``_send_chunk`` for token-delta shaped chunks, recording how late each one leaves.

        The schedule is on the loop's clock, which is CLOCK_MONOTONIC (in ms steps on uvloop),
        the clock of ``time.monotonic_ns``; so send stamp minus schedule is the lateness.
        """
        self.streaming = None
        tr = self.transport
        if tr is None or tr.is_closing():
            return
        if seq < chunks:
            now = time.monotonic_ns()
            event = delta_event(now, seq)
            tr.write(b"%x\r\n%s\r\n" % (len(event), event))
            if len(self.stats.lateness) < LATENESS_KEPT:
                self.stats.lateness.append(now - round((t0 + seq * interval) * 1e9))
            self.streaming = asyncio.get_running_loop().call_at(
                t0 + (seq + 1) * interval, self._send_delta, seq + 1, chunks, t0, interval
            )
            return
        self._finish_stream(tr)

    def _finish_stream(self, tr: asyncio.Transport) -> None:
        tail = FINISH_EVENT + DONE_EVENT
        tr.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))
        self.stream_active = False
        self.stats.active_streams -= 1
        self.stats.streams_completed += 1


async def serve(host: str, port: int, cfg: Config) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stats = Stats()
    server = await loop.create_server(
        lambda: MockProtocol(stats, cfg), host, port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"mock upstream listening on {host}:{port}", flush=True)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--chunks", type=int, default=20, help="default SSE chunks per stream")
    ap.add_argument("--interval-ms", type=float, default=100.0, help="default gap between chunks")
    ap.add_argument("--binary-bytes", type=int, default=10 * 1024 * 1024)
    a = ap.parse_args(argv)
    try:
        import uvloop  # optional: the mock must not be the bottleneck, uvloop helps a lot
    except ImportError:
        asyncio.run(serve(a.host, a.port, Config(a.chunks, a.interval_ms, a.binary_bytes)))
    else:
        uvloop.run(serve(a.host, a.port, Config(a.chunks, a.interval_ms, a.binary_bytes)))


if __name__ == "__main__":
    main()
