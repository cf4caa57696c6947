"""A lean HTTP/1.1 client for the hot path: pooled keep-alive connections per upstream.

Why not ``aiohttp.ClientSession.request``: profiles of the proxy (bench/README.md)
put about 300 µs of the 530 µs a small request cost in that call's machinery
(URL objects, request and response objects built for features a pass-through
never uses: cookies, redirects, tracing, auto-headers, decompression). Here a
request is one preformatted head and one ``write``.

What is *not* hand-written: parsing and framing of the response and flow
control of its body are aiohttp's own, through its client protocol
(``ResponseHandler``, the llhttp C parser, ``StreamReader``). The idle bound
between body chunks is the pool's (``_IdleWatch``: one timer for all streams).
The discovery and realtime WebSocket paths keep using the ``ClientSession``.

Contract of :meth:`UpstreamPool.request`:

- It returns once the response head is in (1xx interim answers skipped), or
  raises :class:`UpstreamFailure` naming what went wrong before any response
  byte: ``connect`` (refused, unreachable, DNS, TLS), ``connect_timeout``,
  ``disconnected`` (closed before a response), ``bad_response`` (not HTTP),
  ``reset`` (any other socket error).
- ``response_timeout`` bounds the whole call (connect to headers) and raises
  ``TimeoutError``; cancelling the call aborts the connection, never pools it.
- The caller must end every :class:`UpstreamResponse` with ``release()`` (the
  body was read to its end: the connection may be reused) or ``close()``
  (anything else: the connection is aborted, so the upstream stops at once).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass
from typing import Final

from aiohttp.client_exceptions import ClientError, ServerDisconnectedError, SocketTimeoutError
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping
from yarl import URL

from ..attempts import BAD_RESPONSE, DISCONNECTED, connect_failure, connect_timeout, reset
from .timers import Ticker

__all__ = ["Origin", "UpstreamFailure", "UpstreamPool", "UpstreamResponse"]

# Bodies up to this size go out in one write with the head (one syscall);
# larger ones follow the head as their own write, without a copy.
_COALESCE_BELOW: Final = 64 * 1024
# How much of a response body may wait in memory before reading from the
# upstream pauses (aiohttp's StreamReader pauses above twice this).
READ_BUFSIZE: Final = 64 * 1024
# Resolved addresses of upstream host names are reused this long; upstream
# IP literals are never resolved.
DNS_TTL_SECONDS: Final = 60.0
_NO_BODY_METHODS: Final = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
_BUFFERS: Final = (bytes, bytearray)  # a body held whole
_NO_HEADERS: Final = CIMultiDictProxy(CIMultiDict[str]())


class UpstreamFailure(Exception):
    """The upstream gave no response; ``kind`` says why (see the module docstring),
    ``detail`` in words with the address when there is one (attempts.py).

    Neither ever holds request headers (they carry the upstream key)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(kind)
        self.kind = kind
        self.detail = detail


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


class _Connection(ResponseHandler):
    """aiohttp's client protocol, plus what the pool needs, and two per-chunk savings.

    Per body chunk aiohttp would also re-arm a timer for the idle bound and
    "resume" reading that was never paused; both are skipped here (see
    :class:`_IdleWatch` and :meth:`resume_reading`). At 1,000 streams those
    were about a tenth of the proxy's CPU per chunk (issue 8).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.idle_since = 0.0
        self.skips_payload: bool | None = None  # the parser's setting (HEAD or not)
        # Called after the parser has fed the body: new bytes, its end, or its
        # failure (pipe.py moves them to the client without a task switch).
        self.on_body: Callable[[], None] | None = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
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

    def hold(self) -> None:
        self._pause_reading_for_buffer()

    def unhold(self) -> None:
        self._resume_reading_for_buffer()
        # Bytes parsed while held wait in the body's buffer; the caller pumps.


class UpstreamResponse:
    """The head of an upstream response, and its body as a stream."""

    __slots__ = ("_conn", "_pool", "_origin", "_sender", "status", "reason", "headers", "content")

    def __init__(
        self,
        pool: UpstreamPool,
        origin: Origin,
        conn: _Connection,
        sender: asyncio.Task[None] | None,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        content: StreamReader,
    ) -> None:
        self._pool = pool
        self._origin = origin
        self._conn: _Connection | None = conn
        self._sender = sender
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content

    @property
    def content_length(self) -> int | None:
        """The body's declared length; None for chunked or read-until-close bodies."""
        if "Transfer-Encoding" in self.headers:
            return None
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    def arm_idle_timeout(self, seconds: float) -> None:
        """Bound the silence between two body chunks from now on (see
        :class:`_IdleWatch`); on expiry the body read raises
        ``SocketTimeoutError``. A body already whole needs no watch (and must
        not leave one on a pooled connection).
        """
        conn = self._conn
        if conn is not None and not self.content.is_eof():
            self._pool._idle_watch.watch(conn, seconds, self.content)

    def forget_head(self) -> None:
        """Drop the parsed response headers once relayed: a stream can stay open
        for minutes, and memory per open stream is an issue 8 goal."""
        self.headers = _NO_HEADERS

    def on_body(self, callback: Callable[[], None] | None) -> None:
        """Have ``callback`` called whenever the body got bytes, ended or failed."""
        if self._conn is not None:
            self._conn.on_body = callback

    def hold(self) -> None:
        """Stop reading from the upstream (the client is not keeping up)."""
        if self._conn is not None:
            self._conn.hold()

    def resume(self) -> None:
        """Read from the upstream again after :meth:`hold`."""
        if self._conn is not None:
            self._conn.unhold()

    def release(self) -> None:
        """The body was read to its end: pool the connection if it can carry another."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._pool._idle_watch.forget(conn)
        sender = self._sender
        if (sender is not None and not sender.done()) or conn.should_close:
            _abort(conn, sender)
        else:
            conn.on_body = None
            self._pool.put_back(self._origin, conn)

    def close(self) -> None:
        """Abort the connection (mid-body, or never read): the upstream sees it close now."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._idle_watch.forget(conn)
            _abort(conn, self._sender)


def _abort(conn: _Connection, sender: asyncio.Task[None] | None) -> None:
    if sender is not None and not sender.done():
        sender.cancel()
    conn.on_body = None
    conn.abort()


class _Deadlines(Ticker):
    """Response deadlines of the requests waiting for their head: a request is
    failed with ``TimeoutError`` between 1 and 1.125 times its timeout."""

    def __init__(self) -> None:
        super().__init__()
        self._due: dict[_Connection, float] = {}

    def watch(self, conn: _Connection, deadline: float, timeout: float) -> None:
        self._due[conn] = deadline
        self._arm(timeout)

    def forget(self, conn: _Connection) -> None:
        self._due.pop(conn, None)

    def _check(self, now: float) -> bool:
        expired = [conn for conn, deadline in self._due.items() if deadline <= now]
        for conn in expired:
            del self._due[conn]
            # Wakes the request's wait for the head with TimeoutError.
            conn.set_exception(TimeoutError())
        return bool(self._due)


class _Silence:
    """One watched body: its idle limit, and the bytes and time of the last
    progress seen."""

    __slots__ = ("body", "limit", "seen", "since")

    def __init__(self, body: StreamReader, limit: float, seen: int, since: float) -> None:
        self.body = body
        self.limit = limit
        self.seen = seen
        self.since = since


class _IdleWatch(Ticker):
    """Idle bounds of the response bodies being read (see :class:`~proxy.ticker.Ticker`).

    Contract: a body is failed with ``SocketTimeoutError`` once its upstream
    has sent nothing for the body's limit while we were reading, between 1 and
    1.25 times the limit after the last byte, never earlier. Time with reading
    paused (the client is slow to take the body) is not upstream silence. A
    body at its end, or on a closed connection, leaves the watch by itself.
    Progress is seen by comparing the bytes received at each tick, so nothing
    runs per chunk.
    """

    def __init__(self) -> None:
        super().__init__()
        self._watched: dict[_Connection, _Silence] = {}

    def watch(self, conn: _Connection, limit: float, body: StreamReader) -> None:
        """Bound the silence of ``body``, read from ``conn``, from now on
        (replacing any watch of ``conn``)."""
        now = asyncio.get_running_loop().time()
        self._watched[conn] = _Silence(body, limit, body.total_bytes, now)
        self._arm(limit)

    def forget(self, conn: _Connection) -> None:
        """Stop watching ``conn`` (its response was released or closed)."""
        self._watched.pop(conn, None)

    def _check(self, now: float) -> bool:
        gone: list[_Connection] = []
        silent: list[_Connection] = []
        for conn, silence in self._watched.items():
            body = silence.body
            if body.is_eof() or conn.transport is None:
                gone.append(conn)
            elif body.total_bytes != silence.seen or conn._reading_paused or conn._buffer_paused:
                silence.seen = body.total_bytes
                silence.since = now
            elif now - silence.since >= silence.limit:
                silent.append(conn)
        for conn in gone:
            del self._watched[conn]
        for conn in silent:
            body = self._watched.pop(conn).body
            error = SocketTimeoutError("Timeout on reading data from socket")
            conn.set_exception(error)
            body.set_exception(error)
            # Wakes the relay, which may release or close the response (and
            # so call forget) from here: the entry is already gone.
            if conn.on_body is not None:
                conn.on_body()
        return bool(self._watched)


class UpstreamPool:
    """Keep-alive connections per origin (:attr:`Origin.key`), for one event loop.

    Idle connections are reused most recent first and dropped after
    ``keepalive`` seconds, kept below common upstream servers' own idle
    timeout so a request never lands on a connection about to be closed.
    There is no cap: an upstream's own limits apply (issue 8: 1,000 streams
    need 1,000 connections).

    :meth:`serve` names the origins of the running configuration; on a
    reload, origins that stay keep their idle connections and those that
    went are closed and forgotten, so the pool's bookkeeping is bounded by
    the configuration, not by the reloads it has seen. A pool never told
    (tests driving it alone) pools any origin.
    """

    def __init__(self, keepalive: float) -> None:
        self._keepalive = keepalive
        self._idle: dict[tuple[bool, str, int], list[_Connection]] = {}
        self._served: frozenset[tuple[bool, str, int]] | None = None
        self._dns: dict[tuple[str, int], tuple[float, list[tuple[int, str]]]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._deadlines = _Deadlines()
        self._idle_watch = _IdleWatch()
        self._closed = False

    async def request(
        self,
        origin: Origin,
        method: str,
        target: str,
        headers: MultiMapping[str],
        body: bytes | bytearray | AsyncIterable[bytes],
        body_length: int | None,
        connect_timeout: float,
        response_timeout: float,
    ) -> UpstreamResponse:
        """Send one request; see the module docstring for the contract.

        ``response_timeout`` bounds the whole call, connecting included, up to
        the response head: past it the call raises ``TimeoutError``.
        ``connect_timeout`` bounds DNS, TCP and TLS set-up of a new connection.

        ``headers`` holds neither Host nor framing headers: they are written here.
        ``body`` is the whole body, or an async iterable of chunks sent as they
        come: ``body_length`` bytes in all, or chunked when it is None.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + response_timeout
        conn = self._take(origin, now)
        if conn is None:
            conn = await self._connect(origin, connect_timeout, response_timeout)
        sender: asyncio.Task[None] | None = None
        deadlines = self._deadlines
        deadlines.watch(conn, deadline, response_timeout)
        try:
            skip_payload = method == "HEAD"
            if conn.skips_payload is not skip_payload:
                # A new parser only when the kind of answer changes: llhttp
                # parses one response after another on a keep-alive
                # connection, as aiohttp's server parser does with requests.
                conn.set_response_params(
                    skip_payload=skip_payload,
                    read_until_eof=True,
                    auto_decompress=False,
                    read_bufsize=READ_BUFSIZE,
                )
                conn.skips_payload = skip_payload
            streamed = not isinstance(body, _BUFFERS)
            head = _head(method, target, origin.host_header, headers, body, body_length, streamed)
            transport = conn.transport
            if transport is None:
                raise UpstreamFailure("disconnected", DISCONNECTED)
            if isinstance(body, _BUFFERS):
                if len(body) < _COALESCE_BELOW:
                    transport.write(head + body if body else head)
                else:
                    transport.write(head)
                    transport.write(body)
            else:
                transport.write(head)
                sender = loop.create_task(_send_body(conn, body, chunked=body_length is None))
            while True:
                message, payload = await conn.read()
                # RFC 9110 §15.2: interim 1xx answers precede the final one.
                if not 100 <= message.code < 200:
                    break
            return UpstreamResponse(
                self,
                origin,
                conn,
                sender,
                message.code,
                message.reason,
                message.headers,
                payload,
            )
        except BaseException as exc:
            _abort(conn, sender)
            if isinstance(exc, UpstreamFailure | asyncio.CancelledError | TimeoutError):
                raise
            if isinstance(exc, ServerDisconnectedError):
                raise UpstreamFailure("disconnected", DISCONNECTED) from None
            if isinstance(exc, HttpProcessingError):
                raise UpstreamFailure("bad_response", BAD_RESPONSE) from None
            if isinstance(exc, ClientError | OSError):
                raise UpstreamFailure("reset", reset(exc)) from None
            raise
        finally:
            deadlines.forget(conn)

    def serve(self, origins: Iterable[Origin]) -> None:
        """Pool only ``origins`` from now on: idle connections to any other are
        closed and its entries dropped. A connection to another origin that is
        released later (a request that started before a reload) is closed."""
        served = frozenset(origin.key for origin in origins)
        self._served = served
        for key in [key for key in self._idle if key not in served]:
            for conn in self._idle.pop(key):
                conn.close()
        for key in served:
            self._idle.setdefault(key, [])
        names = {(host, port) for _, host, port in served}
        for name in [name for name in self._dns if name not in names]:
            del self._dns[name]

    def _take(self, origin: Origin, now: float) -> _Connection | None:
        idle = self._idle.get(origin.key)
        while idle:
            conn = idle.pop()
            if conn.is_connected() and now - conn.idle_since < self._keepalive:
                return conn
            conn.close()
        return None

    def put_back(self, origin: Origin, conn: _Connection) -> None:
        if self._closed or not conn.is_connected():
            conn.close()
            return
        idle = self._idle.get(origin.key)
        if idle is None:
            if self._served is not None:  # its upstream left the configuration
                conn.close()
                return
            idle = self._idle[origin.key] = []
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._keepalive, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle past the keep-alive, so none lingers unused."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() - self._keepalive
        left = False
        for idle in self._idle.values():
            kept = [c for c in idle if c.is_connected() and c.idle_since > deadline]
            for conn in idle:
                if conn not in kept:
                    conn.close()
            idle[:] = kept
            left = left or bool(kept)
        if left:
            self._sweeper = loop.call_later(self._keepalive, self._sweep)

    async def _connect(
        self, origin: Origin, timeout: float, response_timeout: float
    ) -> _Connection:
        """A new connection, or ``connect``/``connect_timeout``; ``timeout`` bounds
        DNS, TCP and the TLS handshake together. When ``response_timeout`` is
        the shorter, running out of it raises ``TimeoutError`` (the request's
        own deadline) instead."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(min(timeout, response_timeout)):
                addresses = await self._resolve(origin, loop)
                tls = self._tls_context() if origin.tls else None
                error: OSError | None = None
                for family, address in addresses:
                    try:
                        _, conn = await loop.create_connection(
                            lambda: _Connection(loop),
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
        except TimeoutError:
            if response_timeout < timeout:
                raise
            detail = connect_timeout(timeout, origin.host, origin.port)
            raise UpstreamFailure("connect_timeout", detail) from None
        except OSError as exc:
            detail = connect_failure(exc, origin.host, origin.port)
            raise UpstreamFailure("connect", detail) from None

    async def _resolve(
        self, origin: Origin, loop: asyncio.AbstractEventLoop
    ) -> list[tuple[int, str]]:
        if origin.literal:
            family = socket.AF_INET6 if ":" in origin.host else socket.AF_INET
            return [(family, origin.host)]
        key = (origin.host, origin.port)
        cached = self._dns.get(key)
        now = loop.time()
        if cached is not None and cached[0] > now:
            return cached[1]
        infos = await loop.getaddrinfo(
            origin.host, origin.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        addresses = [(int(family), str(sockaddr[0])) for family, _, _, _, sockaddr in infos]
        self._dns[key] = (now + DNS_TTL_SECONDS, addresses)
        return addresses

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            # Made once, on the first TLS upstream: loading the CA store is slow.
            self._ssl = ssl.create_default_context()
        return self._ssl

    def close(self) -> None:
        """Close every idle connection; connections in use end with their requests."""
        self._closed = True
        self._deadlines.close()
        # The idle watch goes on: bodies still being read keep their bound,
        # and its timer stops once the last of them has left the watch.
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def _head(
    method: str,
    target: str,
    host_header: str,
    headers: MultiMapping[str],
    body: bytes | bytearray | AsyncIterable[bytes],
    body_length: int | None,
    streamed: bool,
) -> bytes:
    """The request line and header block (RFC 9112 §3, §6).

    Framing is ours alone: ``Content-Length`` for a known length (also 0 for an
    empty POST, so the upstream does not wait for a body), chunked otherwise.
    """
    lines = [f"{name}: {value}\r\n" for name, value in headers.items()]
    if streamed:
        if body_length is None:
            lines.append("Transfer-Encoding: chunked\r\n")
        else:
            lines.append(f"Content-Length: {body_length}\r\n")
    elif isinstance(body, _BUFFERS) and (body or method not in _NO_BODY_METHODS):
        lines.append(f"Content-Length: {len(body)}\r\n")
    text = f"{method} {target} HTTP/1.1\r\nHost: {host_header}\r\n{''.join(lines)}\r\n"
    # Every line ends in CRLF and no CR or LF may sit anywhere else: a header
    # value carrying one would start a header (or a request) of its own.
    ends = len(lines) + 3  # the request line, Host and the empty line
    if text.count("\n") != ends or text.count("\r") != ends:
        raise ValueError("a request header holds a line break")
    # surrogateescape: header bytes that are not UTF-8 go out as they came in.
    return text.encode("utf-8", "surrogateescape")


async def _send_body(conn: _Connection, body: AsyncIterable[bytes], *, chunked: bool) -> None:
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
