"""The lean upstream client (proxy/client/) against a scripted raw server.

Each test speaks to a real socket server (tests/faults/server.py) that records
the bytes it received and its connections, so framing, pooling and failure
kinds are checked on the wire, not on mocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.client import Origin, UpstreamFailure, UpstreamPool
from tests.faults import fixtures, upstream_pool
from tests.faults.fixtures import FaultFactory
from tests.faults.server import (
    Connection,
    RawRequest,
    blackhole,
    closed_port,
    garbage,
    hang,
    respond,
    sse,
)
from tests.faults.upstream_pool import origin_of, read_all, send

faults = fixtures.faults
pool = upstream_pool.pool


def test_origin_names_the_host_as_rfc_9112_asks() -> None:
    assert Origin.of(URL("http://127.0.0.1:8000/v1")).host_header == "127.0.0.1:8000"
    assert Origin.of(URL("https://api.example.com/v1")).host_header == "api.example.com"
    assert Origin.of(URL("http://api.example.com:443/v1")).host_header == "api.example.com:443"
    v6 = Origin.of(URL("http://[::1]:8080/v1"))
    assert (v6.host, v6.host_header, v6.literal) == ("::1", "[::1]:8080", True)
    named = Origin.of(URL("https://api.example.com/v1"))
    assert (named.port, named.tls, named.literal) == (443, True, False)


async def test_the_request_goes_out_with_our_framing_only(
    faults: FaultFactory, pool: UpstreamPool
) -> None:
    server = await faults()
    headers = CIMultiDict([("Authorization", "Bearer k"), ("X-Twice", "1"), ("X-Twice", "2")])
    resp = await send(pool, server, headers=headers, target="/v1/chat/completions?a=b%20c")
    assert resp.status == 200
    await read_all(resp)
    request = server.requests[0]
    lines = request.head.decode().split("\r\n")
    assert lines[0] == "POST /v1/chat/completions?a=b%20c HTTP/1.1"
    assert lines[1] == f"Host: 127.0.0.1:{server.port}"
    assert lines[2:-2] == [
        "Authorization: Bearer k",
        "X-Twice: 1",
        "X-Twice: 2",
        "Content-Length: 13",
    ]
    assert request.body == b'{"model":"m"}'


async def test_an_empty_post_says_content_length_0_and_a_get_says_nothing(
    faults: FaultFactory, pool: UpstreamPool
) -> None:
    server = await faults()
    await read_all(await send(pool, server, body=b""))
    await read_all(await send(pool, server, method="GET", body=b"", target="/v1/files"))
    assert "content-length" in server.requests[0].headers
    assert server.requests[0].headers["content-length"] == "0"
    assert "content-length" not in server.requests[1].headers
    assert "transfer-encoding" not in server.requests[1].headers


async def test_a_header_with_a_line_break_never_reaches_the_wire(
    faults: FaultFactory, pool: UpstreamPool
) -> None:
    server = await faults()
    for bad in ("a\r\nX-Injected: 1", "a\nb", "a\rb"):
        with pytest.raises(ValueError, match="line break"):
            await send(pool, server, headers=CIMultiDict({"X-Bad": bad}))
    await server.wait_open(0)
    assert server.requests == []


async def test_keep_alive_reuses_one_connection(faults: FaultFactory, pool: UpstreamPool) -> None:
    server = await faults()
    for _ in range(3):
        assert await read_all(await send(pool, server))
    assert len(server.connections) == 1
    assert server.connections[0].requests == 3


def test_origins_are_identified_by_scheme_host_and_port() -> None:
    a = Origin.of(URL("https://api.example.com/v1"))
    assert a.key == (True, "api.example.com", 443)
    assert a.key == Origin.of(URL("https://api.example.com:443/other")).key
    assert a.key != Origin.of(URL("http://api.example.com:443/v1")).key  # TLS or not
    assert a.key != Origin.of(URL("https://api.example.com:8443/v1")).key
    assert a.key != Origin.of(URL("https://other.example.com/v1")).key


async def test_equal_origins_share_idle_connections(
    faults: FaultFactory, pool: UpstreamPool
) -> None:
    # Every reload builds new Origin objects for the same upstreams.
    server = await faults()
    for _ in range(3):
        await read_all(await send(pool, Origin.of(URL(server.url))))
    assert len(server.connections) == 1


async def test_serve_keeps_the_origins_that_stay_and_closes_the_others(
    faults: FaultFactory, pool: UpstreamPool
) -> None:
    stays, goes = await faults(), await faults()
    await read_all(await send(pool, stays))
    await read_all(await send(pool, goes))
    pool.serve([origin_of(stays)])
    # The idle connection to the origin that went is closed at once...
    await asyncio.wait_for(goes.connections[0].peer_closed.wait(), 5)
    # ...and the one that stayed is still warm.
    await read_all(await send(pool, stays))
    assert len(stays.connections) == 1 and not stays.connections[0].peer_closed.is_set()


async def test_a_connection_released_after_its_origin_went_is_closed(
    faults: FaultFactory, pool: UpstreamPool
) -> None:
    stays, goes = await faults(), await faults()
    pool.serve([origin_of(stays), origin_of(goes)])
    resp = await send(pool, goes)  # in flight across a reload that removes it
    pool.serve([origin_of(stays)])
    await read_all(resp)
    await asyncio.wait_for(goes.connections[0].peer_closed.wait(), 5)
    # A pool that serves named origins remembers nothing of any other.
    assert pool._idle.keys() == {origin_of(stays).key}


async def test_a_closed_response_is_never_pooled(faults: FaultFactory, pool: UpstreamPool) -> None:
    server = await faults(sse(events=3, gap=0.0))
    resp = await send(pool, server)
    assert resp.status == 200
    resp.close()  # mid-body: the upstream must see the connection go
    await asyncio.wait_for(server.connections[0].peer_closed.wait(), 5)
    await read_all(await send(pool, server))
    assert len(server.connections) == 2


async def test_an_idle_connection_past_the_keep_alive_is_not_reused(
    faults: FaultFactory, pool: UpstreamPool
) -> None:
    server = await faults()
    resp = await send(pool, server)
    conn = resp._conn
    await read_all(resp)
    assert conn is not None
    conn.idle_since -= 5.0  # as if released 5 s ago (keepalive is 4 s)
    await read_all(await send(pool, server))
    assert len(server.connections) == 2
    await asyncio.wait_for(server.connections[0].peer_closed.wait(), 5)


async def test_the_sweep_closes_connections_idle_past_the_keep_alive(
    faults: FaultFactory, pool: UpstreamPool
) -> None:
    server = await faults()
    first, second = await send(pool, server), await send(pool, server)
    stale = first._conn
    await read_all(first)
    await read_all(second)
    assert stale is not None and len(server.connections) == 2
    stale.idle_since -= 5.0
    pool._sweep()
    await asyncio.wait_for(server.connections[0].peer_closed.wait(), 5)  # first's
    assert server.open == 1  # the fresh one stays pooled
    await read_all(await send(pool, server))
    assert len(server.connections) == 2


async def test_interim_1xx_answers_are_skipped(faults: FaultFactory, pool: UpstreamPool) -> None:
    async def continue_then_ok(conn: Connection, request: RawRequest) -> bool:
        await conn.send(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
        )
        return True

    server = await faults(continue_then_ok)
    resp = await send(pool, server)
    assert resp.status == 201
    assert await read_all(resp) == b"ok"


async def test_head_answers_carry_no_body(faults: FaultFactory, pool: UpstreamPool) -> None:
    async def head_answer(conn: Connection, request: RawRequest) -> bool:
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        return True

    server = await faults(head_answer)
    resp = await send(pool, server, method="HEAD", body=b"", target="/v1/files")
    assert resp.content_length == 1000
    assert await read_all(resp) == b""
    await read_all(await send(pool, server))  # the connection is still in step
    assert len(server.connections) == 1


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_a_streamed_body_of_unknown_length_goes_chunked(
    faults: FaultFactory, pool: UpstreamPool
) -> None:
    server = await faults()
    resp = await send(pool, server, "POST", chunks(b"ab", b"", b"cde"), target="/v1/files")
    await read_all(resp)
    assert server.requests[0].headers["transfer-encoding"] == "chunked"
    assert server.requests[0].body == b"abcde"


async def test_a_streamed_body_of_known_length_says_it(
    faults: FaultFactory, pool: UpstreamPool
) -> None:
    server = await faults()
    resp = await send(
        pool, server, "POST", chunks(b"ab", b"cde"), target="/v1/files", body_length=5
    )
    await read_all(resp)
    assert server.requests[0].headers["content-length"] == "5"
    assert "transfer-encoding" not in server.requests[0].headers
    assert server.requests[0].body == b"abcde"


async def test_a_body_that_breaks_off_aborts_the_upstream_request(
    faults: FaultFactory, pool: UpstreamPool
) -> None:
    server = await faults(hang())

    async def broken() -> AsyncIterator[bytes]:
        yield b"ab"
        raise RuntimeError("the client went away")

    with pytest.raises(UpstreamFailure) as failed:
        await send(pool, server, "POST", broken(), target="/v1/files", body_length=10)
    assert failed.value.kind in {"disconnected", "reset"}
    await asyncio.wait_for(server.connections[0].peer_closed.wait(), 5)


@pytest.mark.parametrize(
    ("behaviour", "kind"),
    [
        (garbage(), "bad_response"),
        (garbage(b""), "disconnected"),
    ],
    ids=["garbage", "closed-silently"],
)
async def test_failures_before_a_response_are_named(
    faults: FaultFactory, pool: UpstreamPool, behaviour: object, kind: str
) -> None:
    server = await faults(behaviour)  # type: ignore[arg-type]
    with pytest.raises(UpstreamFailure) as failed:
        await send(pool, server)
    assert failed.value.kind == kind
    assert "Bearer" not in str(failed.value)


async def test_a_refused_connection_is_a_connect_failure(pool: UpstreamPool) -> None:
    origin = Origin.of(URL(f"http://127.0.0.1:{closed_port()}/v1"))
    with pytest.raises(UpstreamFailure) as failed:
        await send(pool, origin, "GET", b"", target="/v1/models")
    assert failed.value.kind == "connect"


async def test_a_host_name_is_resolved_once_and_reused(
    faults: FaultFactory, pool: UpstreamPool
) -> None:
    server = await faults()
    origin = Origin.of(URL(f"http://localhost:{server.port}/v1"))
    assert not origin.literal
    try:
        for _ in range(2):
            resp = await send(pool, origin, "GET", b"", target="/v1/models")
            await resp.content.read()
            resp.close()  # never pooled: the second request must connect again
    except UpstreamFailure:
        pytest.skip("localhost does not resolve to 127.0.0.1 here")
    assert len(server.connections) == 2
    assert server.requests[0].headers["host"] == f"localhost:{server.port}"
    assert list(pool._dns) == [("localhost", server.port)]


async def test_cancelling_while_waiting_for_the_head_closes_the_connection(
    faults: FaultFactory, pool: UpstreamPool
) -> None:
    server = await faults(hang())
    task = asyncio.create_task(send(pool, server))
    await server.wait_requests(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(server.connections[0].peer_closed.wait(), 5)


async def test_a_whole_body_leaves_no_idle_timer_on_a_pooled_connection(
    faults: FaultFactory, pool: UpstreamPool
) -> None:
    server = await faults(respond(200, b"x"), hang())
    resp = await send(pool, server)
    resp.arm_idle_timeout(0.01)  # the body is already whole: nothing to time
    assert await read_all(resp) == b"x"
    # The next request on the pooled connection waits for an answer that never
    # comes; a stray 10 ms idle timer from the first would fail it at once.
    second = asyncio.create_task(send(pool, server))
    await server.wait_requests(2)
    done, _ = await asyncio.wait({second}, timeout=0.2)
    assert not done, "the pooled connection carried a stale idle timer"
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second


async def test_no_head_within_the_response_timeout_is_a_timeout(
    faults: FaultFactory, pool: UpstreamPool
) -> None:
    server = await faults(hang())
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await send(pool, server, body=b"{}", timeouts=(5, 0.2))
    waited = loop.time() - started
    assert waited >= 0.2  # never before the deadline (at most an eighth after it)
    await asyncio.wait_for(server.connections[0].peer_closed.wait(), 5)
    await read_all(await send(pool, server))  # the sweep leaves later requests alone


async def test_the_shorter_of_connect_and_response_timeout_decides_the_error(
    pool: UpstreamPool,
) -> None:
    with blackhole() as port:
        origin = Origin.of(URL(f"http://127.0.0.1:{port}/v1"))
        with pytest.raises(UpstreamFailure) as failed:
            await send(pool, origin, "GET", b"", target="/v1/models", timeouts=(0.1, 5))
        assert failed.value.kind == "connect_timeout"
        with pytest.raises(TimeoutError):
            await send(pool, origin, "GET", b"", target="/v1/models", timeouts=(5, 0.1))
