"""SIGTERM against a real ``python -m proxy serve``: stop accepting, drain what
is in flight up to the grace, close the rest, exit 0."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.faults import fixtures
from tests.faults.fixtures import JSON, FaultFactory, chat_body, route_config
from tests.faults.process import running_proxy, write_config
from tests.faults.server import chat_json, gated, hang, respond, sse, sse_event

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


def _with_workers(n: int) -> Any:
    marks = (
        [] if n == 1 or hasattr(socket, "SO_REUSEPORT") else [pytest.mark.skip("no SO_REUSEPORT")]
    )
    return pytest.param(n, marks=marks, id=f"workers{n}")


async def _cut_after(stream: aiohttp.ClientResponse, since: float) -> float:
    """Seconds from ``since`` until ``stream`` broke; it must not end cleanly."""
    with pytest.raises(aiohttp.ClientPayloadError):
        await stream.read()
    return time.perf_counter() - since


@pytest.mark.parametrize("workers", [_with_workers(1), _with_workers(2)])
@pytest.mark.parametrize("grace", [0.5, 2.0])
async def test_drain_keeps_to_the_grace(
    tmp_path: Path, faults: FaultFactory, grace: float, workers: int
) -> None:
    """From SIGTERM: new connections refused at once; a stream that ends within
    the grace ends cleanly; streams and requests that outlive it are broken at
    the grace, not before; the process exits 0 within the grace plus one second
    and logs what it cut."""
    release = asyncio.Event()
    longs = 2 * workers  # spread over the workers' listeners by the kernel
    upstream = await faults(sse(1, before_end=release), *[sse(1, end="hang")] * longs, hang())
    config: dict[str, Any] = route_config({"a": upstream.url}, "a")
    config["server"] = {"shutdown_grace_seconds": grace}
    config["log"] = {"access": False}
    config["metrics"] = {"enabled": False}
    path = write_config(tmp_path / "routes.yaml", config)
    extra = ("--workers", str(workers)) if workers > 1 else ()
    url_path = "/v1/chat/completions"
    fresh = aiohttp.TCPConnector(force_close=True, limit=0)  # a connection per request
    async with (
        running_proxy(path, *extra) as proxy,
        aiohttp.ClientSession(connector=fresh) as session,
    ):
        await proxy.wait_line("oaimux serving", count=workers)
        url = proxy.url + url_path
        streams = []
        for _ in range(1 + longs):
            stream = await session.post(url, data=chat_body(stream=True), headers=JSON)
            assert await stream.content.readuntil(b"\n\n") == sse_event(0)
            streams.append(stream)
        short, long_streams = streams[0], streams[1:]
        plain = asyncio.ensure_future(session.post(url, data=chat_body(), headers=JSON))
        await upstream.wait_requests(2 + longs)  # all in flight

        since = time.perf_counter()
        proxy.signal(signal.SIGTERM)
        await proxy.wait_line(r"stopping \(pid \d+\)", count=workers)
        assert await refused(f"{proxy.url}/healthz")
        asyncio.get_running_loop().call_later(grace / 2, release.set)
        assert (await short.read()).endswith(b"data: [DONE]\n\n")
        cuts = await asyncio.gather(*(_cut_after(s, since) for s in long_streams))
        with pytest.raises(aiohttp.ServerDisconnectedError):  # no answer at all, not a 5xx
            await plain
        assert await proxy.wait_exit(timeout=grace + 10) == 0
        took = time.perf_counter() - since

    assert min(cuts) >= grace - 0.02, cuts  # nothing cut before the grace
    assert took <= grace + 1.0, f"exit {took:.2f}s after SIGTERM, grace {grace}s"
    # Each cut upstream request was closed too.
    for conn in upstream.connections[1:]:
        assert conn.peer_closed.is_set()
    cut = proxy.matching(
        r"stopped \(pid \d+\) after [\d.]+s: \d+ connections finished, (\d+) requests cut"
    )
    assert len(cut) == workers
    assert sum(int(m.group(1)) for m in cut) == longs + 1
    assert not proxy.matching("overran its deadline")  # kept without the last resort


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
