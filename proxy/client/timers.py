"""One timer for many bounds: the pool's response deadlines and idle watch,
and (through :class:`Ticker`) the server's send watch of slow clients.

The server's send watch (server/send_watch.py) imports :class:`Ticker` from
here: the server sits above the client in the package's layers, so that
import runs downward, and the top level of the package stays small.
"""

from __future__ import annotations

import asyncio
import math

from aiohttp.client_exceptions import SocketTimeoutError
from aiohttp.streams import StreamReader

from .connection import Connection

__all__ = ["Deadlines", "IdleWatch", "Ticker"]


class Ticker:
    """One timer for many bounds instead of a timer each (a timer per request
    cost ~9 µs of the bench machine's CPU, and ~1 KB of each open stream:
    bench/README.md, findings 1 and 4).

    It ticks every eighth of the shortest bound armed, while :meth:`_check`
    says something is still watched. A bound is met at most one tick late,
    and with the tick that sees progress also up to one tick late, 1.25
    times a bound at worst; never early. An eighth (not a quarter) because
    bounds differ per upstream and a longer one is rarely a whole number of
    ticks.
    """

    def __init__(self) -> None:
        self._timer: asyncio.TimerHandle | None = None
        self._tick = math.inf

    def _arm(self, bound: float) -> None:
        tick = bound / 8
        if tick < self._tick:
            if self._timer is not None:
                self._timer.cancel()
            self._tick = tick
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + tick, self._on_tick)

    def _on_tick(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        if not self._check(now):
            self._tick = math.inf
        elif self._timer is None:  # _arm may have run from a callback of _check
            self._timer = loop.call_at(now + self._tick, self._on_tick)

    def _check(self, now: float) -> bool:
        """Act on the bounds due at ``now``; whether any is still watched."""
        raise NotImplementedError

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Deadlines(Ticker):
    """Response deadlines of the requests waiting for their head: a request is
    failed with ``TimeoutError`` between 1 and 1.125 times its timeout."""

    def __init__(self) -> None:
        super().__init__()
        self._due: dict[Connection, float] = {}

    def watch(self, conn: Connection, deadline: float, timeout: float) -> None:
        self._due[conn] = deadline
        self._arm(timeout)

    def forget(self, conn: Connection) -> None:
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


class IdleWatch(Ticker):
    """Idle bounds of the response bodies being read (see :class:`Ticker`).

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
        self._watched: dict[Connection, _Silence] = {}

    def watch(self, conn: Connection, limit: float, body: StreamReader) -> None:
        """Bound the silence of ``body``, read from ``conn``, from now on
        (replacing any watch of ``conn``)."""
        now = asyncio.get_running_loop().time()
        self._watched[conn] = _Silence(body, limit, body.total_bytes, now)
        self._arm(limit)

    def forget(self, conn: Connection) -> None:
        """Stop watching ``conn`` (its response was released or closed)."""
        self._watched.pop(conn, None)

    def _check(self, now: float) -> bool:
        gone: list[Connection] = []
        silent: list[Connection] = []
        for conn, silence in self._watched.items():
            body = silence.body
            if body.is_eof() or conn.transport is None:
                gone.append(conn)
            elif body.total_bytes != silence.seen or conn.reading_paused:
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
