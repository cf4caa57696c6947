"""What a client connection may cost before a request reaches a handler.

aiohttp bounds the size of a request head (line, field and header-count
limits) but not the time it takes to arrive, so a client sending one header
byte every few seconds (slowloris) holds a connection and a task for as long
as it likes. When the proxy is exposed directly (a PaaS without nginx in
front), it bounds that itself (README, "Slow and oversized clients"; each
fault and the test that holds it: docs/faults.md, "Oversized and slow clients"):

- the first request head on a connection must be complete within
  ``server.header_timeout`` of the connection opening; a timer started in
  ``connection_made`` checks it once, so nothing runs per request or per read;
- after a response, the next request head must be complete within
  ``server.keepalive_timeout`` (aiohttp's keep-alive timer, which is not
  extended by incoming bytes, so it bounds idle time and a dribbled head alike);
- a request body may go silent for at most ``server.body_idle_timeout`` and
  take at most ``server.body_timeout`` in all (``bodies.read_body``);
- a response write may wait at most ``server.send_timeout`` for a client that
  takes no bytes (:class:`SendWatch`), the bound nginx calls ``send_timeout``:
  without it a client that stops reading holds its stream, and the upstream
  request behind it, for as long as it likes, since the relay stops reading
  the upstream while the client is not keeping up.

A request head the HTTP parser refuses (CL/TE conflicts, bad framing, control
characters, oversized lines, too many headers) is answered in OpenAI's error
shape and the connection closed; the refusal is logged as one line that never
quotes the offending bytes (they can hold a client's key).

:func:`expect_continue` answers ``Expect: 100-continue`` for the proxy's
catch-all route: a body declared larger than ``server.max_body_bytes`` gets its
413 before the client sends it (docs/faults.md, "Declared body over the limit").

Stopping (:class:`ProxyRunner` ``cleanup``, README "Stop, reload, workers")
keeps one deadline, ``server.shutdown_grace_seconds`` after the listeners
close: idle connections close at once, requests in flight run until the
deadline, and whatever is still open then is aborted (a broken response,
never a clean end). aiohttp's own ``RequestHandler.shutdown(timeout)`` waits
``timeout``, cancels the request payload, then waits ``timeout`` again before
it cancels the handler, so a stream that outlives the grace would hold the
stop for twice the grace (a relay waits on the upstream, not on the payload).

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
import fcntl
import logging
import re
import struct
import termios
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from .. import SERVER
from ..client.timers import Ticker
from ..config.settings import ServerSettings
from ..errors import (
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
from ..inbound.body import close_without_lingering
from ..inbound.head import identify
from ..observe import OUR_REQUEST_ID_HEADER, Exchange, Outcome, new_request_id, request_id_for
from ..observe.observer import Observer
from .keys import OBSERVER, RUNTIME

__all__ = [
    "GuardedRequestHandler",
    "GuardedServer",
    "ProxyRunner",
    "SendWatch",
    "client_outcome",
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


# Linux's ioctl for the bytes a TCP socket has sent (or queued) that its peer
# has not acknowledged yet (SIOCOUTQ, tcp(7); the same number as TIOCOUTQ).
_SIOCOUTQ: Final = getattr(termios, "TIOCOUTQ", None)
_INT: Final = struct.Struct("i")
_INT_ZERO: Final = bytes(_INT.size)


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
        self._held: dict[GuardedRequestHandler, _Backlog] = {}

    def watch(self, handler: GuardedRequestHandler, transport: asyncio.Transport) -> None:
        """Bound the wait of ``handler``'s writes from now on."""
        now = asyncio.get_running_loop().time()
        self._held[handler] = _Backlog(_untaken(transport), now)
        self._arm(self.timeout)

    def forget(self, handler: GuardedRequestHandler) -> None:
        """Stop watching ``handler`` (its writing resumed, or it closed)."""
        self._held.pop(handler, None)

    def _check(self, now: float) -> bool:
        gone: list[GuardedRequestHandler] = []
        stalled: list[GuardedRequestHandler] = []
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
        f"Server: {SERVER}\r\n"
        f"{ERROR_HEADER}: {_HEAD_TIMEOUT.code}\r\n"
        f"{OUR_REQUEST_ID_HEADER}: {request_id}\r\n\r\n"
    ).encode() + _HEAD_TIMEOUT_BODY


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection protocol with a deadline for the first request head,
    a bound on writes a client does not take, and parser refusals answered as
    OpenAI JSON, logged and counted."""

    __slots__ = (
        "_body",
        "_ended",
        "_head_deadline",
        "_head_start",
        "_head_timeout",
        "_observer",
        "_send_watch",
        "stalled",
    )

    def __init__(
        self,
        manager: web.Server,
        *,
        head_timeout: float,
        send_watch: SendWatch,
        observer: Observer | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = head_timeout
        self._head_deadline: asyncio.TimerHandle | None = None
        self._ended: asyncio.Future[None] | None = None
        self._send_watch = send_watch
        # Set when the send bound closed the connection (access log: client_stalled).
        self.stalled = False
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
        for the life of a stream (docs/decisions.md, "Memory per open stream is
        a budget").
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
        self._send_watch.forget(self)
        handler = self._task_handler  # cleared (and cancelled) by aiohttp below
        super().connection_lost(exc)
        if self._ended is not None:
            _resolve_after(self._ended, handler)

    @property
    def busy(self) -> bool:
        """A request is being handled, or its head is in and waits its turn."""
        return self._request_in_progress or bool(self._messages)

    def ended(self) -> asyncio.Future[None]:
        """Done once the connection is closed and its handler has returned.

        Made on demand: only a stopping server asks, so a connection costs
        nothing more while it serves.
        """
        if self._ended is None:
            self._ended = self._loop.create_future()
            if self._manager is None:  # aiohttp clears it when the connection is lost
                self._ended.set_result(None)
        return self._ended

    def abort(self) -> None:
        """Reset the connection and cancel its handler, whatever it is doing.

        The client sees a broken response (no terminating chunk, or fewer
        bytes than announced), never a clean end.
        """
        if self.transport is not None:
            self.transport.abort()  # its connection_lost cancels the handler
        if self._task_handler is not None:
            self._task_handler.cancel()

    def pause_writing(self) -> None:
        # Called by the transport when its buffer crosses the high-water
        # mark; from here a write waits for the client.
        super().pause_writing()
        if self.transport is not None:
            self._send_watch.watch(self, self.transport)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._send_watch.forget(self)

    def cut_stalled(self, timeout: float) -> None:
        """Abort the connection: its client took nothing for ``timeout`` seconds."""
        transport = self.transport
        if transport is None:
            return
        self.stalled = True
        peer = transport.get_extra_info("peername")
        log.info(
            "closed the connection of %s: it took no response bytes for %gs (server.send_timeout)",
            peer[0] if isinstance(peer, tuple) else "-",
            timeout,
        )
        # Wakes a write waiting in drain() and, with handler_cancellation,
        # cancels the handler, which closes the upstream request.
        transport.abort()

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
            resp = super().handle_error(request, status, exc, message)
            resp.headers["Server"] = SERVER
            return resp
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


def _resolve_after(ended: asyncio.Future[None], handler: asyncio.Task[None] | None) -> None:
    if handler is None or handler.done():
        if not ended.done():
            ended.set_result(None)
    else:
        handler.add_done_callback(lambda _: _resolve_after(ended, None))


# Once the grace is over and the rest aborted, the cancelled handlers get this
# long to let go of what they hold (upstream connections, access lines), and
# the app's cleanup (upstream pools, Redis) as long again: the whole stop stays
# within the grace plus one second (README "Stop, reload, workers").
ABORT_WAIT = 0.25
CLEANUP_WAIT = 0.25


class GuardedServer(web.Server):
    """``web.Server`` that makes :class:`GuardedRequestHandler` connections, all
    watched by one :class:`SendWatch`, and stops within a deadline (see the
    module docstring)."""

    def __init__(
        self,
        handler: Any,
        *,
        head_timeout: float,
        send_timeout: float,
        observer: Observer | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.head_timeout = head_timeout
        self.send_watch = SendWatch(send_timeout)
        self.observer = observer
        self.stop_began: float | None = None
        self.finished = 0  # connections that ended by themselves while stopping
        self.cut = 0  # requests still running at the deadline, aborted

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(
            self,
            loop=self._loop,
            head_timeout=self.head_timeout,
            send_watch=self.send_watch,
            observer=self.observer,
            **self._kwargs,
        )

    def guarded(self) -> list[GuardedRequestHandler]:
        return [c for c in self._connections if isinstance(c, GuardedRequestHandler)]

    def pre_shutdown(self) -> None:
        """The listeners are closed (aiohttp calls this right after): the
        grace starts now. No connection takes another request; idle ones close."""
        self.stop_began = self._loop.time()
        super().pre_shutdown()
        for conn in self.guarded():
            if not conn.busy:
                conn.force_close()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Let the requests in flight run for up to ``timeout`` seconds from
        :meth:`pre_shutdown` (``None``: as long as they take), then abort every
        connection still open."""
        conns = self.guarded()
        if timeout is not None:
            began = self.stop_began if self.stop_began is not None else self._loop.time()
            deadline: float | None = began + timeout
        else:
            deadline = None
        left = await _wait_ended(conns, deadline)
        self.finished = len(conns) - len(left)
        self.cut = sum(1 for conn in left if conn.busy)
        for conn in left:
            conn.abort()
        if left:
            await _wait_ended(left, self._loop.time() + ABORT_WAIT)
        self._connections.clear()


async def _wait_ended(
    conns: list[GuardedRequestHandler], deadline: float | None
) -> list[GuardedRequestHandler]:
    """Wait until every connection ended or ``deadline`` (loop time) passed;
    return those still open."""
    pending = {conn.ended(): conn for conn in conns}
    if pending:
        loop = asyncio.get_running_loop()
        timeout = None if deadline is None else max(0.0, deadline - loop.time())
        await asyncio.wait(pending, timeout=timeout)
    return [conn for future, conn in pending.items() if not future.done()]


class ProxyRunner(web.AppRunner):
    """``web.AppRunner`` for the proxy: slow-client bounds and the stop's grace
    (``shutdown_grace_seconds``) from ``server`` settings.

    Extra keyword arguments go to aiohttp's server as with ``AppRunner``
    (``handler_cancellation``, ``server_options()``).
    """

    def __init__(self, app: web.Application, server: ServerSettings, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", server.keepalive_timeout)
        super().__init__(app, shutdown_timeout=server.shutdown_grace_seconds, **kwargs)
        self.head_timeout = server.header_timeout
        self.send_timeout = server.send_timeout
        self.grace = server.shutdown_grace_seconds

    @property
    def server(self) -> GuardedServer | None:
        server = super().server
        return server if isinstance(server, GuardedServer) else None

    async def shutdown(self) -> None:
        """The app's ``on_shutdown`` hooks (open WebSockets get 1001), within
        the grace: aiohttp runs them between closing the listeners and
        waiting for the requests in flight."""
        server = self.server
        began = server.stop_began if server is not None else None
        if began is None:
            await super().shutdown()
            return
        try:
            async with asyncio.timeout_at(began + self.grace):
                await super().shutdown()
        except TimeoutError:
            log.warning("the shutdown hooks outlasted the grace; what is left is aborted")

    async def _cleanup_server(self) -> None:
        """The app's cleanup (upstream pools, Redis), bounded: the process
        exits next, and the stop has its deadline to keep."""
        try:
            async with asyncio.timeout(CLEANUP_WAIT):
                await super()._cleanup_server()
        except TimeoutError:
            log.warning("the app's cleanup took over %gs; leaving the rest to exit", CLEANUP_WAIT)

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return GuardedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            head_timeout=self.head_timeout,
            send_timeout=self.send_timeout,
            observer=self._app.get(OBSERVER),
            **plain._kwargs,
        )


def client_outcome(request: web.BaseRequest) -> Outcome:
    """The access-log outcome of a client that left mid-response: ``client_stalled``
    when the send bound closed its connection, ``client_gone`` otherwise."""
    protocol = request.protocol
    if isinstance(protocol, GuardedRequestHandler) and protocol.stalled:
        return "client_stalled"
    return "client_gone"


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
