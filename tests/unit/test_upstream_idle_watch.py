"""The pool-wide idle watch of upstream response bodies (proxy/client/).

One timer serves every body being read, each with its own limit: a silent
body is cut at its own limit, never at another's, and never before it.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.client_exceptions import SocketTimeoutError
from yarl import URL

from proxy.client import Origin, UpstreamPool, UpstreamResponse
from tests.faults import fixtures, upstream_pool
from tests.faults.fixtures import FaultFactory
from tests.faults.server import sse, sse_event
from tests.faults.upstream_pool import send

faults = fixtures.faults
pool = upstream_pool.pool

_EVENTS = sse_event(0) + sse_event(1)


async def open_stream(pool: UpstreamPool, origin: Origin) -> UpstreamResponse:
    """A stream whose upstream sends two events, then nothing."""
    resp = await send(pool, origin, body=b"{}")
    assert await resp.content.readexactly(len(_EVENTS)) == _EVENTS
    return resp


async def test_one_watch_cuts_each_silent_body_at_its_own_limit(
    faults: FaultFactory, pool: UpstreamPool
) -> None:
    server = await faults(sse(2, end="hang"), sse(2, end="hang"))
    origin = Origin.of(URL(server.url))
    short = await open_stream(pool, origin)
    long = await open_stream(pool, origin)
    assert len(server.connections) == 2  # one body per connection
    loop = asyncio.get_running_loop()

    armed_at = loop.time()
    long.arm_idle_timeout(0.6)
    short.arm_idle_timeout(0.2)
    async with asyncio.timeout(5):
        with pytest.raises(SocketTimeoutError):
            await short.content.readany()
    short_cut_at = loop.time()
    # The short limit sets the tick for both; the long body, as silent, is
    # still within its own limit and must be untouched.
    assert long.content.exception() is None
    async with asyncio.timeout(5):
        with pytest.raises(SocketTimeoutError):
            await long.content.readany()
    long_cut_at = loop.time()

    # Never early: each silence started at the latest when it was armed.
    assert short_cut_at - armed_at >= 0.2
    assert long_cut_at - armed_at >= 0.6
    short.close()
    long.close()
    async with asyncio.timeout(5):
        await server.connections[0].peer_closed.wait()
        await server.connections[1].peer_closed.wait()


async def test_a_closed_response_leaves_the_watch_at_once(
    faults: FaultFactory, pool: UpstreamPool
) -> None:
    server = await faults(sse(2, end="hang"))
    resp = await open_stream(pool, Origin.of(URL(server.url)))
    resp.arm_idle_timeout(0.2)
    assert pool._idle_watch._watched
    resp.close()
    # Checked before the loop runs again: no tick can have dropped it instead.
    assert not pool._idle_watch._watched
    async with asyncio.timeout(5):
        await server.connections[0].peer_closed.wait()
