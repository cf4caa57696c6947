"""The body pipe (proxy/outbound/pipe.py) on the wire: framing per client, keep-alive
after a piped body, and back-pressure from a client that stops reading."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.faults import fixtures
from tests.faults.fixtures import FaultFactory, chat_body, route_config
from tests.faults.server import Behaviour, Connection, RawRequest, sse, sse_event

faults = fixtures.faults

SSE_BODY = b"".join(sse_event(i) for i in range(3)) + b"data: [DONE]\n\n"


async def raw_exchange(port: int, request: bytes) -> tuple[asyncio.StreamReader, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    return reader, writer


def chat_request(version: str = "1.1", stream: bool = True) -> bytes:
    body = chat_body(stream=stream)
    return (
        f"POST /v1/chat/completions HTTP/{version}\r\nHost: proxy\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    """Decode a chunked body strictly: every size line, every CRLF, the last chunk."""
    body = b""
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line[:-2], 16)
        if size == 0:
            assert await reader.readexactly(2) == b"\r\n"  # no trailers
            return body
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"


async def test_http11_client_gets_a_well_framed_stream_and_keeps_its_connection(
    make_proxy_server: Any, faults: FaultFactory
) -> None:
    upstream = await faults(sse(3, gap=0.01), sse(3, gap=0.0))
    server = await make_proxy_server(route_config({"a": upstream.url}, "a"))
    reader, writer = await raw_exchange(server.port, chat_request())
    try:
        async with asyncio.timeout(10):
            for request in range(2):  # two requests on one client connection
                if request:
                    writer.write(chat_request())
                    await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200")
                assert b"transfer-encoding: chunked" in head.lower()
                assert await read_chunked(reader) == SSE_BODY
    finally:
        writer.close()
    assert len(upstream.requests) == 2


async def test_http10_client_gets_the_stream_unframed_until_close(
    make_proxy_server: Any, faults: FaultFactory
) -> None:
    upstream = await faults(sse(3, gap=0.01))
    server = await make_proxy_server(route_config({"a": upstream.url}, "a"))
    reader, writer = await raw_exchange(server.port, chat_request("1.0"))
    try:
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.0 200")
            assert b"transfer-encoding" not in head.lower()
            assert await reader.read() == SSE_BODY  # then the proxy closes
    finally:
        writer.close()


async def test_a_client_that_stops_reading_holds_the_upstream_back(
    make_proxy_server: Any, faults: FaultFactory
) -> None:
    """Without back-pressure the proxy would read all 256 MiB from the upstream
    into memory at loopback speed while the client reads nothing."""
    total = 256 * 1024 * 1024
    piece = b"x" * (1024 * 1024)
    sent_all = asyncio.Event()
    progress = {"sent": 0}

    async def firehose(conn: Connection, request: RawRequest) -> bool:
        conn.writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % total
        )
        while progress["sent"] < total:
            conn.writer.write(piece)
            await conn.writer.drain()
            progress["sent"] += len(piece)
        sent_all.set()
        return True

    upstream = await faults(firehose)
    server = await make_proxy_server(route_config({"a": upstream.url}, "a"))
    reader, writer = await raw_exchange(server.port, chat_request(stream=False))
    try:
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
        # The client now reads nothing. A negative check has no event to await:
        # give the upstream a second, far longer than 256 MiB takes on loopback.
        done, _ = await asyncio.wait({asyncio.ensure_future(sent_all.wait())}, timeout=1.0)
        assert not done, "the proxy read the whole body though the client took none"
        assert progress["sent"] < 64 * 1024 * 1024
        # Reading resumes the flow, to the last byte.
        received = 0
        async with asyncio.timeout(30):
            while received < total:
                chunk = await reader.read(4 * 1024 * 1024)
                assert chunk
                received += len(chunk)
        assert received == total
        await asyncio.wait_for(sent_all.wait(), 10)
    finally:
        writer.close()


def head_then_rest(first: bytes, go: asyncio.Event) -> Behaviour:
    """A chunked SSE answer: its head, with ``first`` as a chunk in the same
    write when not empty; then, once ``go`` is set, one more event and the end."""

    async def run(conn: Connection, request: RawRequest) -> bool:
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        await conn.send(head + (b"%x\r\n%s\r\n" % (len(first), first) if first else b""))
        await go.wait()
        rest = sse_event(1) + b"data: [DONE]\n\n"
        await conn.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
        return True

    return run


async def test_the_head_goes_out_at_once_when_no_chunk_came_with_it(
    make_proxy_server: Any, faults: FaultFactory
) -> None:
    go = asyncio.Event()
    upstream = await faults(head_then_rest(b"", go))
    server = await make_proxy_server(route_config({"a": upstream.url}, "a"))
    reader, writer = await raw_exchange(server.port, chat_request())
    try:
        async with asyncio.timeout(10):
            # The upstream sends nothing more until the client has the head.
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            go.set()
            assert await read_chunked(reader) == sse_event(1) + b"data: [DONE]\n\n"
    finally:
        writer.close()


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_a_chunk_that_came_with_the_head_goes_out_with_it_whole(
    make_proxy_server: Any, faults: FaultFactory, version: str
) -> None:
    go = asyncio.Event()
    upstream = await faults(head_then_rest(sse_event(0), go))
    server = await make_proxy_server(route_config({"a": upstream.url}, "a"))
    reader, writer = await raw_exchange(server.port, chat_request(version))
    try:
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(f"HTTP/{version} 200".encode())
            first = sse_event(0)
            if version == "1.1":
                # Framed as its own chunk, before the upstream sends anything more.
                assert await reader.readexactly(len(first) + 6) == (
                    b"%x\r\n%s\r\n" % (len(first), first)
                )
                go.set()
                assert await read_chunked(reader) == sse_event(1) + b"data: [DONE]\n\n"
            else:
                assert await reader.readexactly(len(first)) == first
                go.set()
                assert await reader.read() == sse_event(1) + b"data: [DONE]\n\n"
    finally:
        writer.close()


def no_content() -> Behaviour:
    """A 204 answer: a head and no body at all (RFC 9110 §15.3.5)."""

    async def run(conn: Connection, request: RawRequest) -> bool:
        await conn.send(b"HTTP/1.1 204 No Content\r\nx-upstream: yes\r\n\r\n")
        return True

    return run


async def test_an_answer_without_a_body_is_relayed_and_the_connection_kept(
    make_proxy_server: Any, faults: FaultFactory
) -> None:
    upstream = await faults(no_content(), no_content())
    server = await make_proxy_server(route_config({"a": upstream.url}, "a"))
    reader, writer = await raw_exchange(server.port, chat_request(stream=False))
    try:
        async with asyncio.timeout(10):
            for request in range(2):  # the client's connection stays usable
                if request:
                    writer.write(chat_request(stream=False))
                    await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 204")
                assert b"x-upstream: yes" in head.lower()
                assert b"transfer-encoding" not in head.lower()
    finally:
        writer.close()
    assert len(upstream.requests) == 2
