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
  take at most ``server.body_timeout`` in all (``inbound/body.py``);
- a response write may wait at most ``server.send_timeout`` for a client that
  takes no bytes (send_watch.py): the connection enters the watch when its
  writing pauses and leaves it when it resumes.

A head that came too late, or that the parser refused, is answered in
OpenAI's error shape, logged and counted (refusals.py). aiohttp does not keep
the method and path of a head its parser refused, so the first bytes of each
head are kept until the head is parsed (a reference to the chunk that held
it, dropped at once when the head is fine) for the refusal to read its
request line from.

The stop (drain.py) asks each connection whether it is busy, for a future
done once it has ended, and to abort.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, MutableSequence
from typing import Any, cast

from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from .. import SERVER
from ..client.connection import ShortQueue
from ..observe.observer import Observer
from .refusals import HEAD_START_LIMIT, OtherTargetForm, refuse_late_head, refuse_malformed
from .send_watch import SendWatch

__all__ = ["GuardedRequestHandler", "body_piped"]

log = logging.getLogger("oaimux.connections")


class _NagleOffAlready(BaseProtocol):
    """Sits between aiohttp's ``RequestHandler`` and ``BaseProtocol`` (method
    resolution order) to take the transport without ``BaseProtocol``'s
    ``TCP_NODELAY`` call: asyncio's and uvloop's TCP transports set it when
    they are made, and aiohttp's second call makes a socket object and two
    system calls per connection (docs/decisions.md, "An accepted connection
    costs no socket-option calls")."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)


class GuardedRequestHandler(RequestHandler, _NagleOffAlready):
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
        # Parsed request heads waiting for the handler: one at a time but for
        # pipelined requests, which aiohttp stops reading at 32 (see ShortQueue).
        self._messages = ShortQueue()  # type: ignore[assignment]
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
            if len(start) < HEAD_START_LIMIT:
                self._head_start = start + data if start else data
        super().data_received(data)
        messages = self._messages
        if messages:
            deadline = self._head_deadline
            if deadline is not None:
                # Met (only the first head has one). It cannot act while the
                # request runs, yet would hold a timer handle for the life of a
                # stream (docs/decisions.md, "Memory per open stream is a budget").
                deadline.cancel()
                self._head_deadline = None
            message, payload = messages[-1]
            if not isinstance(message, _ErrInfo):  # a refusal keeps them for handle_error
                if (message.path[:1] != "/" or len(messages) > 1) and _refuse_other_forms(messages):
                    return
                self._head_start = b""
                self._body = payload
                if message.upgrade:  # a WebSocket can stay open as long as a stream
                    self.drop_keepalive_timer()

    def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> Coroutine[Any, Any, tuple[web.StreamResponse, bool]]:
        # After a declined upgrade aiohttp parses the bytes behind it in there,
        # not in data_received: those heads are vetted once it has run
        # (docs/faults.md, "Absolute-form targets and CONNECT"). Any other
        # request goes straight to aiohttp's, with no coroutine of ours.
        if self._upgraded:
            return self._finish_then_vet(request, resp, start_time)
        return super().finish_response(request, resp, start_time)

    async def _finish_then_vet(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        result = await super().finish_response(request, resp, start_time)
        if self._messages:
            _refuse_other_forms(self._messages)
        return result

    def drop_keepalive_timer(self) -> None:
        """A response will be relayed for a while (a stream's body, a
        WebSocket): drop aiohttp's keep-alive timer, which would hold a timer
        handle for its whole life.

        That timer only closes a connection waiting for a head; firing during
        a request it merely drops itself, and aiohttp arms it anew once the
        response is written (``RequestHandler.start``, aiohttp 3.14), so the
        time allowed for the next head is unchanged. It is not dropped for
        every request: between the requests of a keep-alive connection
        aiohttp keeps one timer and only moves its deadline, where dropping it
        would cost a timer made and cancelled per request (docs/decisions.md,
        "The keep-alive timer outlives a short request").
        """
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
        refuse_late_head(transport, self._head_start, self._observer, self._head_timeout)
        self._head_start = b""
        self.force_close()  # closes after the 408 is flushed

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
        head_start, self._head_start = self._head_start, b""
        return refuse_malformed(request, exc, head_start, self._observer)


def body_piped(request: web.BaseRequest) -> None:
    """A response body will be piped for a while (outbound/relay.py calls this,
    passed down by the view, once the head is out): the connection drops its
    keep-alive timer (:meth:`GuardedRequestHandler.drop_keepalive_timer`)."""
    protocol = request.protocol
    if isinstance(protocol, GuardedRequestHandler):
        protocol.drop_keepalive_timer()


def _refuse_other_forms(messages: MutableSequence[Any]) -> bool:
    """Turn each parsed head whose target is not in origin form into a refusal
    (:class:`OtherTargetForm`, answered by ``handle_error``); return whether the
    last one was. The router then never meets such a target: its own answer
    would be aiohttp's plain text (docs/decisions.md, "The error boundary is in
    the views")."""
    refused = False
    for i, (message, _) in enumerate(messages):
        refused = not isinstance(message, _ErrInfo) and message.path[:1] != "/"
        if refused:
            exc = OtherTargetForm()
            messages[i] = (_ErrInfo(status=400, exc=exc, message=exc.message), EMPTY_PAYLOAD)
    return refused


def _resolve_after(ended: asyncio.Future[None], handler: asyncio.Task[None] | None) -> None:
    if handler is None or handler.done():
        if not ended.done():
            ended.set_result(None)
    else:
        handler.add_done_callback(lambda _: _resolve_after(ended, None))
