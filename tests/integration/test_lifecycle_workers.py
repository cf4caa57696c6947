"""``oaimux serve --workers 2``: two processes share the port; SIGHUP and
SIGTERM sent to the supervisor reach both."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.faults import fixtures
from tests.faults.fixtures import JSON, FaultFactory, chat_body, route_config
from tests.faults.process import ProxyProcess, running_proxy, write_config
from tests.faults.server import chat_json, respond, sse

# The shared fixture, bound here so pytest finds it.
faults = fixtures.faults

pytestmark = pytest.mark.skipif(
    not hasattr(socket, "SO_REUSEPORT"), reason="--workers needs SO_REUSEPORT"
)


def config_for(url: str, model: str = "m") -> dict[str, Any]:
    config = route_config({"u": url}, "u")
    config["routes"][0]["model"] = model
    config["log"] = {"access": False}
    config["server"] = {"shutdown_grace_seconds": 10}
    # Lifecycle only: metrics' cross-worker sharing is tested on its own
    # (test_observability_workers.py).
    config["metrics"] = {"enabled": False}
    return config


async def about_from_each_worker(proxy: ProxyProcess, workers: int) -> dict[int, dict[str, Any]]:
    """``/about`` over fresh connections until every worker answered (bounded)."""
    seen: dict[int, dict[str, Any]] = {}
    connector = aiohttp.TCPConnector(force_close=True)  # a new connection each time
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(400):
            async with session.get(f"{proxy.url}/about") as resp:
                about = await resp.json()
            seen[about["pid"]] = about
            if len(seen) == workers:
                return seen
    raise AssertionError(f"only saw workers {sorted(seen)}")


async def worker_pids(proxy: ProxyProcess, workers: int) -> set[int]:
    lines = await proxy.wait_line(r"oaimux serving .*\(pid \d+\)", count=workers)
    return {int(line.rsplit("(pid ", 1)[1].split(")")[0]) for line in lines}


async def test_two_workers_serve_reload_and_stop_together(
    tmp_path: Path, faults: FaultFactory
) -> None:
    upstream = await faults(default=respond(200, chat_json()))
    path = write_config(tmp_path / "routes.yaml", config_for(upstream.url))
    async with running_proxy(path, "--workers", "2") as proxy:
        pids = await worker_pids(proxy, 2)
        assert proxy.proc.pid not in pids and len(pids) == 2
        # Requests are spread over both workers.
        assert set(await about_from_each_worker(proxy, 2)) == pids

        # A bad file is refused once, by the supervisor, and never reaches a worker.
        path.write_text("routes: [")
        proxy.signal(signal.SIGHUP)
        await proxy.wait_line("reload refused, the workers keep the running config")
        assert all(a["reloads"] == 0 for a in (await about_from_each_worker(proxy, 2)).values())

        # A good one reaches both: each logs it, each serves the new route.
        write_config(path, config_for(upstream.url, model="m2"))
        proxy.signal(signal.SIGHUP)
        lines = await proxy.wait_line(r"reloaded .*\(pid \d+\)", count=2)
        assert {int(line.rsplit("(pid ", 1)[1].split(")")[0]) for line in lines} == pids
        assert all(a["reloads"] == 1 for a in (await about_from_each_worker(proxy, 2)).values())
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(20):
                async with session.post(
                    f"{proxy.url}/v1/chat/completions",
                    data=chat_body(model="m2"),
                    headers=JSON,
                ) as resp:
                    assert resp.status == 200

        proxy.signal(signal.SIGTERM)
        assert await proxy.wait_exit() == 0
    stopped = proxy.matching(r"stopped \(pid (\d+)\)")
    assert {int(m.group(1)) for m in stopped} == pids


async def test_sigterm_drains_a_stream_on_a_worker(tmp_path: Path, faults: FaultFactory) -> None:
    release = asyncio.Event()
    upstream = await faults(sse(1, before_end=release))
    path = write_config(tmp_path / "routes.yaml", config_for(upstream.url))
    async with (
        running_proxy(path, "--workers", "2") as proxy,
        aiohttp.ClientSession() as session,
    ):
        await worker_pids(proxy, 2)
        stream = await session.post(
            f"{proxy.url}/v1/chat/completions", data=chat_body(stream=True), headers=JSON
        )
        await stream.content.readuntil(b"\n\n")
        proxy.signal(signal.SIGTERM)
        await proxy.wait_line(r"stopping \(pid \d+\)", count=2)
        release.set()
        assert (await stream.read()).endswith(b"data: [DONE]\n\n")
        assert await proxy.wait_exit() == 0
