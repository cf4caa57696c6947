"""What happened at each upstream a request tried, in words an operator can act on.

The fallback walks (forward.py, realtime.py) note every attempt that did not
end in an answer, in order, as ``<upstream>: <what happened>``::

    openai: answered 401 (credential refused); local: connection refused at 127.0.0.1:11434

and the error that ends a walk (``upstream_unavailable``, ``upstream_timeout``,
``upstream_auth_failed``) carries that list in its message; the server log
gets it once, as a warning. The words come from fixed phrases, upstream names,
status codes, configured timeouts, and the host and port the proxy connected
to (neither is a secret); never a header value, a key, a URL's path or query,
or an upstream's response body. The words for an upstream that gave no
response (refused, reset, not HTTP, ...) are the client's
(proxy/client/failures.py); those here are the walk's own.
"""

from __future__ import annotations

import logging
from enum import Enum

from .errors import (
    ProxyError,
    RateLimited,
    UpstreamAuthFailed,
    UpstreamTimeout,
    UpstreamUnavailable,
)

__all__ = ["CIRCUIT_OPEN", "Attempts", "Ending", "answered", "no_headers_within"]

log = logging.getLogger("oaimux.upstream")

CIRCUIT_OPEN = "circuit open"


def answered(status: int, credential_refused: bool = False) -> str:
    return f"answered {status} (credential refused)" if credential_refused else f"answered {status}"


def no_headers_within(seconds: float) -> str:
    return f"no response headers within {seconds:g} s"


class Ending(Enum):
    """How a walk that found no answer ends: the error it answers with."""

    UNAVAILABLE = "unavailable"  # 502 upstream_unavailable
    TIMEOUT = "timeout"  # 504 upstream_timeout
    CREDENTIAL_REFUSED = "credential_refused"  # 502 upstream_auth_failed
    HANDSHAKE_REFUSED = "handshake_refused"  # 502 upstream_refused_handshake (realtime)
    HANDSHAKE_RATE_LIMITED = "handshake_rate_limited"  # 429 upstream_rate_limited (realtime)


class Attempts:
    """The attempts of one request that ended without an answer, in order.

    Made only once something failed or was skipped: a request answered at the
    first try never builds one.
    """

    __slots__ = ("_notes", "last_failed")

    def __init__(self) -> None:
        self._notes: list[tuple[str, str]] = []
        # The upstream whose attempt failed last (skips aside); None: only skips.
        self.last_failed: str | None = None

    @property
    def failed(self) -> bool:
        """Was an attempt made that failed (not only upstreams skipped)?"""
        return self.last_failed is not None

    def note(self, upstream: str, what: str) -> None:
        self._notes.append((upstream, what))
        if what != CIRCUIT_OPEN:
            self.last_failed = upstream

    def summary(self) -> str:
        """``a: what; b: what``; a retry that ended the same way is counted, not repeated."""
        parts: list[str] = []
        previous: tuple[str, str] | None = None
        times = 0
        for note in [*self._notes, None]:
            if note == previous:
                times += 1
                continue
            if previous is not None:
                text = f"{previous[0]}: {previous[1]}"
                parts.append(f"{text} ({times} tries)" if times > 1 else text)
            previous, times = note, 1
        return "; ".join(parts)

    def error(self, ending: Ending, request_id: str) -> ProxyError:
        """The error that ends the walk, naming what happened at each upstream in
        order; the same words go to the server log, once, as a warning."""
        summary = self.summary()
        log.warning("no upstream answered: %s [request %s]", summary, request_id)
        if ending is Ending.TIMEOUT:
            return UpstreamTimeout(f"No upstream answered in time: {summary}.")
        if ending is Ending.CREDENTIAL_REFUSED:
            return UpstreamAuthFailed(
                f"The upstream '{self.last_failed}' refused the proxy's credential: a "
                f"configuration problem of the proxy, not of your request. Tried: {summary}."
            )
        if ending is Ending.HANDSHAKE_RATE_LIMITED:
            return RateLimited(
                f"No upstream accepted the WebSocket handshake: {summary}.",
                code="upstream_rate_limited",
            )
        if ending is Ending.HANDSHAKE_REFUSED:
            return UpstreamUnavailable(
                f"No upstream accepted the WebSocket handshake: {summary}.",
                code="upstream_refused_handshake",
            )
        return UpstreamUnavailable(f"No upstream could answer: {summary}.")
