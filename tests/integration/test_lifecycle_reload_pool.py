"""Reloads keep warm upstream connections, and many reloads leak nothing.

Against a real ``python -m proxy serve`` and real SIGHUPs: a counting fake
upstream (every accepted TCP connection is recorded) behind the proxy, 50
clients at once. A reload of an unchanged file must not open connections a
run without reloads would not have opened; a thousand reloads must leave the
process's memory where it was.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.config import load_settings
from proxy.runtime.runtime import build_runtime
from proxy.server.app import create_app, server_options
from proxy.server.keys import DISCOVERY, RUNTIME, UPSTREAMS
from tests.faults import fixtures
from tests.faults.fixtures import JSON, FaultFactory, chat_body, route_config
from tests.faults.process import ProxyProcess, running_proxy, write_config
from tests.faults.server import FaultServer, chat_json, respond

faults = fixtures.faults

CLIENTS = 50
REQUESTS = 1500
RELOADS = 20
TRACED = 300  # reloads under tracemalloc (slow)


def config_for(url: str) -> dict[str, Any]:
    config = route_config({"u": url}, "u")
    config["log"] = {"access": False}  # quiet under load; lifecycle lines remain
    return config


async def ask(session: aiohttp.ClientSession, base: str) -> int:
    async with session.post(f"{base}/v1/chat/completions", data=chat_body(), headers=JSON) as resp:
        await resp.read()
        return resp.status


async def load(proxy: ProxyProcess, reloads: int) -> list[int]:
    """REQUESTS requests from CLIENTS clients at once; ``reloads`` SIGHUPs spread
    evenly through them, each awaited (its log line) before the next is sent,
    so none is merged with another by the kernel."""
    statuses: list[int] = []
    done = asyncio.Condition()
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            while len(statuses) < REQUESTS:
                slot = len(statuses)
                statuses.append(0)  # claimed, so the total is exact
                statuses[slot] = await ask(session, proxy.url)
                async with done:
                    done.notify_all()

        async def reloader() -> None:
            for i in range(1, reloads + 1):
                due = i * REQUESTS // (reloads + 1)
                async with done:
                    await done.wait_for(lambda due=due: len(statuses) >= due)  # type: ignore[misc]
                proxy.signal(signal.SIGHUP)
                await proxy.wait_line(r"reloaded .*routes\.yaml", count=i)

        async with asyncio.timeout(120):
            await asyncio.gather(reloader(), *(client() for _ in range(CLIENTS)))
    return statuses


async def run_load(tmp_path: Path, upstream: FaultServer, reloads: int) -> int:
    """Upstream connections opened by one proxy process under :func:`load`."""
    tmp_path.mkdir()
    path = write_config(tmp_path / "routes.yaml", config_for(upstream.url))
    before = len(upstream.connections)
    async with running_proxy(path) as proxy:
        statuses = await load(proxy, reloads)
        assert len(proxy.matching(r"reloaded .*routes\.yaml")) == reloads
    assert statuses.count(200) == REQUESTS
    return len(upstream.connections) - before


async def test_reloads_of_an_unchanged_file_under_load_keep_the_warm_connections(
    tmp_path: Path, faults: FaultFactory
) -> None:
    quiet = await faults(default=respond(200, chat_json()))
    reloading = await faults(default=respond(200, chat_json()))
    without = await run_load(tmp_path / "a", quiet, reloads=0)
    with_reloads = await run_load(tmp_path / "b", reloading, reloads=RELOADS)
    print(f"upstream connections: {without} without reloads, {with_reloads} with {RELOADS}")
    assert without <= CLIENTS * 1.1  # one per concurrent client, give or take
    assert with_reloads <= without * 1.1


def reload_in_process(app: web.Application, path: Path) -> None:
    """What SIGHUP does in serve.py, once the file has been read."""
    settings = load_settings(path)
    app[RUNTIME].swap(build_runtime(settings))
    app[DISCOVERY].refresh(settings)


async def test_a_thousand_reloads_leave_the_pool_bookkeeping_and_memory_flat(
    tmp_path: Path, faults: FaultFactory, aiohttp_server: Any
) -> None:
    one = await faults(default=respond(200, chat_json()))
    two = await faults(default=respond(200, chat_json()))
    path = write_config(tmp_path / "routes.yaml", config_for(one.url))
    app = create_app(load_settings(path))
    server: TestServer = await aiohttp_server(app, **server_options())
    pool = app[UPSTREAMS]
    opened = 0

    async def reload_and_ask(session: aiohttp.ClientSession, url: str | None = None) -> None:
        nonlocal opened
        if url is not None:
            write_config(path, config_for(url))
        reload_in_process(app, path)
        assert await ask(session, str(server.make_url(""))) == 200
        # The fault servers' own records of what they saw: not ours to count.
        for upstream in (one, two):
            opened += len(upstream.connections)
            upstream.connections.clear()
            upstream.requests.clear()

    async with aiohttp.ClientSession() as session:
        # An unchanged file: one warm connection serves every request across the reloads.
        for _ in range(1000):
            await reload_and_ask(session)
        assert opened == 1
        assert len(pool._idle) == 1

        # A changing file (the upstream moves between two servers at each
        # reload): the pool knows only the current upstream, and memory stays
        # where it was.
        for i in range(100):
            await reload_and_ask(session, (one, two)[i % 2].url)
        gc.collect()
        logging.disable(logging.CRITICAL)  # pytest keeps every record it captures
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(TRACED):
                await reload_and_ask(session, (one, two)[i % 2].url)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            logging.disable(logging.NOTSET)
    assert len(pool._idle) == 1 and len(pool._dns) == 0  # IP literals are never resolved
    # The server the upstream moved away from holds no idle connection.
    await (one, two)[(TRACED - 1) % 2].wait_open(1)
    await (one, two)[TRACED % 2].wait_open(0)
    print(f"traced memory kept after {TRACED} reloads: {grown} bytes")
    # About 35 KB are noise (caches warming up, whatever the count); each
    # reload leaving 200 bytes behind would add 60 KB.
    assert grown < 64 * 1024, f"{grown} bytes kept after {TRACED} reloads"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_thousand_sighups_leave_the_process_rss_flat(
    tmp_path: Path, faults: FaultFactory
) -> None:
    upstream = await faults(default=respond(200, chat_json()))
    path = write_config(tmp_path / "routes.yaml", config_for(upstream.url))
    async with running_proxy(path) as proxy, aiohttp.ClientSession() as session:
        pid = proxy.proc.pid
        rss: dict[int, int] = {}
        async with asyncio.timeout(240):
            for i in range(1, 1001):
                proxy.signal(signal.SIGHUP)
                await proxy.wait_line(r"reloaded .*routes\.yaml", count=i)
                assert await ask(session, proxy.url) == 200
                if i in (200, 1000):
                    rss[i] = rss_kib(pid)
    print(f"RSS after 200 reloads {rss[200]} KiB, after 1000 {rss[1000]} KiB")
    assert len(upstream.connections) == 1
    # Coarse (the allocator grows in steps of about half a MiB): when each
    # reload left pool entries and cached answers behind, these 800 reloads
    # grew RSS by about 5 MiB.
    assert rss[1000] - rss[200] < 1536
