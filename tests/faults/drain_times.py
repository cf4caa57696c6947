"""Bench: how long does a SIGTERM drain take, against the grace it promises?
Run ``python -m tests.faults.drain_times [--workers N] GRACE [GRACE ...]``.

Not a test (the bounded ones are in tests/integration/test_lifecycle_drain.py):
for each grace it starts a real ``python -m proxy serve`` in front of a fault
server on 127.0.0.1, opens streams that outlive any grace (one event, then
silence) over fresh connections, plus one that ends halfway through the
grace, sends SIGTERM and measures, from the signal:

- *refused*: a new connection is refused;
- *cut*: the last of the long streams broke (never a clean end);
- *exit*: the process exited (its status is printed too).

With ``--workers N`` there are 2·N long streams, so every worker is likely
to hold some.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.faults.fixtures import JSON, chat_body, route_config
from tests.faults.process import running_proxy, write_config
from tests.faults.server import FaultServer, sse


async def refused_at(url: str, since: float) -> float:
    """Seconds from ``since`` until a new connection to ``url`` is refused (bounded)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(2000):
            try:
                async with session.get(url):
                    pass
            except aiohttp.ClientOSError:  # refused, or reset from a closing listener's queue
                return time.perf_counter() - since
            await asyncio.sleep(0.005)
    raise AssertionError("new connections were still accepted")


async def broken_at(stream: aiohttp.ClientResponse, since: float) -> float:
    try:
        await stream.read()
    except aiohttp.ClientPayloadError:
        return time.perf_counter() - since
    raise AssertionError("a stream outliving the grace ended cleanly")


async def one_grace(grace: float, workers: int) -> None:
    release = asyncio.Event()
    upstream = await FaultServer(sse(1, end="hang")).then(sse(1, before_end=release)).start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = route_config({"a": upstream.url}, "a")
            config["server"] = {"shutdown_grace_seconds": grace}
            config["log"] = {"access": False}
            config["metrics"] = {"enabled": False}
            path = write_config(Path(tmp) / "routes.yaml", config)
            extra = ("--workers", str(workers)) if workers > 1 else ()
            async with running_proxy(path, *extra) as proxy:
                await proxy.wait_line(r"oaimux serving", count=max(workers, 1))
                url = f"{proxy.url}/v1/chat/completions"
                fresh = aiohttp.TCPConnector(force_close=True, limit=0)
                async with aiohttp.ClientSession(connector=fresh) as session:
                    short = await session.post(url, data=chat_body(stream=True), headers=JSON)
                    await short.content.readuntil(b"\n\n")
                    longs = []
                    for _ in range(2 * workers):
                        resp = await session.post(url, data=chat_body(stream=True), headers=JSON)
                        await resp.content.readuntil(b"\n\n")
                        longs.append(resp)
                    since = time.perf_counter()
                    proxy.signal(signal.SIGTERM)
                    loop = asyncio.get_running_loop()
                    loop.call_later(grace / 2, release.set)
                    refused = await refused_at(f"{proxy.url}/healthz", since)
                    short_ok = (await short.read()).endswith(b"data: [DONE]\n\n")
                    cuts = await asyncio.gather(*(broken_at(r, since) for r in longs))
                    code = await proxy.wait_exit(timeout=grace + 30)
                    exited = time.perf_counter() - since
                cut_lines = proxy.matching(r"(\d+) requests cut")
                print(
                    f"grace {grace:g}s workers {workers}: refused {refused * 1000:.0f} ms, "
                    f"stream ending at grace/2 clean: {short_ok}, "
                    f"long streams cut at {min(cuts):.3f}-{max(cuts):.3f}s, "
                    f"exit {code} at {exited:.3f}s (grace + {exited - grace:.3f}s), "
                    f"cut per process: {[int(m.group(1)) for m in cut_lines]}"
                )
    finally:
        await upstream.close()


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.drain_times")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("graces", type=float, nargs="+")
    args = parser.parse_args()
    for grace in args.graces:
        await one_grace(grace, args.workers)


if __name__ == "__main__":
    asyncio.run(main())
