"""SIGTERM against a real ``python -m proxy serve``: stop accepting, drain what
is in flight up to the grace, close the rest, exit 0."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.faults import fixtures
from tests.faults.fixtures import JSON, FaultFactory, chat_body, route_config
from tests.faults.process import running_proxy, write_config
from tests.faults.server import chat_json, gated, respond, sse, sse_event

# The shared fixture, bound here so pytest finds it.
faults = fixtures.faults


def config_file(tmp_path: Path, upstream_url: str, grace: float) -> Path:
    config: dict[str, Any] = route_config({"a": upstream_url}, "a")
    config["server"] = {"shutdown_grace_seconds": grace}
    return write_config(tmp_path / "routes.yaml", config)


async def refused(url: str) -> bool:
    """Does a new connection to ``url`` get refused?"""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            async with session.get(url):
                return False
        except aiohttp.ClientConnectorError:
            return True


async def test_sigterm_lets_streams_and_requests_in_flight_finish(
    tmp_path: Path, faults: FaultFactory
) -> None:
    release = asyncio.Event()
    upstream = await faults(sse(2, before_end=release), gated(release, respond(200, chat_json())))
    async with (
        running_proxy(config_file(tmp_path, upstream.url, grace=30)) as proxy,
        aiohttp.ClientSession() as session,
    ):
        stream = await session.post(
            f"{proxy.url}/v1/chat/completions", data=chat_body(stream=True), headers=JSON
        )
        assert await stream.content.readuntil(b"\n\n") == sse_event(0)
        plain = asyncio.ensure_future(
            session.post(f"{proxy.url}/v1/chat/completions", data=chat_body(), headers=JSON)
        )
        await upstream.wait_requests(2)  # both are in flight
        proxy.signal(signal.SIGTERM)
        await proxy.wait_line(r"stopping \(pid \d+\): no new connections; 2 open")
        assert await refused(f"{proxy.url}/healthz")
        release.set()
        rest = await stream.read()
        assert rest.endswith(b"data: [DONE]\n\n")
        assert sse_event(1) in rest
        answer = await plain
        assert answer.status == 200
        assert (await answer.json())["choices"][0]["message"]["content"] == "hi"
        assert await proxy.wait_exit() == 0
    assert proxy.matching(r"stopped \(pid \d+\)")


async def test_sigterm_when_idle_exits_at_once(tmp_path: Path, faults: FaultFactory) -> None:
    upstream = await faults()
    async with running_proxy(config_file(tmp_path, upstream.url, grace=30)) as proxy:
        proxy.signal(signal.SIGTERM)
        # Well under the 30 s grace: nothing was in flight.
        assert await proxy.wait_exit(timeout=10) == 0


async def test_stream_longer_than_the_grace_is_cut_at_the_deadline(
    tmp_path: Path, faults: FaultFactory
) -> None:
    upstream = await faults(sse(1, end="hang"))
    async with (
        running_proxy(config_file(tmp_path, upstream.url, grace=1)) as proxy,
        aiohttp.ClientSession() as session,
    ):
        stream = await session.post(
            f"{proxy.url}/v1/chat/completions", data=chat_body(stream=True), headers=JSON
        )
        assert await stream.content.readuntil(b"\n\n") == sse_event(0)
        proxy.signal(signal.SIGTERM)
        with pytest.raises(aiohttp.ClientPayloadError):  # aborted, not ended cleanly
            await stream.read()
        async with asyncio.timeout(10):
            await upstream.connections[0].peer_closed.wait()
        assert await proxy.wait_exit(timeout=15) == 0


async def test_second_sigterm_exits_without_waiting(tmp_path: Path, faults: FaultFactory) -> None:
    upstream = await faults(sse(1, end="hang"))
    async with (
        running_proxy(config_file(tmp_path, upstream.url, grace=60)) as proxy,
        aiohttp.ClientSession() as session,
    ):
        stream = await session.post(
            f"{proxy.url}/v1/chat/completions", data=chat_body(stream=True), headers=JSON
        )
        await stream.content.readuntil(b"\n\n")
        proxy.signal(signal.SIGTERM)
        await proxy.wait_line("stopping")
        proxy.signal(signal.SIGTERM)
        assert await proxy.wait_exit(timeout=10) == 1
        assert proxy.matching("second SIGTERM: exiting now")
        stream.close()
