"""One upstream connection: aiohttp's client protocol adapted to the pool,
where to connect (:class:`Origin`), and the writers of a request's head and body.

Every private name of aiohttp's client that this package relies on is used
in this module and nowhere else; tests/unit/test_private_names.py checks
that the installed aiohttp still has each of them, and pyproject.toml bounds
aiohttp to the releases the suite was run against.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar, cast

from aiohttp.client_proto import ResponseHandler
from aiohttp.streams import StreamReader
from multidict import MultiMapping
from yarl import URL

from .failures import DISCONNECTED, UpstreamFailure

__all__ = [
    "Connection",
    "Origin",
    "ShortQueue",
    "abort",
    "drop_spent_buffer",
    "lighten_body",
    "open_connection",
    "take_parsed",
]

# Bodies up to this size go out in one write with the head (one syscall);
# larger ones follow the head as their own write, without a copy.
_COALESCE_BELOW: Final = 64 * 1024
# How much of a response body may wait in memory before reading from the
# upstream pauses (aiohttp's StreamReader pauses above twice this).
READ_BUFSIZE: Final = 64 * 1024
_NO_BODY_METHODS: Final = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
_BUFFERS: Final = (bytes, bytearray)  # a body held whole

_T = TypeVar("_T")
# See lighten_body; it stays empty, so sharing it shares nothing.
_NO_CHUNK_ENDS: Final[deque[int]] = deque(maxlen=0)
# See drop_spent_buffer.
_SPENT: Final[tuple[bytes, ...]] = ()


class ShortQueue(list[_T]):
    """A first-in first-out queue for the few items at a time that aiohttp keeps
    in a ``deque`` for the life of a connection or a body: parsed heads
    waiting for a handler or for the pool's read, a streamed body's parsed
    pieces waiting for the pipe.

    An empty deque already holds a block of 64 slots, ~760 bytes, and an open
    stream kept five of them; an empty list is 56 bytes (docs/decisions.md,
    "An open stream keeps no deque"). aiohttp appends with ``append`` (C on
    both) and takes with ``popleft``, here a Python call that moves the rest:
    so it is only put where few items wait and aiohttp takes them once per
    request, or where the proxy takes them itself (:func:`take_parsed`).
    """

    __slots__ = ()

    def popleft(self) -> _T:
        return self.pop(0)

    def appendleft(self, item: _T) -> None:
        self.insert(0, item)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where to connect, and how to name the host in requests.

    ``key`` is what identifies a connection: TLS or not (the scheme), host
    and port. Every TLS upstream shares the pool's one context (system CAs,
    verification on); settings of its own would join the key. Equal keys
    share idle connections, so a reload that rebuilds an unchanged upstream
    keeps them warm. The pool looks connections up by ``key``, a plain tuple
    hashed in C, cheaper per request than a dataclass hash.
    """

    host: str  # as resolved: an IP literal or a DNS name
    port: int
    tls: bool
    host_header: str  # RFC 9112 §3.2: host[:port], the port only when not the default
    literal: bool  # an IP address: nothing to resolve
    key: tuple[bool, str, int]

    @classmethod
    def of(cls, url: URL) -> Origin:
        host = url.raw_host or ""
        try:
            ipaddress.ip_address(host)
            literal = True
        except ValueError:
            literal = False
        tls = url.scheme == "https"
        port = url.port or (443 if tls else 80)
        return cls(
            host=host,
            port=port,
            tls=tls,
            host_header=url.host_port_subcomponent or host,
            literal=literal,
            key=(tls, host, port),
        )


class Connection(ResponseHandler):
    """aiohttp's client protocol, plus what the pool needs, and two per-chunk savings.

    Per body chunk aiohttp would also re-arm a timer for the idle bound and
    "resume" reading that was never paused; both are skipped here (see
    :class:`~proxy.client.timers.IdleWatch` and :meth:`resume_reading`). At
    1,000 streams those were about a tenth of the proxy's CPU per chunk
    (bench/README.md, finding 3).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        # The parsed response heads waiting for the pool's read: one at a time
        # (see ShortQueue).
        self._buffer = ShortQueue()  # type: ignore[assignment]
        self.idle_since = 0.0
        self.skips_payload: bool | None = None  # the parser's setting (HEAD or not)
        # Called after the parser has fed the body: new bytes, its end, or its
        # failure (pipe.py moves them to the client without a task switch).
        self.on_body: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # aiohttp's BaseProtocol would set TCP_NODELAY here, through a socket
        # object made for the purpose and a system call; asyncio's and
        # uvloop's TCP transports set it already when they are made.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        _parse(self, data)  # super()'s, without the lookup: this runs per chunk
        if self.on_body is not None:
            self.on_body()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self.on_body is not None:
            self.on_body()

    async def drain(self) -> None:
        """Wait while the kernel's send buffer is full (flow control)."""
        await self._drain_helper()

    def resume_reading(self, resume_parser: bool = True) -> None:
        # aiohttp's StreamReader calls this after every read, paused or not;
        # with nothing paused it would only feed the parser an empty buffer.
        if self._reading_paused or self._buffer_paused:
            super().resume_reading(resume_parser)

    @property
    def reading_paused(self) -> bool:
        """Reading is paused: the body's buffer is full, or :meth:`hold`."""
        return self._reading_paused or self._buffer_paused

    def hold(self) -> None:
        self._pause_reading_for_buffer()

    def unhold(self) -> None:
        self._resume_reading_for_buffer()
        # Bytes parsed while held wait in the body's buffer; the caller pumps.

    def send_request(
        self,
        method: str,
        target: str,
        host_header: str,
        headers: MultiMapping[str],
        body: bytes | bytearray | AsyncIterable[bytes],
        body_length: int | None,
    ) -> asyncio.Task[None] | None:
        """Write one request: its head (RFC 9112 §3, §6) and a whole body, or
        the task that sends a streamed ``body`` (``body_length`` bytes, or
        chunked when it is None).

        ``headers`` holds neither Host nor framing headers. Framing is ours
        alone: ``Content-Length`` for a known length (also 0 for an empty POST,
        so the upstream does not wait for a body), chunked otherwise.
        """
        skip_payload = method == "HEAD"
        if self.skips_payload is not skip_payload:
            # A new parser only when the kind of answer changes: llhttp
            # parses one response after another on a keep-alive
            # connection, as aiohttp's server parser does with requests.
            self.set_response_params(
                skip_payload=skip_payload,
                read_until_eof=True,
                auto_decompress=False,
                read_bufsize=READ_BUFSIZE,
            )
            self.skips_payload = skip_payload
        lines = [f"{name}: {value}\r\n" for name, value in headers.items()]
        if isinstance(body, _BUFFERS):
            if body or method not in _NO_BODY_METHODS:
                lines.append(f"Content-Length: {len(body)}\r\n")
        elif body_length is None:
            lines.append("Transfer-Encoding: chunked\r\n")
        else:
            lines.append(f"Content-Length: {body_length}\r\n")
        text = f"{method} {target} HTTP/1.1\r\nHost: {host_header}\r\n{''.join(lines)}\r\n"
        # Every line ends in CRLF and no CR or LF may sit anywhere else: a header
        # value carrying one would start a header (or a request) of its own.
        ends = len(lines) + 3  # the request line, Host and the empty line
        if text.count("\n") != ends or text.count("\r") != ends:
            raise ValueError("a request header holds a line break")
        # surrogateescape: header bytes that are not UTF-8 go out as they came in.
        head = text.encode("utf-8", "surrogateescape")
        transport = self.transport
        if transport is None:
            raise UpstreamFailure("disconnected", DISCONNECTED)
        if isinstance(body, _BUFFERS):
            if len(body) < _COALESCE_BELOW:
                transport.write(head + body if body else head)
            else:
                transport.write(head)
                transport.write(body)
            return None
        transport.write(head)
        return asyncio.get_running_loop().create_task(
            _send_body(self, body, chunked=body_length is None)
        )


_parse: Final = ResponseHandler.data_received


def lighten_body(body: StreamReader) -> None:
    """Have ``body``, from now on read by :func:`take_parsed` alone, hold its
    parsed pieces in a :class:`ShortQueue` and keep no record of where its HTTP
    chunks ended: each was a deque with a 64-slot block, ~760 bytes per open
    stream (docs/decisions.md, "An open stream keeps no deque").

    The pipe takes whatever is parsed, never chunk by chunk. aiohttp appends
    each chunk's end to ``_http_chunk_splits`` and pauses reading when more
    ends wait than a quarter of its read limit; the pipe takes every parsed
    piece as it comes, so few ever wait, and the bytes buffered still bound
    the pause. Once set, aiohttp only reads, appends to and takes from the
    record, so one deque that keeps nothing (``maxlen=0``: an append is
    dropped at once) serves every body at no cost per stream, and each chunk
    skips the record's upkeep. Counted with callgrind per relayed chunk (the
    parser's calls and take_parsed): 7,092 instructions before, 6,136 without
    the record, 6,778 with the pieces in a list too (a list's storage is
    freed and made again as it empties and fills)."""
    if type(body) is StreamReader:
        body._http_chunk_splits = _NO_CHUNK_ENDS
        body._buffer = ShortQueue(body._buffer)  # type: ignore[assignment]


def drop_spent_buffer(body: StreamReader) -> None:
    """Have a request body read to its end give up its empty deque (a 64-slot
    block, ~760 bytes) for an empty tuple: the pipe calls this for the request
    whose answer it relays, which a stream keeps for its whole life
    (docs/decisions.md, "An open stream keeps no deque"). Nothing is fed to a
    body after its end (aiohttp asserts it), and an empty tuple reads as the
    empty deque it replaces. An upload still arriving is not at its end."""
    if type(body) is StreamReader and body.is_eof() and not body._buffer:
        body._buffer = _SPENT  # type: ignore[assignment]


def take_parsed(body: StreamReader) -> tuple[bytes, bool]:
    """What the parser has fed ``body`` that nobody has read yet, and whether
    the body has ended (or failed: then nothing is taken).

    The same as ``read_nowait()`` followed by ``is_eof()`` and ``exception()``,
    but the usual case of a stream, one parsed piece waiting and reading not
    paused, is done here in one call: StreamReader's read takes five Python
    calls for it, and each costs hundreds of instructions on a path that runs
    per relayed chunk (docs/decisions.md, "A relayed chunk costs few Python
    calls"). Its
    bookkeeping is kept: the bytes buffered, the read position and the chunk
    boundaries behind it. With reading paused, the read must also resume it,
    so that case, like any other, goes through ``read_nowait``.
    """
    if type(body) is not StreamReader:
        # aiohttp's EmptyStreamReader (the body of a 204, a 304 or a HEAD
        # answer) keeps no buffer: its public methods say it is empty and ended.
        if body.exception() is not None:
            return b"", True
        return body.read_nowait(), body.is_eof()
    buffer = body._buffer
    if body._exception is not None:
        return b"", True
    conn = body._protocol
    if buffer and not body._buffer_offset and not (conn._reading_paused or conn._buffer_paused):
        if len(buffer) == 1:
            data: bytes = buffer.pop()
        else:  # pieces parsed from one read: several chunks came together
            data = b"".join(buffer)
            buffer.clear()
        size = len(data)
        body._size -= size
        cursor = body._cursor = body._cursor + size
        splits = body._http_chunk_splits
        while splits and splits[0] < cursor:
            splits.popleft()
        return data, body._eof
    if not buffer:
        return b"", body._eof
    if type(buffer) is not deque:  # a ShortQueue (lighten_body), where
        body._buffer = deque(buffer)  # aiohttp's read would take each piece in O(n)
    return body.read_nowait(), body._eof


def abort(conn: Connection, sender: asyncio.Task[None] | None) -> None:
    """Abort ``conn`` and the sending of its request's body, if still under way."""
    if sender is not None and not sender.done():
        sender.cancel()
    conn.on_body = None
    conn.abort()


async def open_connection(
    origin: Origin, addresses: list[tuple[int, str]], tls: ssl.SSLContext | None
) -> Connection:
    """A new connection to the first of ``addresses`` (family, address) that
    takes one; raises the last address's ``OSError`` when none does."""
    loop = asyncio.get_running_loop()
    error: OSError | None = None
    for family, address in addresses:
        try:
            _, conn = await loop.create_connection(
                lambda: Connection(loop),
                address,
                origin.port,
                family=family,
                ssl=tls,
                server_hostname=origin.host if tls is not None else None,
            )
            return conn
        except OSError as exc:
            error = exc  # try the host's next address
    raise error or socket.gaierror(socket.EAI_NONAME, "no address")


async def _send_body(conn: Connection, body: AsyncIterable[bytes], *, chunked: bool) -> None:
    """Write a streamed body as it arrives, at the pace the upstream reads it.

    Any failure here (the client's body broke off, the upstream went away)
    aborts the connection: the upstream must never take a cut body as whole,
    and the response read then fails too.
    """
    try:
        async for chunk in body:
            transport = conn.transport
            if transport is None:
                raise ConnectionResetError("upstream closed")
            if not chunk:
                continue
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            await conn.drain()
        if chunked and conn.transport is not None:
            conn.transport.write(b"0\r\n\r\n")
    except Exception:  # noqa: BLE001 - whatever broke the body, the upstream must not take it as whole
        conn.abort()
