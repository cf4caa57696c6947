"""What a client connection may cost before a request reaches a handler.

aiohttp bounds the size of a request head (line, field and header-count
limits) but not the time it takes to arrive, so a client sending one header
byte every few seconds (slowloris) holds a connection and a task for as long
as it likes. When the proxy is exposed directly (a PaaS without nginx in
front), it bounds that itself (reliability.md B.19, Decision 6):

- the first request head on a connection must be complete within
  ``server.header_timeout`` of the connection opening; a timer started in
  ``connection_made`` checks it once, so nothing runs per request or per read;
- after a response, the next request head must be complete within
  ``server.keepalive_timeout`` (aiohttp's keep-alive timer, which is not
  extended by incoming bytes, so it bounds idle time and a dribbled head alike);
- a request body may go silent for at most ``server.body_idle_timeout``
  (``bodies.read_body``).

A request head the HTTP parser refuses (CL/TE conflicts, bad framing, control
characters, oversized lines, too many headers) is answered in OpenAI's error
shape and the connection closed; the refusal is logged as one line that never
quotes the offending bytes (they can hold a client's key).

:func:`expect_continue` answers ``Expect: 100-continue`` for the proxy's
catch-all route: a body declared larger than ``server.max_body_bytes`` gets its
413 before the client sends it (reliability.md A.14).

Every request refused here, before any view runs, still leaves its trace like
any other (README, "Access log"): one access-log line and its count in the
metrics. That takes the request's method and path, which aiohttp does not
keep for a head its parser refused; so the first bytes of each head are kept
until the head is parsed (a reference to the chunk that held it, dropped at
once when the head is fine), and a refusal reads its request line from them.
A refused head without a readable request line (garbage, a TLS handshake on
the plain port, a broken or oversized request line) is not a request to log;
a connection that sent nothing before the header deadline is not either.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from .admission import identify
from .errors import (
    ERROR_HEADER,
    ExpectationFailed,
    HeadersTooLarge,
    InvalidRequest,
    ProxyError,
    RequestTimeout,
    RequestTooLarge,
    error_body,
    error_response,
)
from .keys import OBSERVER, RUNTIME
from .observe import OUR_REQUEST_ID_HEADER, Exchange, Observer, new_request_id, request_id_for
from .settings import ServerSettings

__all__ = [
    "GuardedRequestHandler",
    "GuardedServer",
    "ProxyRunner",
    "close_without_lingering",
    "expect_continue",
]

log = logging.getLogger("oaimux.connections")

_HEAD_TIMEOUT = RequestTimeout("The request headers did not arrive in time.")
_HEAD_TIMEOUT_BODY = error_body(_HEAD_TIMEOUT.message, _HEAD_TIMEOUT.type, _HEAD_TIMEOUT.code)

# How much of a head's start is kept to read its request line from: the
# longest request line the parser accepts (server_options' max_line_size).
_HEAD_START_LIMIT = 8192
# RFC 9112 §3: method SP request-target SP HTTP-version CRLF, after any empty
# lines (§2.2). The target as the parser would take it: visible ASCII only.
_REQUEST_LINE = re.compile(
    rb"(?:\r?\n)*([!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}) ([!-~]{1,8190}) HTTP/[0-9]\.[0-9]\r?\n"
)


def _request_line(head_start: bytes) -> tuple[str, str] | None:
    """Method and path (without the query, which can carry a key) of the head
    that starts with ``head_start``, when its request line is complete and readable."""
    match = _REQUEST_LINE.match(head_start)
    if match is None:
        return None
    target = match[2].decode("ascii")
    return match[1].decode("ascii"), target.partition("?")[0][:512]


def _head_timeout_response(request_id: str) -> bytes:
    """The 408 written raw: no request object exists when the head never completed."""
    return (
        f"HTTP/1.1 408 Request Timeout\r\n"
        f"Content-Type: application/json\r\n"
        f"Content-Length: {len(_HEAD_TIMEOUT_BODY)}\r\n"
        f"Connection: close\r\n"
        f"{ERROR_HEADER}: {_HEAD_TIMEOUT.code}\r\n"
        f"{OUR_REQUEST_ID_HEADER}: {request_id}\r\n\r\n"
    ).encode() + _HEAD_TIMEOUT_BODY


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection protocol with a deadline for the first request head,
    and parser refusals answered as OpenAI JSON, logged and counted."""

    __slots__ = ("_body", "_head_deadline", "_head_start", "_head_timeout", "_observer")

    def __init__(
        self,
        manager: web.Server,
        *,
        head_timeout: float,
        observer: Observer | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = head_timeout
        self._head_deadline: asyncio.TimerHandle | None = None
        self._observer = observer
        self._head_start = b""  # the bytes of a head not parsed yet (see the module docstring)
        self._body: StreamReader | None = None  # the body still arriving, if any

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._head_deadline = self._loop.call_later(self._head_timeout, self._head_overdue)

    def data_received(self, data: bytes) -> None:
        body = self._body
        if body is not None and body.is_eof():
            body = self._body = None
        if body is None and not self._upgraded:
            # Between bodies: these bytes start, or continue, a request head.
            start = self._head_start
            if len(start) < _HEAD_START_LIMIT:
                self._head_start = start + data if start else data
        super().data_received(data)
        messages = self._messages
        if messages:
            self._drop_head_timers()
            message, payload = messages[-1]
            if type(message) is not _ErrInfo:  # a refusal keeps them for handle_error
                self._head_start = b""
                self._body = payload

    def _drop_head_timers(self) -> None:
        """A request head is in: drop the timers that only bound its arrival.

        Neither can act while the request runs, yet each holds a timer handle
        for the life of a stream (memory per open stream is an issue 8 goal).
        The head deadline only concerns the first head. aiohttp's keep-alive
        timer only closes a connection waiting for a head; firing during a
        request it merely drops itself, and aiohttp arms it anew once the
        response is written (``RequestHandler.start``, aiohttp 3.14), so the
        time allowed for the next head is unchanged.
        """
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        super().connection_lost(exc)

    def _head_overdue(self) -> None:
        self._head_deadline = None
        # _request_count counts request heads the parser completed (bad ones too).
        transport = self.transport
        if self._request_count or transport is None:
            return
        request_id = new_request_id()
        transport.write(_head_timeout_response(request_id))
        self.force_close()  # closes after the 408 is flushed
        if self._head_start and self._observer is not None:
            # Part of a head came (a connection that sent nothing made no request).
            method, path = _request_line(self._head_start) or ("-", "-")
            peer = transport.get_extra_info("peername")
            ex = Exchange(request_id, method, path, peer[0] if peer else "-")
            # It arrived when the connection opened.
            ex.started -= self._head_timeout
            ex.started_wall -= self._head_timeout
            self._observer.refused(ex, _HEAD_TIMEOUT, len(_HEAD_TIMEOUT_BODY))
        self._head_start = b""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError) or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        # One line, no bytes from the request: a malformed header can hold a key,
        # and a flood of these must not become a flood of tracebacks.
        level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.INFO
        log.log(
            level, "refused a malformed request from %s (%s)", request.remote, type(exc).__name__
        )
        err: ProxyError
        if isinstance(exc, LineTooLong) or "Too many headers" in str(exc.message):
            err = HeadersTooLarge("The request line or headers are too large.")
        else:
            err = InvalidRequest(
                "The request is not valid HTTP/1.1 and was refused.", code="malformed_request"
            )
        resp = error_response(err)
        resp.force_close()
        request_id = new_request_id()
        resp.headers[OUR_REQUEST_ID_HEADER] = request_id
        line = _request_line(self._head_start)
        self._head_start = b""
        if line is not None and self._observer is not None:
            ex = Exchange(request_id, line[0], line[1], request.remote or "-")
            assert isinstance(resp.body, bytes)
            self._observer.refused(ex, err, len(resp.body))
        return resp


class GuardedServer(web.Server):
    """``web.Server`` that makes :class:`GuardedRequestHandler` connections."""

    def __init__(
        self, handler: Any, *, head_timeout: float, observer: Observer | None, **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self.head_timeout = head_timeout
        self.observer = observer

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(
            self,
            loop=self._loop,
            head_timeout=self.head_timeout,
            observer=self.observer,
            **self._kwargs,
        )


class ProxyRunner(web.AppRunner):
    """``web.AppRunner`` for the proxy: slow-client bounds from ``server`` settings.

    Extra keyword arguments go to aiohttp's server as with ``AppRunner``
    (``handler_cancellation``, ``shutdown_timeout``, ``server_options()``).
    """

    def __init__(self, app: web.Application, server: ServerSettings, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", server.keepalive_timeout)
        super().__init__(app, **kwargs)
        self.head_timeout = server.header_timeout

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return GuardedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            head_timeout=self.head_timeout,
            observer=self._app.get(OBSERVER),
            **plain._kwargs,
        )


def close_without_lingering(request: web.BaseRequest) -> None:
    """Close the connection as soon as the answer is written.

    aiohttp otherwise keeps reading an unfinished body for up to
    ``lingering_time`` (10 s) so a client still sending can read the answer.
    A client that stalled or broke the body's framing is sent nothing more
    useful by waiting, and its connection cannot be reused.
    """
    protocol = request.protocol
    if isinstance(protocol, RequestHandler):
        protocol._lingering_time = 0.0
        protocol._keepalive = False


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
    resp = error_response(err)
    resp.force_close()
    resp.headers[OUR_REQUEST_ID_HEADER] = ex.request_id
    resp.headers["x-request-id"] = ex.request_id
    assert isinstance(resp.body, bytes)
    request.app[OBSERVER].refused(ex, err, len(resp.body))
    return resp
