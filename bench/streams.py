"""SSE measurements: time to first byte, per-chunk delay, coalescing, and held-open streams.

Every socket read is stamped with ``time.monotonic_ns()`` as it arrives. The mock writes
``ts=<monotonic ns>`` into every chunk just before sending it, and CLOCK_MONOTONIC is one
clock for every process on the machine, so ``receive stamp - ts`` is the chunk's delay from
the mock's write to the client's read. The same figure measured direct-to-mock is the floor;
"added delay" is a peer's figure minus direct's.

Coalescing: the mock sends one SSE event per write, 1/interval apart. If the client sees two
events completed by one read, or one event carrying two ``ts=`` stamps, the path in between
held a chunk back and merged it with the next one. Both are counted per stream.

Contract: ``run_streams`` and ``hold_streams`` open at most the requested number of
connections to 127.0.0.1, each bounded by a timeout, and close every one before returning.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from bench.http1 import ProtocolError, ResponseParser, build_request

_TS_RE = re.compile(rb"ts=(\d+)")


def stream_body(chunks: int, interval_ms: float, model: str = "bench-model") -> bytes:
    """A streaming chat request whose knobs (first in the body) tell the mock the schedule."""
    return json.dumps(
        {
            "mock_chunks": chunks,
            "mock_interval_ms": interval_ms,
            "stream": True,
            "model": model,
            "messages": [{"role": "user", "content": "stream please"}],
        },
        separators=(",", ":"),
    ).encode()


@dataclass
class StreamStats:
    """What one stream saw. Times are monotonic ns; delays are ns."""

    t_start: int = 0
    t_first_event: int = 0
    status: int = 0
    events: int = 0
    delays: list[int] = field(default_factory=list)
    coalesced: int = 0  # events that arrived merged with another (see module docstring)
    done: bool = False  # saw "data: [DONE]"
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.done and self.status == 200 and not self.error


class SSEClient(asyncio.Protocol):
    """One streaming request; splits the decoded body into SSE events as reads arrive."""

    def __init__(
        self,
        request: bytes,
        stats: StreamStats,
        finished: asyncio.Future[None],
        on_first: Callable[[], None] | None = None,
    ) -> None:
        self.request = request
        self.stats = stats
        self.finished = finished
        self.on_first = on_first
        self.parser = ResponseParser()
        self.pending = bytearray()  # decoded body bytes not yet forming a whole event
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop: not a subclass
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        st = self.stats
        try:
            body = self.parser.feed(data)
        except (ProtocolError, ValueError) as exc:
            self._end(f"protocol: {exc}")
            return
        st.status = self.parser.status
        if body:
            self.pending += body
            stamped = 0  # events with a ts= stamp completed by this one read
            # Split whole events; both LF and CRLF line ends are legal SSE.
            while True:  # bounded by the pending buffer
                end = self.pending.find(b"\n\n")
                alt = self.pending.find(b"\r\n\r\n")
                if alt >= 0 and (end < 0 or alt < end):
                    end, sep = alt, 4
                else:
                    sep = 2
                if end < 0:
                    break
                event = bytes(self.pending[:end])
                del self.pending[: end + sep]
                if not event.strip():
                    continue
                stamps = _TS_RE.findall(event)
                if stamps:
                    stamped += 1
                    st.events += 1
                    if not st.t_first_event:
                        st.t_first_event = now
                        if self.on_first is not None:
                            self.on_first()
                    for ts in stamps:
                        st.delays.append(now - int(ts))
                    if len(stamps) > 1:
                        st.coalesced += len(stamps)
                elif event.startswith(b"data: [DONE]"):
                    st.done = True
            if stamped > 1:
                # Several chunks finished by one read: none of them arrived on its own.
                # (The finish event and [DONE] are written together by the mock, so only
                # stamped chunks count.)
                st.coalesced += stamped
        if self.parser.done:
            self._end("" if st.done else "stream ended without [DONE]")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            self._end(f"connection lost: {exc}" if not self.stats.done else "")

    def _end(self, error: str) -> None:
        if not self.stats.error:
            self.stats.error = error
        if not self.finished.done():
            self.finished.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Hang up now, as a client that goes away mid-stream would."""
        if self.transport is not None:
            self.transport.abort()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (q in 0..100); 0.0 for an empty list."""
    if not values:
        return 0.0
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[idx]


@dataclass
class StreamRun:
    """K concurrent streams (times ``reps`` sequential batches) against one peer."""

    k: int
    reps: int
    ok: int
    events: int
    expected_events: int
    coalesced: int
    ttfb_p50_ms: float
    ttfb_p99_ms: float
    delay_p50_ms: float
    delay_p99_ms: float
    seconds: float
    errors: list[str]


async def _one_stream(
    port: int, request: bytes, st: StreamStats, delay_s: float, timeout: float
) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(delay_s)
    finished: asyncio.Future[None] = loop.create_future()
    st.t_start = time.monotonic_ns()
    transport = None
    try:
        transport, _ = await asyncio.wait_for(
            loop.create_connection(lambda: SSEClient(request, st, finished), "127.0.0.1", port),
            timeout,
        )
        await asyncio.wait_for(finished, timeout)
    except (OSError, TimeoutError) as exc:
        st.error = st.error or f"{type(exc).__name__}: {exc}"
    finally:
        if transport is not None:
            transport.close()


async def run_streams(
    port: int,
    k: int,
    chunks: int,
    interval_ms: float,
    reps: int = 1,
    ramp_ms_per_stream: float = 1.0,
) -> StreamRun:
    """Open ``k`` streams at once (starts spread ``ramp_ms_per_stream`` apart, so 1,000
    streams do not all SYN in the same millisecond), ``reps`` times in sequence.

    Each stream is bounded by its schedule plus 30 s.
    """
    request = build_request("POST", "/v1/chat/completions", stream_body(chunks, interval_ms))
    timeout = chunks * interval_ms / 1000 + 30
    all_stats: list[StreamStats] = []
    t0 = time.monotonic()
    for _ in range(reps):
        batch = [StreamStats() for _ in range(k)]
        all_stats += batch
        await asyncio.gather(
            *(
                _one_stream(port, request, st, i * ramp_ms_per_stream / 1000, timeout)
                for i, st in enumerate(batch)
            )
        )
    ttfb = [(s.t_first_event - s.t_start) / 1e6 for s in all_stats if s.t_first_event]
    delays = [d / 1e6 for s in all_stats for d in s.delays]
    errors = sorted({s.error for s in all_stats if s.error})
    return StreamRun(
        k=k,
        reps=reps,
        ok=sum(s.ok for s in all_stats),
        events=sum(s.events for s in all_stats),
        expected_events=k * reps * chunks,
        coalesced=sum(s.coalesced for s in all_stats),
        ttfb_p50_ms=percentile(ttfb, 50),
        ttfb_p99_ms=percentile(ttfb, 99),
        delay_p50_ms=percentile(delays, 50),
        delay_p99_ms=percentile(delays, 99),
        seconds=time.monotonic() - t0,
        errors=errors[:5],
    )


class HeldStreams:
    """Streams that got their first chunk and are now waiting (the mock holds the second)."""

    def __init__(self) -> None:
        self.clients: list[SSEClient] = []
        self.stats: list[StreamStats] = []
        self.first = 0
        self.all_first = asyncio.Event()
        self.t_all_first_ms = 0.0

    @property
    def open_count(self) -> int:
        return sum(1 for s in self.stats if s.t_first_event and not s.error)

    def hang_up(self) -> None:
        """Every client goes away at once (the proxy should now drop its upstream streams)."""
        for client in self.clients:
            client.abort()


async def hold_streams(
    port: int,
    n: int,
    first_timeout: float,
    hold_ms: float = 120_000,
    ramp_ms_per_stream: float = 1.0,
) -> HeldStreams:
    """Open ``n`` streams and return once all have their first chunk or after
    ``first_timeout`` seconds (whichever is first). The caller must call ``hang_up()``.

    The mock sends chunk 0 at once and chunk 1 only after ``hold_ms``, so during the hold the
    proxy has ``n`` idle-but-open streams: client socket, upstream socket and its buffers.
    """
    loop = asyncio.get_running_loop()
    held = HeldStreams()
    request = build_request("POST", "/v1/chat/completions", stream_body(2, hold_ms))
    t0 = time.monotonic()

    def on_first() -> None:
        held.first += 1
        if held.first >= n:
            held.t_all_first_ms = (time.monotonic() - t0) * 1000
            held.all_first.set()

    async def open_one(i: int) -> None:
        await asyncio.sleep(i * ramp_ms_per_stream / 1000)
        st = StreamStats(t_start=time.monotonic_ns())
        held.stats.append(st)
        finished: asyncio.Future[None] = loop.create_future()
        client = SSEClient(request, st, finished, on_first)
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: client, "127.0.0.1", port), first_timeout
            )
            held.clients.append(client)
        except (OSError, TimeoutError) as exc:
            st.error = f"{type(exc).__name__}: {exc}"

    opener = asyncio.gather(*(open_one(i) for i in range(n)))
    try:
        await asyncio.wait_for(held.all_first.wait(), first_timeout)
    except TimeoutError:
        pass
    try:
        await asyncio.wait_for(opener, 5)
    except TimeoutError:
        opener.cancel()
    return held
