"""The send bound on a client that stops reading (``server.send_timeout``).

A response write may wait at most ``server.send_timeout`` for a client that
takes no bytes, the bound nginx calls ``send_timeout``: without it a client
that stops reading holds its stream, and the upstream request behind it, for
as long as it likes, since the relay stops reading the upstream while the
client is not keeping up (README, "Slow and oversized clients"; docs/faults.md,
"A client that stops reading").
"""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios
from typing import Final, Protocol

from ..client.timers import Ticker

__all__ = ["SendWatch", "Watched"]

# Linux's ioctl for the bytes a TCP socket has sent (or queued) that its peer
# has not acknowledged yet (SIOCOUTQ, tcp(7); the same number as TIOCOUTQ).
_SIOCOUTQ: Final = getattr(termios, "TIOCOUTQ", None)
_INT: Final = struct.Struct("i")
_INT_ZERO: Final = bytes(_INT.size)


class Watched(Protocol):
    """A client connection the watch can bound (connections.py's
    ``GuardedRequestHandler``)."""

    transport: asyncio.Transport | None

    def cut_stalled(self, timeout: float) -> None:
        """Abort the connection: its client took nothing for ``timeout`` seconds."""


def _untaken(transport: asyncio.Transport) -> int:
    """Response bytes the client has not taken yet: those in the transport's
    buffer and, where the system tells, those in the kernel's send queue.

    The kernel's part is what shows a slow reader's progress: a client that
    reads opens its TCP window, the kernel sends and the peer acknowledges.
    The transport's buffer alone moves only when a third of the kernel's send
    buffer (megabytes, on a fast link) has drained, which can take a slow but
    steady reader longer than the bound.
    """
    untaken = transport.get_write_buffer_size()
    if _SIOCOUTQ is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                queued = fcntl.ioctl(sock.fileno(), _SIOCOUTQ, _INT_ZERO)
            except OSError:
                return untaken
            untaken += _INT.unpack(queued)[0]
    return untaken


class _Backlog:
    """One held connection: the bytes its client had not taken at the last
    look, and since when it has taken none."""

    __slots__ = ("since", "untaken")

    def __init__(self, untaken: int, since: float) -> None:
        self.untaken = untaken
        self.since = since


class SendWatch(Ticker):
    """The send bound of one server's client connections (``server.send_timeout``).

    Contract: a connection whose writes are held (its transport paused
    writing: the buffer is above the high-water mark, so a write would wait)
    is aborted once its client has taken no byte for ``timeout``: between 1
    and 1.25 times the bound after its last progress or the pause, whichever
    is later, never earlier (see :class:`~proxy.client.timers.Ticker`). Progress is
    any fall in the bytes not yet taken (:func:`_untaken`). A connection is
    watched only from the pause to the resume of its writing, so nothing runs
    per write: a relay that keeps up never enters the watch. The abort ends
    the handler as a client leaving does (the upstream request behind it is
    closed); the handler's ``stalled`` says why.
    """

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout
        self._held: dict[Watched, _Backlog] = {}

    def watch(self, handler: Watched, transport: asyncio.Transport) -> None:
        """Bound the wait of ``handler``'s writes from now on."""
        now = asyncio.get_running_loop().time()
        self._held[handler] = _Backlog(_untaken(transport), now)
        self._arm(self.timeout)

    def forget(self, handler: Watched) -> None:
        """Stop watching ``handler`` (its writing resumed, or it closed)."""
        self._held.pop(handler, None)

    def _check(self, now: float) -> bool:
        gone: list[Watched] = []
        stalled: list[Watched] = []
        for handler, backlog in self._held.items():
            transport = handler.transport
            if transport is None or transport.is_closing():
                gone.append(handler)
                continue
            untaken = _untaken(transport)
            if untaken < backlog.untaken:
                backlog.since = now
            elif now - backlog.since >= self.timeout:
                stalled.append(handler)
            # Bytes written while held are not progress; only a fall from here is.
            backlog.untaken = untaken
        for handler in gone:
            del self._held[handler]
        for handler in stalled:
            del self._held[handler]
            handler.cut_stalled(self.timeout)
        return bool(self._held)
