"""Why an upstream gave no response: the kinds of :class:`UpstreamFailure`,
and their words.

``kind`` is one of ``connect`` (refused, unreachable, DNS, TLS),
``connect_timeout``, ``disconnected`` (closed before a response),
``bad_response`` (not HTTP) and ``reset`` (any other socket error).
``detail`` says the same in the words README "Choosing an upstream" lists,
which an operator reads in the error a request ends with and in the server
log. The words come from fixed phrases, the host and port connected to
(neither is a secret) and the C library's error text; never a header value,
a key, a URL's path or query. The realtime relay's WebSocket handshake uses
the same words for the same failures.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from aiohttp.client_exceptions import ClientError, ServerDisconnectedError
from aiohttp.http_exceptions import HttpProcessingError

__all__ = [
    "BAD_RESPONSE",
    "DISCONNECTED",
    "UpstreamFailure",
    "connect_failure",
    "connect_timeout",
    "failure_before_head",
    "reset",
    "where",
]

DISCONNECTED = "closed the connection before answering"
BAD_RESPONSE = "answered something that is not HTTP"


class UpstreamFailure(Exception):
    """The upstream gave no response; ``kind`` says why, ``detail`` in words
    with the address when there is one (see the module docstring).

    Neither ever holds request headers (they carry the upstream key)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(kind)
        self.kind = kind
        self.detail = detail


def failure_before_head(exc: BaseException) -> UpstreamFailure | None:
    """The failure that ``exc``, raised after the request went out and before
    the response head, means; None for what passes as it is (an
    :class:`UpstreamFailure` already, a cancel, the response deadline's
    ``TimeoutError``, or a bug)."""
    if isinstance(exc, UpstreamFailure | asyncio.CancelledError | TimeoutError):
        return None
    if isinstance(exc, ServerDisconnectedError):
        return UpstreamFailure("disconnected", DISCONNECTED)
    if isinstance(exc, HttpProcessingError):
        return UpstreamFailure("bad_response", BAD_RESPONSE)
    if isinstance(exc, ClientError | OSError):
        return UpstreamFailure("reset", reset(exc))
    return None


def where(host: str, port: int) -> str:
    """``host:port``, an IPv6 literal in brackets (RFC 3986 §3.2.2)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect_failure(exc: OSError, host: str, port: int) -> str:
    """Why a connection to ``host:port`` could not be made (DNS, refused, TLS, ...)."""
    if isinstance(exc, socket.gaierror):
        return f"DNS lookup of {host} failed ({exc.strerror or 'no address'})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS handshake with {where(host, port)} failed "
            f"(certificate verify failed: {exc.verify_message})"
        )
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake with {where(host, port)} failed ({exc.reason or 'error'})"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused at {where(host, port)}"
    return f"cannot connect to {where(host, port)} ({_reason(exc)})"


def connect_timeout(seconds: float, host: str, port: int) -> str:
    return f"no connection to {where(host, port)} within {seconds:g} s"


def reset(exc: BaseException) -> str:
    """The connection broke before the response head (not a clean close)."""
    return f"connection broken before answering ({_reason(exc)})"


def _reason(exc: BaseException) -> str:
    # strerror is the C library's fixed text ("Connection reset by peer");
    # str(exc) could hold anything a library put there, so it is never used.
    strerror = getattr(exc, "strerror", None)
    return strerror if isinstance(strerror, str) and strerror else type(exc).__name__
