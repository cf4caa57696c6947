"""Token-rate streams: K concurrent SSE streams of small chunks at a model's pace.

A gateway's real load is many long streams, one small chunk per token. Each run here opens K
streams (started together, or spread over a ramp), each of N delta-shaped chunks of 60-120
bytes at a fixed rate (the mock's ``"mock_delta"`` streams), and measures:

- the proxy's CPU per relayed chunk in the steady state, and its set-up and teardown CPU per
  stream apart, from the proxy's CPU time (``/proc``, ns) read at the run's phase boundaries:
  start, all K streams have their first chunk (set-up done), the first stream has ended
  (teardown begins), all streams have ended;
- every chunk's delay (client read time minus the mock's send stamp; one CLOCK_MONOTONIC for
  all processes), time to the first chunk, streams completed and chunks merged into one read;
- the proxy's memory per open stream (RSS at the boundaries minus RSS before the run);
- the load side's own health: how late the mock sent its chunks against their schedule
  (its ``/_lateness``) and how busy the load side's cores were, so a slow mock or client
  shows as such instead of passing for proxy delay.

The reading side is several client processes (``ClientPool``), each an event loop (uvloop
when installed) of bare TCP protocols that only split SSE events and pick out the ``ts=``
stamps: one Python process cannot read thousands of streams at 50 chunks/s, and the client
must not be what limits a run. The processes count first chunks and ended streams in shared
memory so the driver can read the proxy's CPU the moment a boundary is crossed.

Contract: the client processes open exactly the streams asked for, to 127.0.0.1 only, and
close every socket by the run's deadline (schedule plus a grace period), so a saturated peer
makes a run incomplete, never endless. ``TokenRun`` is a plain dict-able record of one run.
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import multiprocessing as mp
import re
import time
from array import array
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast

from bench import procfs
from bench.http1 import build_request, fetch
from bench.streams import stream_body

_TS_RE = re.compile(rb"ts=(\d+)")
_DONE = b"data: [DONE]"
_END_OF_BODY = b"0\r\n\r\n"  # last chunk of a chunked body (no trailers from our peers)
# Shared counters per client process, in this order.
FIRST, COMPLETED, ENDED = 0, 1, 2
_COUNTERS = 3


def token_request(chunks: int, interval_ms: float) -> bytes:
    """The streaming request of every token-rate stream (knobs first, for the mock)."""
    body = stream_body(chunks, interval_ms).replace(b"{", b'{"mock_delta":1,', 1)
    return build_request("POST", "/v1/chat/completions", body)


# -- the client process ----------------------------------------------------------------------


@dataclass
class ClientJob:
    """What one client process opens: one stream per start time (absolute monotonic ns)."""

    port: int
    request: bytes
    starts_ns: list[int]
    deadline_ns: int


@dataclass
class ClientResult:
    """What one client process saw. Per stream: connect start, first chunk (0 = none),
    chunks, completed; per chunk: read time and delay (ns)."""

    started_ns: array[int] = field(default_factory=lambda: array("q"))
    first_ns: array[int] = field(default_factory=lambda: array("q"))
    chunks: array[int] = field(default_factory=lambda: array("q"))
    completed: array[int] = field(default_factory=lambda: array("b"))
    recv_ns: array[int] = field(default_factory=lambda: array("q"))
    delay_ns: array[int] = field(default_factory=lambda: array("q"))
    coalesced: int = 0  # chunks that arrived in one read together with another chunk
    reads: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class _Stream(asyncio.Protocol):
    """One stream: its connection and its parse state in a client process."""

    def __init__(self, reader: _Reader, idx: int) -> None:
        self.reader = reader
        self.idx = idx
        self.transport: asyncio.Transport | None = None
        self.head_done = False
        self.tail = b""
        self.done_seen = False
        self.first = False
        self.ended = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.transport = tr
        if self.ended:  # cut at the deadline while connecting
            tr.close()
            return
        tr.write(self.reader.job.request)

    def data_received(self, data: bytes) -> None:
        t = time.monotonic_ns()
        if not self.ended:
            self.reader.feed(self, self.tail + data if self.tail else data, t)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended:
            why = f"connection lost: {type(exc).__name__}" if exc else "closed before [DONE]"
            self.reader.end(self, why, first=not self.first)


class _Reader:
    """The streams of one client process on one event loop (see the module docstring).

    uvloop's protocols, not a Python ``epoll`` loop: against the same mock at 300 streams, a
    hand-written loop cost 20-21 µs of client CPU per chunk and these protocols 13-14 µs,
    since the loop, the read and the dispatch run in C and one Python call is left per read.
    """

    def __init__(self, job: ClientJob, counters: Any, base: int) -> None:
        self.job = job
        self.counters = counters
        self.base = base
        self.res = ClientResult()
        n = len(job.starts_ns)
        self.res.started_ns.extend([0] * n)
        self.res.first_ns.extend([0] * n)
        self.res.chunks.extend([0] * n)
        self.res.completed.extend([0] * n)
        self.live: dict[int, _Stream] = {}
        self.ended = 0
        self.all_ended: asyncio.Future[None] | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> ClientResult:
        """Open each stream at its start time; return once all have ended or at the deadline."""
        loop = asyncio.get_running_loop()
        self.all_ended = loop.create_future()
        n = len(self.job.starts_ns)
        if not n:
            return self.res

        def at(ns: int) -> float:  # a monotonic ns time on the loop's clock
            return loop.time() + (ns - time.monotonic_ns()) / 1e9

        timers = [loop.call_at(at(ns), self._open, i) for i, ns in enumerate(self.job.starts_ns)]
        cut = loop.call_at(at(self.job.deadline_ns), self._cut, timers)
        try:
            await self.all_ended
        finally:
            cut.cancel()
            for task in list(self.tasks):
                task.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
        return self.res

    def _bump(self, which: int) -> None:
        self.counters[self.base + which] += 1

    def _count_error(self, error: str) -> None:
        self.res.errors[error] = self.res.errors.get(error, 0) + 1

    def _open(self, idx: int) -> None:
        self.res.started_ns[idx] = time.monotonic_ns()
        st = _Stream(self, idx)
        self.live[idx] = st
        task = asyncio.get_running_loop().create_task(self._connect(st))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connect(self, st: _Stream) -> None:
        try:
            await asyncio.get_running_loop().create_connection(
                lambda: st, "127.0.0.1", self.job.port
            )
        except OSError as exc:  # refused, or out of file descriptors: a failed stream
            if not st.ended:
                self.end(st, f"connect: {errno.errorcode.get(exc.errno or 0, exc)}", first=True)

    def _cut(self, timers: list[asyncio.TimerHandle]) -> None:
        """The deadline: every stream still open, connecting or not yet started ends now."""
        for st in list(self.live.values()):
            self.end(st, "cut at the run's deadline", first=not st.first)
        for i, timer in enumerate(timers):
            if not self.res.started_ns[i]:
                timer.cancel()
                self._count_error("not started before the deadline")
                self._bump(FIRST)
                self._count_ended()

    def feed(self, st: _Stream, data: bytes, t: int) -> None:
        """Pick the stamps out of every whole SSE event in ``data`` (read at ``t``)."""
        self.res.reads += 1
        if not st.head_done:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                st.tail = data
                return
            if not data.startswith((b"HTTP/1.1 200 ", b"HTTP/1.0 200 ")):
                self.end(st, f"status {data[9:12].decode(errors='replace')}", first=True)
                return
            st.head_done = True
            data = data[end + 4 :]
        # An SSE event ends in a blank line; chunked framing (hex size CRLF ... CRLF) never
        # holds LF LF, so everything up to the last one is whole events.
        cut = data.rfind(b"\n\n")
        if cut < 0:
            st.tail = data
        else:
            events, st.tail = data[:cut], data[cut + 2 :]
            stamps = _TS_RE.findall(events)
            if stamps:
                res = self.res
                if not st.first:
                    st.first = True
                    res.first_ns[st.idx] = t
                    self._bump(FIRST)
                for ts in stamps:
                    res.recv_ns.append(t)
                    res.delay_ns.append(t - int(ts))
                res.chunks[st.idx] += len(stamps)
                if len(stamps) > 1:
                    res.coalesced += len(stamps)
            if not st.done_seen and _DONE in events:
                st.done_seen = True
        if st.done_seen and st.tail.endswith(_END_OF_BODY):
            self.res.completed[st.idx] = 1
            self._bump(COMPLETED)
            self.end(st, "", first=False)

    def end(self, st: _Stream, error: str, first: bool) -> None:
        """Close ``st``; ``first`` counts it as past its first chunk (for a stream that failed
        before one, so the driver's "all first chunks in" barrier is reached)."""
        st.ended = True
        self.live.pop(st.idx, None)
        if st.transport is not None:
            st.transport.close()
        if error:
            self._count_error(error)
        if first:
            self._bump(FIRST)
        self._count_ended()

    def _count_ended(self) -> None:
        self._bump(ENDED)
        self.ended += 1
        if (
            self.ended >= len(self.job.starts_ns)
            and self.all_ended is not None
            and not self.all_ended.done()
        ):
            self.all_ended.set_result(None)


def client_main(conn: Connection, counters: Any, base: int) -> None:
    """A client process: run each job sent on ``conn`` and send back its result; stop on None."""
    try:
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run
    while True:  # bounded by the driver, which sends None when the phase ends
        job = conn.recv()
        if job is None:
            return
        conn.send(run(_Reader(job, counters, base).run()))


# -- the driver's side -------------------------------------------------------------------------


class ClientPool:
    """``procs`` client processes (spawned once per phase), fed one job each per run."""

    def __init__(self, procs: int) -> None:
        ctx = mp.get_context("spawn")  # the driver runs an event loop: fork would copy it
        self.counters = ctx.RawArray("q", _COUNTERS * procs)
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for i in range(procs):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=client_main,
                args=(theirs, self.counters, i * _COUNTERS),
                name=f"bench-client-{i}",
                daemon=True,
            )
            proc.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(proc)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def count(self, which: int) -> int:
        return sum(self.counters[i] for i in range(which, len(self.counters), _COUNTERS))

    def submit(self, port: int, request: bytes, starts_ns: Sequence[int], deadline_ns: int) -> None:
        """Hand stream i to process i mod procs (so every process gets the same share of a
        ramp), after zeroing the counters."""
        for i in range(len(self.counters)):
            self.counters[i] = 0
        n = len(self.conns)
        for i, conn in enumerate(self.conns):
            conn.send(ClientJob(port, request, list(starts_ns[i::n]), deadline_ns))

    async def collect(self, timeout: float) -> list[ClientResult]:
        """Each process's result; raises TimeoutError after ``timeout`` s (the processes end
        their runs by the deadline, so this only fires if one has died)."""
        loop = asyncio.get_running_loop()

        def recv(conn: Connection) -> ClientResult:
            if not conn.poll(timeout):
                raise TimeoutError("a client process did not report")
            result: ClientResult = conn.recv()
            return result

        return list(
            await asyncio.gather(*(loop.run_in_executor(None, recv, c) for c in self.conns))
        )

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self.conns:
            conn.close()


@dataclass
class Boundary:
    """The proxy's CPU (ns) and RSS (bytes) read when a run crossed a boundary, at ``t_ns``."""

    t_ns: int
    cpu_ns: int
    rss: int


@dataclass
class TokenRun:
    """One run of K token-rate streams against one peer. Times in ms, CPU in µs."""

    k: int
    mode: str  # "burst" or "ramp"
    chunks: int
    interval_ms: float
    ramp_ms: float
    completed: int = 0
    chunks_received: int = 0
    chunks_expected: int = 0
    coalesced: int = 0
    ttfb_p50_ms: float | None = None
    ttfb_p99_ms: float | None = None
    delay_p50_ms: float | None = None
    delay_p99_ms: float | None = None
    delay_max_ms: float | None = None
    cpu_us_per_chunk: float | None = None  # steady state: all streams open, none ended
    cpu_window: str = ""  # "steady", or "whole run" when there was no steady window
    setup_us_per_stream: float | None = None  # open: accept, request, upstream, headers
    teardown_us_per_stream: float | None = None  # end: last chunks, [DONE], close
    steady_chunks: int = 0
    steady_s: float | None = None
    proxy_cpu_pct: float | None = None  # of one core, over the steady window
    kb_per_stream: float | None = None
    mock_late_p50_ms: float | None = None
    mock_late_p99_ms: float | None = None
    load_cpu_pct: float | None = None  # mock + clients, % of one core over the run
    load_core_busy_pct: float | None = None  # the load side's cores, all work, over the run
    foreign_pct: float | None = None  # the proxy's core busy with other work, over the run
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)


def starts(k: int, t0_ns: int, ramp_ns: int) -> list[int]:
    """Start times of ``k`` streams: all at ``t0_ns`` (burst), or evenly over ``ramp_ns``."""
    return [t0_ns + i * ramp_ns // k for i in range(k)]


def percentile(ordered: Sequence[int], q: float) -> int | None:
    """Nearest-rank percentile of an already sorted sequence."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(len(ordered) * q / 100) - 1))]


def _ms(ns: int | None) -> float | None:
    return None if ns is None else ns / 1e6


def count_between(recv: Sequence[array[int]], lo: int, hi: int) -> int:
    """Chunks read in [lo, hi) over every client's read times (each is in time order)."""
    return sum(bisect_left(r, hi) - bisect_left(r, lo) for r in recv)


async def run_tokens(
    pool: ClientPool,
    port: int,
    pids: list[int],
    k: int,
    mode: str,
    chunks: int,
    interval_ms: float,
    ramp_ms: float,
    grace_s: float,
    load_pids: Callable[[], list[int]],
    load_cores: set[int] | None,
    proxy_core: int | None = None,
) -> TokenRun:
    """One run of ``k`` streams through ``port``; ``pids`` are the proxy's (empty for direct).
    ``proxy_core``: the one core the proxy has to itself, to measure other work on it.

    Boundaries are polled every 2 ms from the shared counters; the proxy's CPU and RSS are read
    at each. Bounded: the clients cut every stream at the deadline (schedule + ``grace_s``).
    """
    run = TokenRun(
        k=k,
        mode=mode,
        chunks=chunks,
        interval_ms=interval_ms,
        ramp_ms=ramp_ms if mode == "ramp" else 0.0,
    )
    ramp_ns = int(run.ramp_ms * 1e6)
    lead_ns = 300_000_000  # time for the jobs to reach the client processes
    t0 = time.monotonic_ns() + lead_ns
    schedule_ns = ramp_ns + int(chunks * interval_ms * 1e6)
    deadline = t0 + schedule_ns + int(grace_s * 1e9)
    rss0 = procfs.rss_bytes(pids)
    pool.submit(port, token_request(chunks, interval_ms), starts(k, t0, ramp_ns), deadline)
    await asyncio.sleep(max(0.0, (t0 - time.monotonic_ns()) / 1e9 - 0.005))
    start = _boundary(pids)
    load0 = procfs.cpu_ns(load_pids())
    cores0 = _cores_busy(load_cores)
    own0 = _cores_busy({proxy_core} if proxy_core is not None else None)
    at: dict[int, Boundary] = {}  # FIRST: set-up done; COMPLETED: first end; ENDED: all ended
    # Bounded by the deadline plus 2 s; clients end every stream by the deadline.
    while time.monotonic_ns() < deadline + 2_000_000_000 and ENDED not in at:
        await asyncio.sleep(0.002)
        if FIRST not in at and pool.count(FIRST) >= k:
            at[FIRST] = _boundary(pids, with_rss=True)
        if COMPLETED not in at and pool.count(COMPLETED) >= 1:
            at[COMPLETED] = _boundary(pids, with_rss=True)
        if pool.count(ENDED) >= k:
            at[ENDED] = _boundary(pids)
    end = at.get(ENDED) or _boundary(pids)
    load1 = procfs.cpu_ns(load_pids())
    cores1 = _cores_busy(load_cores)
    own1 = _cores_busy({proxy_core} if proxy_core is not None else None)
    results = await pool.collect(timeout=30)
    run.seconds = (end.t_ns - start.t_ns) / 1e9
    _fill_streams(run, results)
    if pids:
        _fill_cpu(run, results, start, at, end)
        rss_open = max((b.rss for b in at.values()), default=0)
        if rss_open and rss0:
            run.kb_per_stream = (rss_open - rss0) / k / 1024
    wall_ns = end.t_ns - start.t_ns
    if wall_ns > 0:
        run.load_cpu_pct = (load1 - load0) / wall_ns * 100
        busy = [procfs.busy_fraction(a, b) for a, b in zip(cores0, cores1, strict=True)]
        vals = [b for b in busy if b is not None]
        run.load_core_busy_pct = sum(vals) / len(vals) * 100 if vals else None
        if own0 and own1 and pids:
            busy_own = procfs.busy_fraction(own0[0], own1[0])
            if busy_own is not None:
                share = (end.cpu_ns - start.cpu_ns) / wall_ns
                run.foreign_pct = max(0.0, busy_own - share) * 100
    return run


def _boundary(pids: list[int], with_rss: bool = False) -> Boundary:
    t = time.monotonic_ns()
    return Boundary(t, procfs.cpu_ns(pids), procfs.rss_bytes(pids) if with_rss and pids else 0)


def _cores_busy(cores: set[int] | None) -> list[procfs.CoreTimes | None]:
    return [procfs.core_times(c) for c in sorted(cores or ())]


def _fill_streams(run: TokenRun, results: list[ClientResult]) -> None:
    """Per-stream and per-chunk figures, over every client process's streams."""
    ttfb = sorted(
        f - s for r in results for s, f in zip(r.started_ns, r.first_ns, strict=True) if f
    )
    delays = sorted(d for r in results for d in r.delay_ns)
    run.completed = sum(sum(r.completed) for r in results)
    run.chunks_received = len(delays)
    run.chunks_expected = run.k * run.chunks
    run.coalesced = sum(r.coalesced for r in results)
    run.ttfb_p50_ms, run.ttfb_p99_ms = _ms(percentile(ttfb, 50)), _ms(percentile(ttfb, 99))
    run.delay_p50_ms, run.delay_p99_ms = _ms(percentile(delays, 50)), _ms(percentile(delays, 99))
    run.delay_max_ms = _ms(delays[-1]) if delays else None
    for r in results:
        for error, n in r.errors.items():
            run.errors[error] = run.errors.get(error, 0) + n


def _fill_cpu(
    run: TokenRun,
    results: list[ClientResult],
    start: Boundary,
    at: dict[int, Boundary],
    end: Boundary,
) -> None:
    """Steady-state CPU per chunk between "all first chunks in" and "first stream ended";
    set-up and teardown per stream are the CPU before and after that window minus what its
    chunks cost at the steady rate. No steady window (a saturated peer whose first stream
    ends before the last one starts): CPU per chunk over the whole run instead, no split."""
    recv = [r.recv_ns for r in results]
    a, b = at.get(FIRST), at.get(COMPLETED)
    if a is None or b is None or b.t_ns <= a.t_ns:
        if run.chunks_received:
            run.cpu_us_per_chunk = (end.cpu_ns - start.cpu_ns) / run.chunks_received / 1000
            run.cpu_window = "whole run"
        return
    steady = count_between(recv, a.t_ns, b.t_ns)
    if not steady:
        return
    per_chunk = (b.cpu_ns - a.cpu_ns) / steady
    run.cpu_us_per_chunk = per_chunk / 1000
    run.cpu_window = "steady"
    run.steady_chunks = steady
    run.steady_s = (b.t_ns - a.t_ns) / 1e9
    run.proxy_cpu_pct = (b.cpu_ns - a.cpu_ns) / (b.t_ns - a.t_ns) * 100
    before = count_between(recv, 0, a.t_ns)
    run.setup_us_per_stream = ((a.cpu_ns - start.cpu_ns) - before * per_chunk) / run.k / 1000
    if ENDED in at:
        after = count_between(recv, b.t_ns, end.t_ns + 1)
        run.teardown_us_per_stream = ((end.cpu_ns - b.cpu_ns) - after * per_chunk) / run.k / 1000


# -- the phase: levels of K, then a search for the largest K each proxy carries ----------------


@dataclass(frozen=True)
class TokenPlan:
    """The phase's knobs (see ``python -m bench --help``)."""

    levels: tuple[int, ...]  # K values, each run burst and ramped
    modes: tuple[str, ...]
    chunks: int
    rate: float  # chunks per second per stream
    ramp_ms: float
    grace_s: float
    rounds: int
    search: tuple[str, ...]  # peers whose largest K is searched for
    search_steps: int
    search_limit_ms: float  # the added chunk-delay p99 a peer may add and still "carry" K
    search_max_k: int

    @property
    def interval_ms(self) -> float:
        return 1000.0 / self.rate


class TokenPhase:
    """Runs the token-rate phase over the given peers; results go to ``self.out``.

    ``direct`` (when present) is the floor every "added" figure subtracts, so the search
    measures direct at each K it tries (once per K).
    """

    def __init__(
        self,
        plan: TokenPlan,
        peers: Sequence[Any],
        mock: Any,
        pool: ClientPool,
        load_cores: set[int] | None,
        proxy_cores: set[int] | None,
        fd_limit: int,
        wait_quiet: Callable[[], Awaitable[float]],
        log: Callable[..., None],
    ) -> None:
        self.plan = plan
        self.proxy_cores = proxy_cores
        self.wait_quiet = wait_quiet
        self.peers = list(peers)
        self.mock = mock
        self.pool = pool
        self.load_cores = load_cores
        self.fd_limit = fd_limit
        self.log = log
        self.out: dict[str, Any] = {"runs": [], "search": {}, "skipped": {}}
        self._direct_at: dict[int, dict[str, Any]] = {}  # ramped direct runs by K (search)

    def _max_k(self) -> int:
        # A proxied stream holds two sockets in the proxy (and one in a client process);
        # keep 64 fds of head room for everything else.
        return max(1, (self.fd_limit - 64) // 2)

    async def run(self) -> dict[str, Any]:
        plan = self.plan
        for peer in self.peers:  # warm-up: pools, first-use paths, page faults; not recorded
            await self._one(peer, min(20, min(plan.levels)), "ramp", record=False, chunks=20)
        for rnd in range(plan.rounds):
            for i, k in enumerate(plan.levels):
                if k > self._max_k():
                    self.out["skipped"][str(k)] = (
                        f"K={k} needs {2 * k + 64} fds in the proxy; the limit is {self.fd_limit}"
                    )
                    continue
                for j, mode in enumerate(plan.modes):
                    order = _rotate(self.peers, rnd + i + j)
                    for peer in order:
                        row = await self._one(peer, k, mode)
                        row["round"] = rnd
                        if peer.name == "direct" and mode == "ramp":
                            self._direct_at.setdefault(k, row)
        for name in plan.search:
            peer = next((p for p in self.peers if p.name == name), None)
            if peer is not None:
                self.out["search"][name] = await self._search(peer)
        return self.out

    async def _one(
        self,
        peer: Any,
        k: int,
        mode: str,
        record: bool = True,
        search: bool = False,
        chunks: int = 0,
    ) -> dict[str, Any]:
        """One run of ``k`` streams through ``peer``, with the mock's lateness over it."""
        plan = self.plan
        await self._settle()
        waited = await self.wait_quiet()  # start in a lull of other jobs on the proxy's core
        await self._lateness()  # read-and-reset: only this run's chunks count below
        # Other work on the proxy's core only means something for a peer alone on one core.
        alone = self.proxy_cores is not None and peer.cpus == self.proxy_cores
        run = await run_tokens(
            self.pool,
            peer.port,
            peer.pids(),
            k,
            mode,
            chunks or plan.chunks,
            plan.interval_ms,
            plan.ramp_ms,
            plan.grace_s,
            load_pids=lambda: self.pool.pids() + self.mock.pids(),
            load_cores=self.load_cores,
            proxy_core=min(self.proxy_cores) if alone and self.proxy_cores else None,
        )
        late = await self._lateness()
        if late.get("count"):
            run.mock_late_p50_ms = late["p50_us"] / 1000
            run.mock_late_p99_ms = late["p99_us"] / 1000
        row = {"peer": peer.name, "search": search, "waited_for_quiet_s": waited, **asdict(run)}
        if record:
            self.out["runs"].append(row)
            self.log(_describe(row))
        return row

    async def _settle(self) -> None:
        """Wait (bounded, 15 s) until the mock serves no stream: the last run's proxy has
        dropped every upstream stream, so runs never overlap."""
        for _ in range(60):
            stats = await self._mock_json("/_stats")
            if not stats.get("active_streams"):
                break
            await asyncio.sleep(0.25)
        await asyncio.sleep(0.3)  # closed sockets and TIME_WAIT bookkeeping drain

    async def _lateness(self) -> dict[str, Any]:
        return await self._mock_json("/_lateness")

    async def _mock_json(self, path: str) -> dict[str, Any]:
        resp = await fetch(self.mock.port, "GET", path, timeout=10)
        try:
            return dict(json.loads(resp.body))
        except ValueError:
            return {}

    # -- the search -------------------------------------------------------------------------
    async def _verdict(self, peer: Any, k: int, tries: int = 2) -> dict[str, Any]:
        """Ramped run of ``peer`` at ``k`` against direct's at ``k``: does it carry K?

        A run that fails is run once more (direct too) and K counts as carried if either
        run carried it: on a shared machine one burst of another job can fail a single run,
        and a proxy that cannot carry K fails both.
        """
        direct = next((p for p in self.peers if p.name == "direct"), None)
        verdict: dict[str, Any] = {}
        for attempt in range(tries):
            base: dict[str, Any] | None = None
            if direct is not None:
                base = self._direct_at.get(k) if attempt == 0 else None
                if base is None:
                    base = await self._one(direct, k, "ramp", search=True)
                    self._direct_at[k] = base
            row = await self._one(peer, k, "ramp", search=True)
            verdict = judge(row, base, self.plan.search_limit_ms)
            verdict["runs"] = attempt + 1
            if verdict["ok"]:
                break
        return verdict

    async def _search(self, peer: Any) -> dict[str, Any]:
        """Largest K (ramped starts) with added chunk-delay p99 within the limit and every
        stream complete. Brackets from the level runs, then geometric bisection; bounded
        by ``search_steps`` runs and by the K the fd limit allows."""
        plan = self.plan
        limit_k = min(plan.search_max_k, self._max_k())
        tried: dict[int, dict[str, Any]] = {}
        for row in self.out["runs"]:
            if row["peer"] == peer.name and row["mode"] == "ramp" and not row["search"]:
                tried[row["k"]] = judge(row, self._direct_at.get(row["k"]), plan.search_limit_ms)
        for _ in range(plan.search_steps):
            hi = first_failing(tried)
            if hi is not None and tried[hi]["runs"] < 2 and not tried[hi]["load_bound"]:
                k = hi  # a level run failed once: confirm before bisecting below it
                verdict = await self._verdict(peer, k, tries=1)
                verdict["runs"] += 1
            else:
                found = next_k(tried, limit_k)
                if found is None:
                    break
                k = found
                verdict = await self._verdict(peer, k)
            tried[k] = verdict
            self.log(
                f"token-rate search {peer.name}: K={k} "
                f"{'carried' if verdict['ok'] else 'not carried'} ({verdict['why']})"
            )
        ok = [k for k, v in tried.items() if v["ok"]]
        best = max(ok, default=None)
        bad = first_failing(tried)
        best_row = tried[best] if best is not None else None
        cpu = best_row.get("cpu_us_per_chunk") if best_row else None
        return {
            "largest_k": best,
            "first_failing_k": bad,
            # Direct itself missed the bar at the first K not carried: the load side, not
            # the proxy, may be what failed there, so the largest K is a lower bound.
            "limited_by_load": bad is not None and tried[bad]["load_bound"],
            "limit_ms": plan.search_limit_ms,
            "rate": plan.rate,
            # What one core would carry if CPU were the only limit (CPU per chunk at best K).
            "cpu_bound_k": 1e6 / (cpu * plan.rate) if cpu else None,
            "tried": {str(k): v for k, v in sorted(tried.items())},
        }


def judge(row: dict[str, Any], base: dict[str, Any] | None, limit_ms: float) -> dict[str, Any]:
    """Whether a ramped run carried its K: every stream complete, and chunk-delay p99 no more
    than ``limit_ms`` above direct's at the same K. ``load_bound``: direct itself missed that
    (the mock or the clients could not keep up), so a failure there says nothing of the proxy."""
    p99 = row.get("delay_p99_ms")
    floor = (base or {}).get("delay_p99_ms") or 0.0
    added = None if p99 is None else p99 - floor
    complete = row.get("completed") == row.get("k")
    load_bound = base is not None and (
        base.get("completed") != base.get("k")
        or (base.get("delay_p99_ms") or 0.0) > limit_ms
        or (base.get("mock_late_p99_ms") or 0.0) > limit_ms
    )
    ok = complete and added is not None and added <= limit_ms
    why = (
        (f"added p99 {added:.1f} ms" if added is not None else "no chunks")
        + ("" if complete else f", {row.get('completed')}/{row.get('k')} streams complete")
        + (", load side saturated" if load_bound else "")
    )
    return {
        "ok": ok,
        "added_p99_ms": added,
        "load_bound": load_bound,
        "why": why,
        "cpu_us_per_chunk": row.get("cpu_us_per_chunk"),
        "runs": 1,
    }


def first_failing(tried: dict[int, dict[str, Any]]) -> int | None:
    """The smallest K not carried above the largest K carried (None: no such K tried)."""
    best = max((k for k, v in tried.items() if v["ok"]), default=None)
    return min(
        (k for k, v in tried.items() if not v["ok"] and (best is None or k > best)), default=None
    )


def next_k(tried: dict[int, dict[str, Any]], limit_k: int, ratio: float = 1.2) -> int | None:
    """The next K to try, or None when the answer is known to within ``ratio``.

    Between the largest carried K and the smallest K above it that was not carried: their
    geometric mean. No failure yet: double the largest carried (up to ``limit_k``). No success
    yet: a third of the smallest tried (down to 10).
    """
    lo = max((k for k, v in tried.items() if v["ok"]), default=None)
    hi = first_failing(tried)
    if lo is None and hi is None:
        return 100
    if lo is None:
        assert hi is not None
        k = max(10, hi // 3)
        return None if k >= hi else k
    if hi is None:
        k = min(limit_k, lo * 2)
        return None if k <= lo else k
    if hi / lo <= ratio:
        return None
    k = round((lo * hi) ** 0.5 / 10) * 10 if lo >= 50 else round((lo * hi) ** 0.5)
    return k if lo < k < hi else None


def _rotate(items: list[Any], n: int) -> list[Any]:
    if not items:
        return items
    n %= len(items)
    return items[n:] + items[:n]


def _describe(row: dict[str, Any]) -> str:
    def f(v: float | None, spec: str = ".2f") -> str:
        return "-" if v is None else format(v, spec)

    return (
        f"token-rate K={row['k']:<5} {row['mode']:<5} {row['peer']:<10} "
        f"done {row['completed']}/{row['k']}  cpu/chunk {f(row['cpu_us_per_chunk'], '.1f')} us "
        f"setup {f(row['setup_us_per_stream'], '.0f')} us  "
        f"delay p50 {f(row['delay_p50_ms'])} p99 {f(row['delay_p99_ms'])} ms  "
        f"ttfb p50 {f(row['ttfb_p50_ms'])} p99 {f(row['ttfb_p99_ms'])} ms  "
        f"KB/stream {f(row['kb_per_stream'], '.1f')}  merged {row['coalesced']}  "
        f"mock late p99 {f(row['mock_late_p99_ms'])} ms  "
        f"load CPU {f(row['load_cpu_pct'], '.0f')}% (core busy "
        f"{f(row['load_core_busy_pct'], '.0f')}%)  foreign {f(row['foreign_pct'], '.0f')}%  "
        f"{dict(list(row['errors'].items())[:2])}"
    )
