"""A fault-injecting fake upstream: a raw asyncio HTTP/1.1 server whose every
answer is scripted, byte by byte.

aiohttp's own server cannot misbehave on purpose (reset mid-body, lie about
Content-Length, stop before the last chunk, speak garbage), so this one is
written on bare streams. Each request takes the next :data:`Behaviour` from
``FaultServer.script`` (then ``FaultServer.default``). The server records
every request's raw bytes, counts open connections, and notes the moment each
connection was closed by its peer (the proxy), so tests can await "the proxy
closed the upstream request" instead of sleeping.

Behaviours (module functions returning a :data:`Behaviour`):

- :func:`respond` / :func:`status`: a complete response (keep-alive).
- :func:`sse`: a chunked event stream with an optional gap between chunks,
  ended cleanly, by a reset (RST), by FIN without the last chunk, or by hanging.
- :func:`short_body`: ``Content-Length: n`` and fewer bytes, then FIN.
- :func:`hang`: read the request, never answer (until the peer goes away).
- :func:`garbage`: bytes that are not HTTP, then close.
- :func:`reset`: RST right after the request was read.
- :func:`delayed` / :func:`gated`: wait (a time, an event), then run another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field

__all__ = [
    "Behaviour",
    "Connection",
    "FaultServer",
    "RawRequest",
    "blackhole",
    "chat_json",
    "closed_port",
    "delayed",
    "garbage",
    "gated",
    "hang",
    "reset",
    "respond",
    "sse",
    "sse_event",
    "short_body",
    "status",
]


@dataclass
class RawRequest:
    """One request as it arrived: the head as sent and the body bytes."""

    method: str
    path: str
    head: bytes
    headers: dict[str, str]
    body: bytes


@dataclass
class Connection:
    """One accepted connection. ``peer_closed`` is set (and ``closed_at``
    noted, in ``time.perf_counter`` seconds) when the proxy closed or reset it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    server: FaultServer
    peer_closed: asyncio.Event = field(default_factory=asyncio.Event)
    closed_at: float | None = None
    requests: int = 0

    async def wait_peer_gone(self) -> None:
        """Read (and drop) whatever comes until the peer closes or resets."""
        try:
            while await self.reader.read(65536):
                pass
        except (ConnectionError, OSError):
            pass
        self.mark_peer_closed()

    def mark_peer_closed(self) -> None:
        if not self.peer_closed.is_set():
            self.closed_at = time.perf_counter()
            self.peer_closed.set()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def rst(self) -> None:
        """Close with a TCP reset (SO_LINGER 0), not a FIN."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


# A behaviour answers one request; it returns True to keep the connection open
# for the next request, False to have it closed.
Behaviour = Callable[[Connection, RawRequest], Awaitable[bool]]


class FaultServer:
    """Listen on 127.0.0.1:<random>; answer by script. Start with :meth:`start`."""

    def __init__(self, default: Behaviour | None = None) -> None:
        self.script: list[Behaviour] = []
        self.default: Behaviour = default or respond(200, chat_json())
        self.requests: list[RawRequest] = []
        self.connections: list[Connection] = []
        self.open = 0
        self.request_seen = asyncio.Event()
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        """The base URL to put in a config (``.../v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def then(self, *behaviours: Behaviour) -> FaultServer:
        self.script.extend(behaviours)
        return self

    async def start(self) -> FaultServer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in self.connections:
            conn.writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    async def wait_open(self, at_most: int, timeout: float = 5.0) -> None:
        """Wait until no more than ``at_most`` connections are open."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.open <= at_most)

    async def wait_requests(self, n: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.requests) >= n)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(reader, writer, self)
        self.connections.append(conn)
        self.open += 1
        await self._notify()
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    conn.mark_peer_closed()
                    break
                conn.requests += 1
                self.requests.append(request)
                self.request_seen.set()
                await self._notify()
                behaviour = self.script.pop(0) if self.script else self.default
                if not await behaviour(conn, request):
                    break
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            conn.mark_peer_closed()
        finally:
            if not writer.transport.is_closing():
                writer.transport.close()
            self.open -= 1
            with contextlib.suppress(RuntimeError):
                await asyncio.shield(self._notify())


async def _read_request(reader: asyncio.StreamReader) -> RawRequest | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    return RawRequest(method, path, head, headers, body)


def _head(status_code: int, headers: Iterable[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status_code} X"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chat_json(content: str = "hi") -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-f",
            "object": "chat.completion",
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
        }
    ).encode()


def sse_event(i: int) -> bytes:
    chunk = {
        "id": "chatcmpl-f",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}],
    }
    return f"data: {json.dumps(chunk)}\n\n".encode()


def respond(
    status_code: int,
    body: bytes,
    content_type: str = "application/json",
    extra: Iterable[tuple[str, str]] = (),
) -> Behaviour:
    async def run(conn: Connection, request: RawRequest) -> bool:
        head = _head(
            status_code,
            [("Content-Type", content_type), ("Content-Length", str(len(body))), *extra],
        )
        await conn.send(head + body)
        return True

    return run


def status(code: int, extra: Iterable[tuple[str, str]] = ()) -> Behaviour:
    """An OpenAI-shaped error answer with status ``code``."""
    body = json.dumps(
        {"error": {"message": f"fault {code}", "type": "server_error", "param": None, "code": None}}
    ).encode()
    return respond(code, body, extra=extra)


def sse(
    events: int = 3,
    gap: float = 0.0,
    end: str = "done",
    before_end: asyncio.Event | None = None,
) -> Behaviour:
    """A chunked SSE stream of ``events`` events, ``gap`` seconds apart.

    ``end``: ``"done"`` (``data: [DONE]`` and the last chunk), ``"reset"``
    (RST), ``"fin"`` (FIN without the last chunk), ``"hang"`` (silence until
    the peer goes away). ``before_end``, if given, is awaited before the end.
    """

    async def run(conn: Connection, request: RawRequest) -> bool:
        await conn.send(
            _head(200, [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")])
        )
        for i in range(events):
            if i and gap:
                await asyncio.sleep(gap)  # the fault under test is the gap itself
            data = sse_event(i)
            await conn.send(b"%x\r\n%s\r\n" % (len(data), data))
        if before_end is not None:
            await before_end.wait()
        if end == "done":
            done = b"data: [DONE]\n\n"
            await conn.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            return True
        if end == "reset":
            conn.rst()
            return False
        if end == "fin":
            conn.writer.transport.close()
            return False
        await conn.wait_peer_gone()
        return False

    return run


def short_body(declared: int, sent: int) -> Behaviour:
    """Promise ``declared`` bytes, send ``sent``, then FIN."""

    async def run(conn: Connection, request: RawRequest) -> bool:
        await conn.send(
            _head(200, [("Content-Type", "application/json"), ("Content-Length", str(declared))])
            + b"x" * sent
        )
        conn.writer.transport.close()
        return False

    return run


def hang() -> Behaviour:
    """Never answer; return once the peer (the proxy) went away."""

    async def run(conn: Connection, request: RawRequest) -> bool:
        await conn.wait_peer_gone()
        return False

    return run


def garbage(data: bytes = b"SSH-2.0-OpenSSH_9.6\r\n\x00\xff garbage\r\n\r\n") -> Behaviour:
    async def run(conn: Connection, request: RawRequest) -> bool:
        await conn.send(data)
        conn.writer.transport.close()
        return False

    return run


def reset() -> Behaviour:
    async def run(conn: Connection, request: RawRequest) -> bool:
        conn.rst()
        return False

    return run


def delayed(seconds: float, then: Behaviour) -> Behaviour:
    """Answer with ``then`` after ``seconds`` of silence (a slow upstream)."""

    async def run(conn: Connection, request: RawRequest) -> bool:
        await asyncio.sleep(seconds)  # the delay is the behaviour under test
        return await then(conn, request)

    return run


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A port on 127.0.0.1 where connecting hangs: a listener that never accepts,
    its backlog already full, so further SYNs are dropped (Linux)."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def gated(event: asyncio.Event, then: Behaviour) -> Behaviour:
    """Answer with ``then`` once ``event`` is set (an upstream still thinking)."""

    async def run(conn: Connection, request: RawRequest) -> bool:
        await event.wait()
        return await then(conn, request)

    return run


def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
