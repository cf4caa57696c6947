"""The upstream client under test (proxy/client/): a pool, and one request
through it as the client tests send it, to a fault server (tests/faults/server.py).

Bind the fixture in a test module with ``pool = upstream_pool.pool`` (as
``faults``; see tests/faults/fixtures.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.client import Destination, Origin, UpstreamPool, UpstreamResponse
from tests.faults.server import FaultServer

__all__ = ["origin_of", "pool", "read_all", "send"]


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool(keepalive=4.0)
    yield pool
    pool.close()


def origin_of(server: FaultServer) -> Origin:
    """A new Origin each time, as each reload's upstream plans have their own."""
    return Origin.of(URL(server.url))


async def send(
    pool: UpstreamPool,
    to: FaultServer | Origin,
    method: str = "POST",
    body: bytes | AsyncIterable[bytes] = b'{"model":"m"}',
    *,
    target: str = "/v1/chat/completions",
    headers: CIMultiDict[str] | None = None,
    body_length: int | None = None,
    timeouts: tuple[float, float] = (5.0, 5.0),
) -> UpstreamResponse:
    """One request through ``pool`` to a server (a new Origin for it) or an
    origin; ``timeouts``: the connect and the response timeout."""
    origin = to if isinstance(to, Origin) else origin_of(to)
    return await pool.request(
        Destination(origin, *timeouts),
        method,
        target,
        headers=headers or CIMultiDict(),
        body=body,
        body_length=body_length,
    )


async def read_all(resp: UpstreamResponse) -> bytes:
    body = await resp.content.read()
    resp.release()
    return body
