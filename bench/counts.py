"""Counts of oaimux's work on the token-rate load that other jobs on the machine cannot move.

``python -m bench.counts instructions|heap|sites|memory|syscalls``: oaimux against the bench's
mock, each count printed as one JSON line. Method and figures: bench/README.md, "Counting instead of
timing".

- ``instructions`` (needs valgrind): oaimux under callgrind; counters zeroed once it is warm,
  read after (a) ``--streams`` streams of one chunk opened 30 ms apart and after (b) as many
  of ``--chunks`` chunks each, 150 ms apart (one read per chunk). Set-up = (a) / streams,
  per chunk = ((b) - (a)) / (streams x (chunks - 1)): user-space instructions only.
- ``heap``: Python heap (tracemalloc) with ``--streams`` streams held open, each past its
  first chunk, minus the heap before, per stream.
- ``sites``: the same, with tracemalloc keeping 30 frames: what the open streams hold, per
  stream, by allocating line and by traceback (snapshot diff), and the objects of each type
  that appeared (``gc``), then the heap figure (read it from ``heap``: the deeper traces
  change what is allocated at start-up, not per stream).
- ``memory`` (glibc): the same streams, read from the C allocator and the kernel instead: the
  bytes malloc hands out (``mallinfo2``: Python's objects over 512 bytes and every C library's
  allocations, which tracemalloc does not see) and the resident set, per stream. Before the
  first reading the proxy gives its free heap pages back (``malloc_trim(0)``), so the holes
  start-up left in the heap do not absorb the first streams' growth (docs/decisions.md,
  "Idle heap holes move the bench's KB per stream").
- ``--token-limit``: oaimux runs with the token budget of ``python -m bench --token-limit``
  (both windows, too large to refuse), to price reserving and reconciling each request.
- ``syscalls``: write and read system calls of the proxy (``/proc/<pid>/io``) per stream,
  for ``--streams`` streams of 3 chunks started together.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory

from bench.http1 import build_request
from bench.loadgen import CHAT_BODY
from bench.peers import REPO_ROOT, free_port, oaimux_config, to_yaml
from bench.tokenrate import token_request

_END = b"0\r\n\r\n"


class _Stream(asyncio.Protocol):
    """One streaming request; notes when its first event and its end arrive."""

    def __init__(self, request: bytes, first: asyncio.Future[None], ended: asyncio.Future[None]):
        self.request, self.first, self.ended = request, first, ended
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.first.done() and b"data:" in data:
            self.first.set_result(None)
        self.tail = (self.tail + data)[-len(_END) :]
        if self.tail == _END:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None)


async def streams(
    port: int,
    k: int,
    chunks: int,
    interval_ms: float,
    gap_s: float,
    held: float = 0.0,
    at_first: object = None,
) -> None:
    """Open ``k`` streams ``gap_s`` apart; call ``at_first`` once all have their first
    event, then wait for every end (bounded)."""
    loop = asyncio.get_running_loop()
    request = token_request(chunks, interval_ms)
    firsts, ends = [], []
    for _ in range(k):
        first, ended = loop.create_future(), loop.create_future()
        firsts.append(first)
        ends.append(ended)
        await loop.create_connection(
            lambda f=first, e=ended: _Stream(request, f, e), "127.0.0.1", port
        )
        if gap_s:
            await asyncio.sleep(gap_s)
    await asyncio.wait_for(asyncio.gather(*firsts), 60)
    if callable(at_first):
        await at_first()
    await asyncio.wait_for(asyncio.gather(*ends), 60 + held)


async def requests(port: int, n: int) -> None:
    """``n`` non-stream chat requests one after another on one keep-alive connection."""
    request = build_request("POST", "/v1/chat/completions", CHAT_BODY)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(n):
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await asyncio.wait_for(reader.readexactly(length), 30)
    finally:
        writer.close()


async def _wait_port(port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def _callgrind(pid: int, what: str, out: Path, keep: Path | None = None, name: str = "") -> int:
    """Zero (``-z``) or dump (``-d``) the counters; after a dump, its total (and, with
    ``keep``, the dump copied there as ``name``, for ``callgrind_annotate``)."""
    subprocess.run(["callgrind_control", what, str(pid)], check=True, capture_output=True)
    if what == "-z":
        return 0
    for _ in range(50):  # the dump is written by the proxy's process, shortly
        dumps = sorted(out.glob(f"cg.{pid}.*"), key=os.path.getmtime)
        if dumps and "totals:" in dumps[-1].read_text():
            text = dumps[-1].read_text()
            if keep is not None:
                (keep / name).write_text(text)
            return int(text.split("totals:")[1].split()[0])
        time.sleep(0.1)
    raise RuntimeError("callgrind wrote no dump")


async def run(
    mode: str,
    k: int,
    chunks: int,
    tmp: Path,
    keep: Path | None = None,
    n: int = 1000,
    token_limit: bool = False,
) -> dict[str, float]:
    mock_port, port = free_port(), free_port()
    config = tmp / "routes.yaml"
    config.write_text(to_yaml(oaimux_config(mock_port, port, token_limit=token_limit)))
    python = sys.executable
    mock = subprocess.Popen(
        [python, "-m", "bench.mock_upstream", "--port", str(mock_port)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wrap = (
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.%p"]
        if mode == "instructions"
        else []
    )
    traced = mode in ("heap", "sites")
    env = dict(os.environ, BENCH_COUNTS_HEAP=str(tmp / "heap") if traced else "")
    env["BENCH_COUNTS_FRAMES"] = "30" if mode == "sites" else "1"
    env["BENCH_COUNTS_MEMORY"] = str(tmp / "heap") if mode == "memory" else ""
    if mode == "instructions":
        # Fixed string hashes: dict and set probing then runs the same
        # instructions in every run (random seeds moved the counts by ~2%).
        env["PYTHONHASHSEED"] = "0"
    proxy = subprocess.Popen(
        [*wrap, python, "-m", "bench.counts", "serve", str(config), str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await _wait_port(mock_port, 30)
        await _wait_port(port, 300)
        await streams(port, 5, 3, 50, 0.05)  # warm: imports, pooled connections
        if mode == "instructions":
            await requests(port, 20)
            _callgrind(proxy.pid, "-z", tmp)
            await streams(port, k, 1, 50, 0.03)
            setup = _callgrind(proxy.pid, "-d", tmp, keep, "setup.cg")
            _callgrind(proxy.pid, "-z", tmp)
            await requests(port, n)
            plain = _callgrind(proxy.pid, "-d", tmp, keep, "requests.cg")
            _callgrind(proxy.pid, "-z", tmp)
            await streams(port, k, chunks, 150, 0.0)
            both = _callgrind(proxy.pid, "-d", tmp, keep, "chunks.cg")
            return {
                "instructions_per_setup": setup / k,
                "instructions_per_request": plain / n,
                "instructions_per_chunk": (both - setup) / (k * (chunks - 1)),
            }
        if mode in ("heap", "memory", "sites"):
            heap = tmp / "heap"

            async def look() -> None:
                await asyncio.sleep(0.5)
                proxy.send_signal(signal.SIGUSR2)
                for _ in range(100):
                    await asyncio.sleep(0.1)
                    if heap.exists() and len(heap.read_text().split()) > looks:
                        return

            looks = 0
            await look()
            looks = 1
            await streams(port, k, 3, 2500, 0.0, held=5, at_first=look)
            if mode == "memory":
                (used0, rss0), (used1, rss1) = (
                    map(int, line.split()) for line in heap.read_text().splitlines()
                )
                return {
                    "malloc_bytes_per_open_stream": (used1 - used0) / k,
                    "rss_bytes_per_open_stream": (rss1 - rss0) / k,
                }
            before, during = map(int, heap.read_text().split())
            if mode == "sites":
                _print_sites(heap, k)
            return {"heap_bytes_per_open_stream": (during - before) / k}
        io = Path(f"/proc/{proxy.pid}/io")

        def calls() -> tuple[int, int]:
            fields = dict(line.split(": ") for line in io.read_text().splitlines())
            return int(fields["syscw"]), int(fields["syscr"])

        before = calls()
        await streams(port, k, 3, 20, 0.0)
        after = calls()
        return {
            "writes_per_stream": (after[0] - before[0]) / k,
            "reads_per_stream": (after[1] - before[1]) / k,
        }
    finally:
        proxy.send_signal(signal.SIGTERM)
        mock.terminate()
        for proc in (proxy, mock):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _print_sites(heap: Path, k: int, top: int = 40) -> None:
    """What the open streams hold: the snapshot diff's largest allocation sites (innermost
    line, then the whole traceback shortened to the frames outside the standard library)
    and the objects of each type that appeared, each per stream."""
    before = tracemalloc.Snapshot.load(f"{heap}.0")
    during = tracemalloc.Snapshot.load(f"{heap}.1")
    for group in ("lineno", "traceback"):
        print(f"-- bytes per stream by {group}")
        for stat in during.compare_to(before, group)[:top]:
            if stat.size_diff / k < 8:
                continue
            frames = [str(f) for f in stat.traceback][-8:] if group == "traceback" else []
            where = stat.traceback[-1] if group == "lineno" else ""
            print(f"{stat.size_diff / k:8.1f} {stat.count_diff / k:6.2f} {where}")
            for frame in frames:
                print(f"{'':16}{frame}")
    types0 = json.loads(Path(f"{heap}.0.types").read_text())
    types1 = json.loads(Path(f"{heap}.1.types").read_text())
    grown = {n: (c - types0.get(n, 0)) / k for n, c in types1.items()}
    print("-- gc-tracked objects per stream by type")
    for name, per in sorted(grown.items(), key=lambda kv: -kv[1])[:top]:
        if per >= 0.5:
            print(f"{per:6.2f} {name}")


def serve(config: str, port: str) -> int:
    """oaimux itself; with BENCH_COUNTS_HEAP set, tracemalloc on and SIGUSR2 appending the
    traced heap to that file."""
    out = os.environ.get("BENCH_COUNTS_HEAP")
    if out:
        frames = int(os.environ.get("BENCH_COUNTS_FRAMES") or 1)
        tracemalloc.start(frames)

        def note(*_: object) -> None:
            import gc

            gc.collect()
            if frames > 1:  # ``sites``: the whole snapshot, for the driver to compare
                snapshot = tracemalloc.take_snapshot()
                n = len(Path(out).read_text().split()) if os.path.exists(out) else 0
                snapshot.dump(f"{out}.{n}")
                census: dict[str, int] = {}
                for obj in gc.get_objects():
                    name = type(obj).__qualname__
                    census[name] = census.get(name, 0) + 1
                Path(f"{out}.{n}.types").write_text(json.dumps(census))
            with open(out, "a") as f:
                f.write(f"{tracemalloc.get_traced_memory()[0]}\n")

        signal.signal(signal.SIGUSR2, note)
    memory = os.environ.get("BENCH_COUNTS_MEMORY")
    if memory:
        signal.signal(signal.SIGUSR2, _memory_note(memory))
    from proxy import early_signals

    early_signals.hold()
    from proxy.cli import main

    return main(["serve", "--config", config, "--port", port, "--host", "127.0.0.1"])


def _memory_note(out: str) -> Callable[..., None]:
    """A SIGUSR2 handler appending ``malloc in-use bytes, resident bytes`` to ``out``; the
    first call gives the free heap pages back to the kernel before it reads."""
    import ctypes
    import gc

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks "
            "keepcost".split()
        ]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    page = os.sysconf("SC_PAGE_SIZE")
    notes = [0]

    def note(*_: object) -> None:
        gc.collect()
        if not notes[0]:
            libc.malloc_trim(0)
        notes[0] += 1
        info = libc.mallinfo2()
        with open("/proc/self/statm") as f:
            resident = int(f.read().split()[1]) * page
        with open(out, "a") as f:
            f.write(f"{info.uordblks + info.hblkhd} {resident}\n")

    return note


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["serve"]:
        return serve(args[1], args[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["instructions", "heap", "sites", "memory", "syscalls"])
    ap.add_argument(
        "--streams",
        type=int,
        help="streams (default 40; 300 for heap and memory; 100 for syscalls)",
    )
    ap.add_argument("--chunks", type=int, default=41, help="chunks per stream (instructions)")
    ap.add_argument(
        "--requests",
        type=int,
        default=1000,
        help="non-stream requests on one keep-alive connection (instructions)",
    )
    ap.add_argument("--keep", type=Path, help="copy the callgrind dumps into this folder")
    ap.add_argument(
        "--token-limit",
        action="store_true",
        help="with the token budget of the timed bench's --token-limit run (README: Token budgets)",
    )
    a = ap.parse_args(args)
    if a.mode == "sites" and a.streams is None:
        a.streams = 300  # as heap
    k = a.streams or {"instructions": 40, "heap": 300, "memory": 300, "syscalls": 100}[a.mode]
    if a.keep is not None:
        a.keep.mkdir(parents=True, exist_ok=True)
    with TemporaryDirectory() as tmp:
        result = asyncio.run(run(a.mode, k, a.chunks, Path(tmp), a.keep, a.requests, a.token_limit))
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
