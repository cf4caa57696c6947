"""The pool of keep-alive upstream connections, and the response it hands back.

See the package docstring for :meth:`UpstreamPool.request`'s contract.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass
from typing import Final

from aiohttp.http import RawResponseMessage
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

from .connection import Connection, Origin, abort, open_connection
from .failures import UpstreamFailure, connect_failure, connect_timeout, failure_before_head
from .timers import Deadlines, IdleWatch

__all__ = ["Destination", "UpstreamPool", "UpstreamResponse"]

# Resolved addresses of upstream host names are reused this long; upstream
# IP literals are never resolved.
DNS_TTL_SECONDS: Final = 60.0
_NO_HEADERS: Final = CIMultiDictProxy(CIMultiDict[str]())


@dataclass(frozen=True, slots=True)
class Destination:
    """Where :meth:`UpstreamPool.request` sends a request, and how long it may
    take: built once per upstream, not per request (docs/decisions.md, "The
    upstream walk costs little per request")."""

    origin: Origin
    connect_timeout: float  # DNS, TCP and TLS set-up of a new connection
    response_timeout: float  # the whole call, connecting included, up to the response head


class UpstreamResponse:
    """The head of an upstream response, and its body as a stream."""

    __slots__ = ("_conn", "_pool", "_origin", "_sender", "status", "reason", "headers", "content")

    def __init__(
        self,
        pool: UpstreamPool,
        origin: Origin,
        conn: Connection,
        sender: asyncio.Task[None] | None,
        message: RawResponseMessage,
        content: StreamReader,
    ) -> None:
        self._pool = pool
        self._origin = origin
        self._conn: Connection | None = conn
        self._sender = sender
        self.status: int = message.code
        self.reason: str = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
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
        :class:`~proxy.client.timers.IdleWatch`); on expiry the body read raises
        ``SocketTimeoutError``. A body already whole needs no watch (and must
        not leave one on a pooled connection).
        """
        conn = self._conn
        if conn is not None and not self.content.is_eof():
            self._pool._idle_watch.watch(conn, seconds, self.content)

    def forget_head(self) -> None:
        """Drop the parsed response headers once relayed: a stream can stay open
        for minutes, and memory per open stream is one of the figures README
        "Performance" keeps."""
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
            abort(conn, sender)
        else:
            conn.on_body = None
            self._pool.put_back(self._origin, conn)

    def close(self) -> None:
        """Abort the connection (mid-body, or never read): the upstream sees it close now."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._idle_watch.forget(conn)
            abort(conn, self._sender)


class UpstreamPool:
    """Keep-alive connections per origin (:attr:`Origin.key`), for one event loop.

    Idle connections are reused most recent first and dropped after
    ``keepalive`` seconds, kept below common upstream servers' own idle
    timeout so a request never lands on a connection about to be closed.
    There is no cap: an upstream's own limits apply (1,000 open streams need
    1,000 connections).

    :meth:`serve` names the origins of the running configuration; on a
    reload, origins that stay keep their idle connections and those that
    went are closed and forgotten, so the pool's bookkeeping is bounded by
    the configuration, not by the reloads it has seen. A pool never told
    (tests driving it alone) pools any origin.
    """

    def __init__(self, keepalive: float) -> None:
        self._keepalive = keepalive
        self._idle: dict[tuple[bool, str, int], list[Connection]] = {}
        self._served: frozenset[tuple[bool, str, int]] | None = None
        self._dns: dict[tuple[str, int], tuple[float, list[tuple[int, str]]]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._deadlines = Deadlines()
        self._idle_watch = IdleWatch()
        self._closed = False
        # The loop the pool serves, taken at its first request: on CPython 3.11
        # each asyncio.get_running_loop() makes a getpid system call (a fork
        # check, Modules/_asynciomodule.c), two per request here
        # (docs/decisions.md, "The pool keeps its event loop").
        self._loop: asyncio.AbstractEventLoop | None = None

    async def request(
        self,
        destination: Destination,
        method: str,
        target: str,
        headers: MultiMapping[str],
        body: bytes | bytearray | AsyncIterable[bytes],
        body_length: int | None,
    ) -> UpstreamResponse:
        """Send one request; see the package docstring for the contract.

        The parameters are not keyword-only, and the proxy passes them
        positionally: it calls this once per attempt, and CPython 3.11 does not
        specialise a call with keywords (docs/decisions.md, "The upstream walk
        costs little per request").

        ``destination.response_timeout`` bounds the whole call, connecting
        included, up to the response head: past it the call raises
        ``TimeoutError``. ``destination.connect_timeout`` bounds DNS, TCP and
        TLS set-up of a new connection.

        ``headers`` holds neither Host nor framing headers: they are written here.
        ``body`` is the whole body, or an async iterable of chunks sent as they
        come: ``body_length`` bytes in all, or chunked when it is None.
        """
        origin = destination.origin
        response_timeout = destination.response_timeout
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + response_timeout
        conn = self._take(origin, now)
        if conn is None:
            conn = await self._connect(destination)
        sender: asyncio.Task[None] | None = None
        deadlines = self._deadlines
        deadlines.watch(conn, deadline, response_timeout)
        try:
            sender = conn.send_request(
                method, target, origin.host_header, headers, body, body_length
            )
            while True:
                message, payload = await conn.read()
                # RFC 9110 §15.2: interim 1xx answers precede the final one.
                if not 100 <= message.code < 200:
                    break
            return UpstreamResponse(self, origin, conn, sender, message, payload)
        except BaseException as exc:
            abort(conn, sender)
            failure = failure_before_head(exc)
            if failure is None:
                raise
            raise failure from None
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

    def _take(self, origin: Origin, now: float) -> Connection | None:
        idle = self._idle.get(origin.key)
        while idle:
            conn = idle.pop()
            if conn.is_connected() and now - conn.idle_since < self._keepalive:
                return conn
            conn.close()
        return None

    def put_back(self, origin: Origin, conn: Connection) -> None:
        if self._closed or not conn.is_connected():
            conn.close()
            return
        idle = self._idle.get(origin.key)
        if idle is None:
            if self._served is not None:  # its upstream left the configuration
                conn.close()
                return
            idle = self._idle[origin.key] = []
        loop = self._loop
        if loop is None:  # (a connection is put back only after a request)
            loop = self._loop = asyncio.get_running_loop()
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

    async def _connect(self, destination: Destination) -> Connection:
        """A new connection, or ``connect``/``connect_timeout``; the connect
        timeout bounds DNS, TCP and the TLS handshake together. When the
        response timeout is the shorter, running out of it raises
        ``TimeoutError`` (the request's own deadline) instead."""
        origin = destination.origin
        timeout = destination.connect_timeout
        response_timeout = destination.response_timeout
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(min(timeout, response_timeout)):
                addresses = await self._resolve(origin, loop)
                tls = self._tls_context() if origin.tls else None
                return await open_connection(origin, addresses, tls)
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
