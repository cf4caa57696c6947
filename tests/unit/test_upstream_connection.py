"""What proxy/client/connection.py saves per chunk and per connection: the pipe's
one-call read of a parsed body piece (take_parsed) on aiohttp's real StreamReader,
and no second TCP_NODELAY call, on real sockets."""

from __future__ import annotations

import asyncio
import socket
from collections import deque

from aiohttp.streams import EMPTY_PAYLOAD, StreamReader

from proxy.client.connection import Connection, lighten_body, take_parsed


async def test_take_parsed_reads_as_read_nowait_does_and_keeps_the_readers_books() -> None:
    """The pipe's one-call read: a piece taken leaves the reader as read_nowait
    would (nothing buffered, the position moved, past chunk ends dropped), so a
    later read, a pause at the high-water mark and the end all still work."""
    loop = asyncio.get_running_loop()
    conn = Connection(loop)
    body = StreamReader(conn, 2**16, loop=loop)
    for piece in (b"data: 1\n\n", b"data: 22\n\n"):
        body.begin_http_chunk_receiving()
        body.feed_data(piece)
        body.end_http_chunk_receiving()
        assert take_parsed(body) == (piece, False)
        assert not body._buffer and body._size == 0
    assert body._cursor == body.total_bytes == 19
    assert list(body._http_chunk_splits or ()) == [19]  # only the one not behind the position
    # Two pieces waiting take the general read, joined, as read_nowait returns them.
    body.feed_data(b"a")
    body.feed_data(b"b")
    assert take_parsed(body) == (b"ab", False)
    # A whole high-water mark fed and taken piece by piece never pauses reading.
    for _ in range(3):
        body.feed_data(b"x" * 2**16)
        assert take_parsed(body) == (b"x" * 2**16, False)
    assert not conn.reading_paused
    body.feed_eof()
    assert take_parsed(body) == (b"", True)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


async def test_a_lightened_body_keeps_no_deque_and_is_read_whole_and_in_order() -> None:
    """lighten_body trades the body's two deques (~760 bytes each) for a list and a
    record of chunk ends that keeps nothing; every byte still comes out once, in
    order, from aiohttp's parser on a real socket: pieces taken as they come, and
    more than the high-water mark in small chunks from one read, which pauses
    reading until the read takes them (from a deque again) and resumes it."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    _, conn = await loop.create_connection(lambda: Connection(loop), sock=ours)
    conn.set_response_params(read_until_eof=True, read_bufsize=2**16)
    arrived = asyncio.Event()
    conn.on_body = arrived.set
    got = bytearray()

    async def take_until(size: int) -> bool:
        """Take what is parsed until ``size`` bytes are in; whether reading was
        paused on the way."""
        paused = False
        async with asyncio.timeout(10):
            while len(got) < size:
                paused |= conn.reading_paused
                data, ended = take_parsed(body)
                got.extend(data)
                if not data and not ended:
                    arrived.clear()
                    await arrived.wait()
        return paused

    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    await loop.sock_sendall(theirs, head + chunk(b"data: 0\n\n"))
    _, body = await conn.read()
    lighten_body(body)
    other = StreamReader(conn, 2**16, loop=loop)
    lighten_body(other)
    assert not isinstance(body._buffer, deque)
    assert body._http_chunk_splits is other._http_chunk_splits  # shared: it keeps nothing
    await loop.sock_sendall(theirs, chunk(b"data: 1\n\n") + chunk(b"data: 2\n\n"))
    assert not await take_until(27)
    assert not isinstance(body._buffer, deque) and not body._http_chunk_splits
    # 132 KB in 60-byte chunks (above the high-water mark, twice the read limit),
    # all sent while reading is held, within the socket's buffer: one read parses them.
    pieces = [b"%060d" % i for i in range(2_200)]
    conn.hold()
    async with asyncio.timeout(10):
        await loop.sock_sendall(theirs, b"".join(map(chunk, pieces)) + b"0\r\n\r\n")
    conn.unhold()
    assert await take_until(27 + 132_000)
    assert isinstance(body._buffer, deque)  # what aiohttp's read takes from the left
    assert bytes(got) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n" + b"".join(pieces)
    assert take_parsed(body) == (b"", True)
    assert not conn.reading_paused
    conn.transport.close()
    theirs.close()


async def test_take_parsed_takes_nothing_from_a_failed_body() -> None:
    loop = asyncio.get_running_loop()
    body = StreamReader(Connection(loop), 2**16, loop=loop)
    body.feed_data(b"cut")
    body.set_exception(ConnectionResetError())
    assert take_parsed(body) == (b"", True)


async def test_an_upstream_connection_has_nagle_off_without_aiohttps_extra_call() -> None:
    """Connection.connection_made leaves TCP_NODELAY to the event loop's TCP
    transport (asyncio's and uvloop's set it when they make one): a small
    request head must not wait for an acknowledgement (RFC 9293 §3.7.4)."""
    loop = asyncio.get_running_loop()
    # A bare listening socket: the kernel completes the handshake on its own.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        transport, conn = await loop.create_connection(lambda: Connection(loop), "127.0.0.1", port)
        try:
            sock = transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert conn.transport is transport
        finally:
            transport.abort()


def test_take_parsed_reads_an_empty_body_as_ended() -> None:
    # What aiohttp's parser gives a 204, a 304 or a HEAD answer: no buffer at all.
    assert take_parsed(EMPTY_PAYLOAD) == (b"", True)
