"""Non-streaming load: a fixed number of keep-alive connections POSTing a small chat body.

``run_load`` uses ``wrk`` (C, one thread, a Lua script for the POST body) when it is on PATH,
otherwise a built-in asyncio generator. Both are closed-loop: each connection sends its next
request when the previous answer is in, so latency percentiles are at fixed concurrency.

Contract: ``run_load`` returns a ``LoadResult`` (requests, seconds, p50/p99 in ms, errors);
it never raises for a failing peer (errors are counted), and it always ends within
``duration + timeout`` seconds plus a few seconds of process start-up.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.http1 import ProtocolError, ResponseParser, build_request
from bench.streams import percentile

CHAT_BODY = b'{"model":"bench-model","messages":[{"role":"user","content":"hello"}],"stream":false}'

# The Lua script prints one machine-readable line after the run. wrk's own latency
# histogram is in microseconds; non-2xx answers are "status" errors.
WRK_LUA = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench-client"
wrk.body = os.getenv("BENCH_BODY")

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@dataclass
class LoadResult:
    """One load run against one peer."""

    tool: str
    conns: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    note: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["rps"] = self.rps
        return d


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    port: int, path: str, conns: int, duration: float, workdir: Path, body: bytes = CHAT_BODY
) -> LoadResult:
    """Run ``wrk -t1 -cN`` for ``duration`` seconds and parse its result line.

    wrk inherits this process's CPU affinity (the driver pins itself to the client core).
    """
    script = workdir / "post.lua"
    if not script.exists():
        script.write_text(WRK_LUA)
    cmd = [
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}{path}",
    ]
    env = dict(os.environ, BENCH_BODY=body.decode())

    try:
        out = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=duration + 30
        ).stdout
    except subprocess.TimeoutExpired:
        return LoadResult("wrk", conns, 0, duration, 0.0, 0.0, 1, "wrk timed out")
    for line in out.splitlines():
        if line.startswith("BENCHJSON "):
            d = json.loads(line[len("BENCHJSON ") :])
            errors = sum(d[k] for k in d if k.startswith("err_"))
            return LoadResult(
                "wrk",
                conns,
                int(d["requests"]),
                d["duration_us"] / 1e6,
                d["p50_us"] / 1000,
                d["p99_us"] / 1000,
                int(errors),
            )
    return LoadResult("wrk", conns, 0, duration, 0.0, 0.0, 1, f"no result: {out[-300:]!r}")


async def _conn_loop(
    port: int, request: bytes, deadline: float, lat_ns: list[int], errors: list[int]
) -> None:
    """One closed-loop connection: send, read the whole answer, repeat until the deadline."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        errors[0] += 1
        return
    try:
        while time.monotonic() < deadline:
            t0 = time.monotonic_ns()
            writer.write(request)
            parser = ResponseParser()
            while not parser.done:  # bounded by the response size and the read timeout
                data = await asyncio.wait_for(reader.read(65536), 10.0)
                if not data:
                    parser.eof()
                    break
                parser.feed(data)
            lat_ns.append(time.monotonic_ns() - t0)
            if not 200 <= parser.status < 300:
                errors[0] += 1
            if parser.headers.get("connection", "").lower() == "close":
                break
    except (OSError, TimeoutError, ProtocolError):
        errors[0] += 1
    finally:
        writer.close()


async def run_builtin(
    port: int, path: str, conns: int, duration: float, body: bytes = CHAT_BODY
) -> LoadResult:
    """The fallback generator: ``conns`` asyncio connections for ``duration`` seconds.

    It is far slower than wrk (Python on the same core as the mock), so its req/s figures
    are a floor for fast peers; CPU per request of the proxy stays meaningful.
    """
    request = build_request("POST", path, body)
    lat_ns: list[int] = []
    errors = [0]
    t0 = time.monotonic()
    deadline = t0 + duration
    await asyncio.wait_for(
        asyncio.gather(
            *(_conn_loop(port, request, deadline, lat_ns, errors) for _ in range(conns))
        ),
        duration + 30,
    )
    seconds = time.monotonic() - t0
    lat_ms = [v / 1e6 for v in lat_ns]
    return LoadResult(
        "asyncio",
        conns,
        len(lat_ns),
        seconds,
        percentile(lat_ms, 50),
        percentile(lat_ms, 99),
        errors[0],
    )


async def run_load(
    port: int, path: str, conns: int, duration: float, workdir: Path, use_wrk: bool = True
) -> LoadResult:
    """Run one load measurement with the best available generator (see module docstring)."""
    if use_wrk and have_wrk():
        # wrk blocks; run it in a thread so the event loop (and its timers) stay alive.
        return await asyncio.to_thread(run_wrk, port, path, conns, duration, workdir)
    return await run_builtin(port, path, conns, duration)
