"""What proxy/client/connection.py saves per chunk and per connection: the pipe's
one-call read of a parsed body piece (take_parsed) on aiohttp's real StreamReader,
and no second TCP_NODELAY call, on real sockets."""

from __future__ import annotations

import asyncio
import socket

from aiohttp.streams import EMPTY_PAYLOAD, StreamReader

from proxy.client.connection import Connection, take_parsed


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
