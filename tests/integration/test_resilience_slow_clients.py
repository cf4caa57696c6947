"""Clients too slow to be served forever, on real sockets: a reader that takes
nothing (``server.send_timeout``) and a body that trickles in for longer than
``server.body_timeout`` while never going silent for ``server.body_idle_timeout``.

The proxy runs as ``oaimux serve`` runs it (``ProxyRunner``), in front of a
scripted upstream that notes when the proxy closes its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.config import Settings, parse_settings
from proxy.server.app import create_app, server_options
from proxy.server.drain import ProxyRunner
from proxy.server.keys import OBSERVER
from tests.fakes.security import RunningProxy, running_proxy
from tests.faults import fixtures, process
from tests.faults.fixtures import AccessLog, FaultFactory, chat_body, route_config
from tests.faults.server import Connection, RawRequest, chat_json, respond

faults = fixtures.faults
access_log = fixtures.access_log

MIB = 1024 * 1024


def firehose(total: int, sent: list[int]) -> Any:
    """A ``Content-Length: total`` answer written as fast as the proxy reads it;
    ``sent[0]`` counts the bytes the proxy took."""
    piece = b"x" * (256 * 1024)

    async def run(conn: Connection, request: RawRequest) -> bool:
        conn.writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % total
        )
        while sent[0] < total:  # bounded by total
            conn.writer.write(piece[: total - sent[0]])
            await conn.writer.drain()
            sent[0] += min(len(piece), total - sent[0])
        return True

    return run


def fixtures_respond_ok() -> Any:
    return respond(200, chat_json())


def chat_request(request_id: str) -> bytes:
    body = chat_body(stream=False)
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nX-Request-Id: {request_id}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def open_small_window(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection with a small receive buffer, so that not reading
    fills the path to the proxy quickly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


def proxy_settings(upstream_url: str, **server: Any) -> Settings:
    return parse_settings({**route_config({"a": upstream_url}, "a"), "server": server}, environ={})


@contextlib.asynccontextmanager
async def proxy_with_send_buffer(settings: Settings, size: int) -> AsyncIterator[RunningProxy]:
    """The proxy (as ``running_proxy`` serves it) on a listening socket whose
    accepted connections inherit a fixed kernel send buffer of ``size`` bytes
    (Linux doubles it), instead of one the kernel grows to megabytes: a test
    then needs seconds, not tens of seconds, to make the proxy wait on a reader."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    sock.bind(("127.0.0.1", 0))
    app = create_app(settings)
    runner = ProxyRunner(app, settings.server, handler_cancellation=True, **server_options())
    await runner.setup()
    await web.SockSite(runner, sock).start()
    try:
        yield RunningProxy(runner, app, int(sock.getsockname()[1]))
    finally:
        await runner.cleanup()


async def read_to_end(reader: asyncio.StreamReader, timeout: float) -> int:
    """Bytes read until EOF or a reset (bounded by ``timeout``)."""
    got = 0
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(MIB):
                got += len(chunk)
    return got


async def test_a_client_that_stops_reading_is_cut_and_its_upstream_request_closed(
    faults: FaultFactory, access_log: AccessLog
) -> None:
    send_timeout = 0.5
    total = 256 * MIB
    sent = [0]
    upstream = await faults(firehose(total, sent))
    settings = proxy_settings(upstream.url, send_timeout=send_timeout)
    async with running_proxy(settings) as proxy:
        reader, writer = await open_small_window(proxy.port)
        try:
            writer.write(chat_request("stall-1"))
            await writer.drain()
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            head_at = time.perf_counter()
            # From here the client reads nothing. The proxy must give up on it
            # and close the upstream request (without the bound: never).
            conn = upstream.connections[0]
            async with asyncio.timeout(send_timeout * 1.25 + 5):
                await conn.peer_closed.wait()
            assert conn.closed_at is not None
            # Never early: the stall began after the head, once the buffers filled.
            assert conn.closed_at - head_at >= send_timeout
            await upstream.wait_open(0)
            # The client's connection was aborted: what it reads now ends short.
            assert await read_to_end(reader, 10) < total
        finally:
            writer.close()
        record = await access_log.wait_for("stall-1")
        assert record["outcome"] == "client_stalled"
        assert record["status"] == 200
        assert 0 < record["bytes_out"] < total
        assert sent[0] < total
        metrics = proxy.app[OBSERVER].metrics
        assert metrics is not None
        stalls = metrics.registry.get_sample_value("oaimux_client_stalls_total", {"upstream": "a"})
        assert stalls == 1


async def test_oaimux_serve_lets_go_of_many_readers_that_stopped(
    faults: FaultFactory, tmp_path: Path
) -> None:
    """``oaimux serve`` as deployed (its own process, uvloop): ten clients stop
    reading a large answer; each upstream connection is closed within the
    bound, while a client that reads is served throughout."""
    send_timeout = 1.0
    clients = 10
    total = 64 * MIB
    counters = [[0] for _ in range(clients)]
    upstream = await faults(*(firehose(total, sent) for sent in counters))
    config = {**route_config({"a": upstream.url}, "a"), "server": {"send_timeout": send_timeout}}
    path = process.write_config(tmp_path / "routes.yaml", config)
    async with process.running_proxy(path) as proxy:
        stalled = [await open_small_window(proxy.port) for _ in range(clients)]
        heads_at: list[float] = []
        try:
            for i, (reader, writer) in enumerate(stalled):
                writer.write(chat_request(f"stop-{i}"))
                await writer.drain()
                async with asyncio.timeout(10):
                    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
                heads_at.append(time.perf_counter())
                # None of them reads after its head. A reader is served meanwhile.
            upstream.default = fixtures_respond_ok()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(chat_request("reader"))
            async with asyncio.timeout(10):
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            writer.close()
            async with asyncio.timeout(send_timeout * 1.25 + 10):
                for conn in upstream.connections[:clients]:
                    await conn.peer_closed.wait()
            # Never early: each stall began after its head, once the buffers filled.
            # (Connection i served request i: each got its own new connection.)
            for conn, head_at in zip(upstream.connections[:clients], heads_at, strict=True):
                assert conn.closed_at is not None and conn.closed_at - head_at >= send_timeout
            lines = await proxy.wait_line('"outcome":"client_stalled"', count=clients)
        finally:
            for _, writer in stalled:
                writer.close()
    assert len(lines) == clients
    assert all(sent[0] < total for sent in counters)


async def test_a_whole_answer_written_at_once_is_bounded_too(
    faults: FaultFactory, access_log: AccessLog
) -> None:
    """A non-streamed answer that came whole is written in one go and its end
    awaited (aiohttp's ``write_eof``): that wait is bounded like the pipe's."""
    send_timeout = 0.5
    answer = b'{"pad": "' + b"x" * (100 * 1024) + b'"}'
    upstream = await faults(respond(200, answer))
    settings = proxy_settings(upstream.url, send_timeout=send_timeout)
    # Small buffers on both ends: most of the answer waits in the proxy.
    async with proxy_with_send_buffer(settings, 4096) as proxy:
        # A bare socket that never reads (an asyncio reader would buffer 128 KiB).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, ("127.0.0.1", proxy.port))
            await loop.sock_sendall(sock, chat_request("whole-1"))
            record = await access_log.wait_for("whole-1", timeout=send_timeout * 1.25 + 5)
        finally:
            sock.close()
    assert record["outcome"] == "client_stalled"
    assert record["duration_ms"] >= send_timeout * 1000


async def test_a_slow_reader_that_keeps_reading_is_never_cut(
    faults: FaultFactory, access_log: AccessLog
) -> None:
    """The bound is on time without progress, not on the whole response. This
    reader takes 32 KiB every 0.1 s while the proxy still has bytes to send
    (then the rest at once), for more than three times send_timeout in all.

    The proxy's writes wait on it the whole time, each wait for about as long
    as the reader needs for a third of the kernel's send buffer (~1 s here,
    twice send_timeout): a bound that looked only at the proxy's own buffer
    would see no progress for that long and cut this reader."""
    send_timeout = 0.5
    total = 2 * MIB
    sent = [0]
    upstream = await faults(firehose(total, sent))
    settings = proxy_settings(upstream.url, send_timeout=send_timeout)
    async with proxy_with_send_buffer(settings, 512 * 1024) as proxy:
        reader, writer = await open_small_window(proxy.port)
        try:
            writer.write(chat_request("slow-1"))
            await writer.drain()
            started = time.perf_counter()
            got = 0
            async with asyncio.timeout(30):
                await reader.readuntil(b"\r\n\r\n")
                for _ in range(100_000):  # bounded; ends at the body's end
                    # The access line is written once the proxy has written it all.
                    proxy_done = access_log.find("slow-1") is not None
                    chunk = await reader.read(MIB if proxy_done else 32 * 1024)
                    got += len(chunk)
                    if not chunk or got >= total:
                        break
                    if not proxy_done:
                        await asyncio.sleep(0.1)
            took = time.perf_counter() - started
        finally:
            writer.close()
        assert got == total
        assert took > 3 * send_timeout
        record = await access_log.wait_for("slow-1")
        assert record["outcome"] == "complete"
        assert record["bytes_out"] == total


# -- request bodies: a total deadline besides the idle one

BODY_IDLE = 0.6
BODY_TOTAL = 1.5
PIECE_EVERY = 0.1  # well within BODY_IDLE
PIECES = 60  # 6 s of trickling if nothing stops it: four times BODY_TOTAL


def _json_trickle() -> tuple[bytes, bytes, list[bytes]]:
    head = b'{"model": "m", "messages": [{"role": "user", "content": "'
    tail = b'"}]}'
    return head, tail, [b"a"] * PIECES


def sized_json() -> tuple[bytes, list[bytes]]:
    head, tail, pieces = _json_trickle()
    length = len(head) + len(tail) + len(pieces)
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nX-Request-Id: trickle\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length
    )
    return request + head, [*pieces, tail]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def chunked_json() -> tuple[bytes, list[bytes]]:
    head, tail, pieces = _json_trickle()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nX-Request-Id: trickle\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    return request + chunk(head), [chunk(p) for p in pieces] + [chunk(tail), b"0\r\n\r\n"]


def chunked_upload() -> tuple[bytes, list[bytes]]:
    """A path-routed upload (streamed to the upstream as it arrives)."""
    request = (
        b"POST /v1/files HTTP/1.1\r\nHost: proxy\r\nX-Request-Id: trickle\r\n"
        b"Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    return request + chunk(b"x" * 1000), [chunk(b"x") for _ in range(PIECES)] + [b"0\r\n\r\n"]


def chunked_form() -> tuple[bytes, list[bytes]]:
    """A multipart form read up to its model field, then streamed: one clock for both."""
    model_part = (
        b'--bnd\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n'
        b'--bnd\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    )
    request = (
        b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: proxy\r\nX-Request-Id: trickle\r\n"
        b"Content-Type: multipart/form-data; boundary=bnd\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    pieces = [chunk(b"x") for _ in range(PIECES)]
    return request + chunk(model_part), [*pieces, chunk(b"\r\n--bnd--\r\n"), b"0\r\n\r\n"]


async def trickle(port: int, start: bytes, pieces: list[bytes]) -> tuple[float, bytes, int]:
    """Send ``start``, then one piece every PIECE_EVERY seconds while reading the
    answer; return the seconds until the answer ended, the answer, and how many
    pieces were still unsent then."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.perf_counter()
    answer = asyncio.ensure_future(reader.read())
    left = len(pieces)
    try:
        writer.write(start)
        for piece in pieces:
            if answer.done():
                break
            with contextlib.suppress(ConnectionError):
                writer.write(piece)
                await writer.drain()
            left -= 1
            await asyncio.wait({answer}, timeout=PIECE_EVERY)
        # The 408 closes the connection; any other answer is kept alive.
        await asyncio.wait({answer}, timeout=5)
        took = time.perf_counter() - started
        with contextlib.suppress(ConnectionError):
            return took, answer.result() if answer.done() else b"(no answer ending)", left
        return took, b"(reset)", left
    finally:
        answer.cancel()
        writer.close()


@pytest.mark.parametrize(
    "make_body",
    [sized_json, chunked_json, chunked_upload, chunked_form],
    ids=["sized-json", "chunked-json", "streamed-upload", "streamed-form"],
)
async def test_a_body_trickling_past_body_timeout_gets_408(
    faults: FaultFactory, access_log: AccessLog, make_body: Any
) -> None:
    upstream = await faults()
    config = route_config({"a": upstream.url}, "a")
    config["routes"].append({"path": "files*", "upstream": "a"})
    config["server"] = {"body_idle_timeout": BODY_IDLE, "body_timeout": BODY_TOTAL}
    settings = parse_settings(config, environ={})
    start, pieces = make_body()
    async with running_proxy(settings) as proxy:
        took, answer, left = await trickle(proxy.port, start, pieces)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:200]
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout"
    assert error["message"] == (
        f"The request body did not arrive in full within {BODY_TOTAL:g} seconds."
    )
    assert BODY_TOTAL <= took < BODY_TOTAL + 3
    assert left > 0, "the body ended before the deadline: nothing was bounded"
    # Nothing reached the upstream whole; a streamed start was cut off there.
    assert upstream.requests == []
    for conn in upstream.connections:
        await asyncio.wait_for(conn.peer_closed.wait(), 5)
    record = await access_log.wait_for("trickle")
    assert record["status"] == 408 and record["error"] == "request_timeout"


async def test_a_body_gone_silent_gets_408_for_its_idle_bound_not_the_total(
    faults: FaultFactory,
) -> None:
    upstream = await faults()
    config = route_config({"a": upstream.url}, "a")
    config["server"] = {"body_idle_timeout": BODY_IDLE, "body_timeout": BODY_TOTAL}
    start, _ = sized_json()
    async with running_proxy(parse_settings(config, environ={})) as proxy:
        took, answer, _ = await trickle(proxy.port, start, [])
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:200]
    message = json.loads(body)["error"]["message"]
    assert message == f"The request body stopped arriving for {BODY_IDLE:g} seconds."
    assert BODY_IDLE <= took < BODY_TOTAL
    assert upstream.requests == []
