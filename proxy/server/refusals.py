"""Requests refused before any view runs, answered in the error shape of their
path's dialect (OpenAI's, or Anthropic's on its paths: errors.error_response).

- A request head that did not arrive within ``server.header_timeout`` of the
  connection opening gets a 408, written raw: no request object exists for a
  head that never completed.
- A request head the HTTP parser refuses (CL/TE conflicts, bad framing,
  control characters, oversized lines, too many headers), or whose target is
  not in origin form (:class:`OtherTargetForm`), is answered as JSON
  and the connection closed; the refusal is logged as one line that never
  quotes the offending bytes (they can hold a client's key).
- :func:`expect_continue` answers ``Expect: 100-continue`` for the proxy's
  catch-all route: a body declared larger than ``server.max_body_bytes`` gets
  its 413 before the client sends it (docs/faults.md, "Declared body over the
  limit").

Every request refused here still leaves its trace like any other (README,
"Access log"): one access-log line and its count in the metrics. That takes
the request's method and path, which aiohttp does not keep for a head its
parser refused, so the connection keeps the first bytes of each head until it
is parsed (connections.py) and a refusal reads its request line from them. A
refused head without a readable request line (garbage, a TLS handshake on the
plain port, a broken or oversized request line) is not a request to log; a
connection that sent nothing before the header deadline is not either.
"""

from __future__ import annotations

import asyncio
import logging
import re

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, HttpProcessingError, LineTooLong

from .. import SERVER
from ..errors import (
    ERROR_HEADER,
    ExpectationFailed,
    HeadersTooLarge,
    InvalidRequest,
    ProxyError,
    RequestTimeout,
    RequestTooLarge,
    error_response,
)
from ..inbound.body import close_without_lingering
from ..inbound.head import identify
from ..observe import OUR_REQUEST_ID_HEADER, Exchange, new_request_id, request_id_for
from ..observe.observer import Observer
from .keys import OBSERVER, RUNTIME

__all__ = [
    "HEAD_START_LIMIT",
    "OtherTargetForm",
    "expect_continue",
    "refuse_late_head",
    "refuse_malformed",
]

log = logging.getLogger("oaimux.connections")

_HEAD_TIMEOUT = RequestTimeout("The request headers did not arrive in time.")

# How much of a head's start is kept to read its request line from: the
# longest request line the parser accepts (server_options' max_line_size).
HEAD_START_LIMIT = 8192
# RFC 9112 §3: method SP request-target SP HTTP-version CRLF, after any empty
# lines (§2.2). The target as the parser would take it: visible ASCII only.
_REQUEST_LINE = re.compile(
    rb"(?:\r?\n)*([!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}) ([!-~]{1,8190}) HTTP/[0-9]\.[0-9]\r?\n"
)


class OtherTargetForm(BadHttpMessage):
    """A request target not in origin form (``/path?query``): an absolute URL,
    ``CONNECT``'s ``host:port`` or ``OPTIONS *``, as if the proxy were a forward
    proxy (docs/faults.md, "Absolute-form targets and CONNECT"). Refused by the
    connection (connections.py) before any view, like a head the parser refuses."""

    def __init__(self) -> None:
        super().__init__("Only origin-form request targets are accepted.")


def _request_line(head_start: bytes) -> tuple[str, str] | None:
    """Method and path (without the query, which can carry a key) of the head
    that starts with ``head_start``, when its request line is complete and readable."""
    match = _REQUEST_LINE.match(head_start)
    if match is None:
        return None
    target = match[2].decode("ascii").partition("?")[0]
    return match[1].decode("ascii"), _without_authority(target)[:512]


def _without_authority(target: str) -> str:
    """``target`` as logged and read for its dialect: an absolute form's path
    (``http://user:key@host/v1/x`` gives ``/v1/x``), a ``host:port`` without
    userinfo. A target's userinfo can be a credential (RFC 3986 §3.2.1)."""
    if target[:1] == "/" or target == "*":
        return target
    _, scheme_ends, rest = target.partition("://")
    if scheme_ends:
        return "/" + rest.partition("/")[2]
    return target.rpartition("@")[2]


def _head_timeout_body(path: str) -> bytes:
    """The 408's body, in the dialect of ``path`` (its request line's, when it came)."""
    body = error_response(_HEAD_TIMEOUT, path).body
    assert isinstance(body, bytes)
    return body


def _head_timeout_response(request_id: str, body: bytes) -> bytes:
    """The 408 written raw: no request object exists when the head never completed."""
    return (
        f"HTTP/1.1 408 Request Timeout\r\n"
        f"Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Connection: close\r\n"
        f"Server: {SERVER}\r\n"
        f"{ERROR_HEADER}: {_HEAD_TIMEOUT.code}\r\n"
        f"{OUR_REQUEST_ID_HEADER}: {request_id}\r\n\r\n"
    ).encode() + body


def refuse_late_head(
    transport: asyncio.Transport, head_start: bytes, observer: Observer | None, waited: float
) -> None:
    """Write the 408 of a head still incomplete ``waited`` seconds after its
    connection opened, and log and count it when part of a head (``head_start``)
    came: a connection that sent nothing made no request. The caller closes the
    connection (once the 408 is flushed). Its body is in the dialect of the
    request line's path, like every refusal here."""
    request_id = new_request_id()
    line = _request_line(head_start)
    body = _head_timeout_body(line[1] if line is not None else "")
    transport.write(_head_timeout_response(request_id, body))
    if head_start and observer is not None:
        method, path = line or ("-", "-")
        peer = transport.get_extra_info("peername")
        ex = Exchange(request_id, method, path, peer[0] if peer else "-")
        # It arrived when the connection opened.
        ex.started -= waited
        ex.started_wall -= waited
        observer.refused(ex, _HEAD_TIMEOUT, len(body))


def refuse_malformed(
    request: web.BaseRequest,
    exc: HttpProcessingError,
    head_start: bytes,
    observer: Observer | None,
) -> web.Response:
    """The answer to a head the parser refused (``exc``), logged and counted."""
    # One line, no bytes from the request: a malformed header can hold a key,
    # and a flood of these must not become a flood of tracebacks.
    level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.INFO
    log.log(level, "refused a malformed request from %s (%s)", request.remote, type(exc).__name__)
    err: ProxyError
    if isinstance(exc, LineTooLong) or "Too many headers" in str(exc.message):
        err = HeadersTooLarge("The request line or headers are too large.")
    elif isinstance(exc, OtherTargetForm):
        err = InvalidRequest(exc.message, code="invalid_path")
    else:
        err = InvalidRequest(
            "The request is not valid HTTP/1.1 and was refused.", code="malformed_request"
        )
    line = _request_line(head_start)
    resp = error_response(err, line[1] if line is not None else "")
    resp.force_close()
    request_id = new_request_id()
    resp.headers[OUR_REQUEST_ID_HEADER] = request_id
    if line is not None and observer is not None:
        ex = Exchange(request_id, line[0], line[1], request.remote or "-")
        assert isinstance(resp.body, bytes)
        observer.refused(ex, err, len(resp.body))
    return resp


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` on the proxy route: refuse an oversized body before
    it is sent, otherwise let the client send it (RFC 9110 §10.1.1)."""
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":
        close_without_lingering(request)
        return _refuse(request, ExpectationFailed("Only 'Expect: 100-continue' is supported."))
    limit = request.app[RUNTIME].current.settings.server.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        # The client waits for our word before sending the body, so there is
        # nothing to drain; the connection cannot be reused without it.
        close_without_lingering(request)
        return _refuse(
            request,
            RequestTooLarge(f"The request body is larger than this proxy accepts ({limit} bytes)."),
        )
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the final response has not started
    return None


def _refuse(request: web.Request, err: ProxyError) -> web.Response:
    """Answer ``err`` for a request no view will see (aiohttp skips the
    middlewares after an expect handler's answer), logged and counted like any."""
    runtime = request.app[RUNTIME].current
    caller = identify(request, runtime)
    ex = Exchange(
        request_id_for(request),
        request.method,
        request.raw_path.partition("?")[0][:512],
        caller.address,
    )
    ex.key_name = caller.key.name if caller.key is not None else None
    resp = error_response(err, ex.path)
    resp.force_close()
    resp.headers[OUR_REQUEST_ID_HEADER] = ex.request_id
    resp.headers["x-request-id"] = ex.request_id
    assert isinstance(resp.body, bytes)
    request.app[OBSERVER].refused(ex, err, len(resp.body))
    return resp
