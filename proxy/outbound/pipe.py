"""Moving an upstream response body to the client as it is parsed.

The obvious relay is a task looping ``await body.readany()`` then ``await
response.write(chunk)``: every chunk then wakes a task, goes through two
coroutine layers of aiohttp's writer and back. At 1,000 streams that was most
of the proxy's CPU per chunk: a bare socket-to-socket pipe costs 16.5 µs a
chunk on the bench machine, that loop about 38 µs (docs/decisions.md, "The
body pipe writes from the read callback").

Here the upstream connection's ``data_received`` (client/connection.py) calls
:meth:`BodyPipe.pump` right after aiohttp's parser has fed the body, and the
pump writes what was parsed straight to the client's transport, framed as
the prepared response announced (chunked, or raw for a Content-Length body
or an HTTP/1.0 client). The handler task only waits for the end, and for the
client to drain when it reads slower than the upstream sends: then reading
from the upstream is held, so nothing piles up in memory.

Contract: the response must be prepared before the pipe is made (its head
sent, or, after :func:`head_waits_for_body`, left in aiohttp's writer for the
pipe to send with the first chunk that came with it, or alone before
:meth:`BodyPipe.run` first waits); the pipe empties its header table. The
caller ends it with ``write_eof()`` (aiohttp writes the last chunk) when
:meth:`BodyPipe.run` returns None, and aborts the client when it returns the
upstream's failure. Bytes are never changed, only framed.
"""

from __future__ import annotations

import asyncio
from typing import Final

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import StreamReader

from ..client import UpstreamResponse
from ..client.connection import drop_spent_buffer, lighten_body, take_parsed

__all__ = ["BodyPipe", "head_waits_for_body"]

_CRLF: Final = b"\r\n"
# How much of an event stream's first event is kept for the usage reader
# (observe/usage.py): Anthropic's message_start is well under 1 KB, and a stream
# holds it to its end (docs/decisions.md, "Memory per open stream is a budget").
_FIRST_KEPT: Final = 2048
# How a piece that ends a server-sent event ends: a blank line (WHATWG HTML
# §9.2.6), whatever the line endings ("\r\n\r\n" ends with the third).
_EVENT_ENDS: Final = (b"\n\n", b"\r\r", b"\n\r\n")
# A chunk smaller than this is framed into one new bytes object (a token's
# delta: ~100 bytes); a larger one goes out as three pieces, not copied.
_FRAME_COPY_BELOW: Final = 4096


def head_waits_for_body(prepared: web.StreamResponse) -> None:
    """Have ``prepare()`` keep the response head in aiohttp's writer instead of
    sending it: the pipe sends it, with the body bytes that came with the
    upstream's head if any, in the same loop turn (so it never waits for a
    chunk). One send instead of two per stream (docs/decisions.md, "The
    response head leaves with the first chunk")."""
    prepared._send_headers_immediately = False


def _take_head(writer: AbstractStreamWriter) -> bytes | None:
    """The head prepare() left unsent (:func:`head_waits_for_body`), now the
    pipe's to send; aiohttp's writer takes it as written."""
    if not isinstance(writer, StreamWriter) or writer._headers_written:
        return None
    head = writer._headers_buf
    if not head:
        return None
    writer._headers_buf = None
    writer._headers_written = True
    writer.output_size += len(head)
    return head


class BodyPipe:
    """One response body on its way from the upstream to the client."""

    __slots__ = (
        "_body",
        "_busy",
        "_again",
        "_chunked",
        "_client",
        "_client_gone",
        "_head",
        "_held",
        "_events",
        "_keep_first",
        "_out",
        "_response",
        "_waiter",
        "_woken",
        "_writer",
        "event_start",
        "event_start_at",
        "first",
        "previous",
        "sent",
        "tail",
    )

    def __init__(
        self,
        response: UpstreamResponse,
        request: web.BaseRequest,
        prepared: web.StreamResponse,
        *,
        events: bool = False,
        keep_first: bool = False,
    ) -> None:
        self._response = response
        self._body: StreamReader = response.content
        lighten_body(self._body)  # read by take_parsed alone from here
        drop_spent_buffer(request.content)  # sent upstream long before
        self._out = request.transport
        self._client = request.protocol
        self._writer = request.writer
        self._head = _take_head(request.writer)
        # aiohttp decided the framing when it prepared the head (chunked for an
        # HTTP/1.1 client when no length is known; none for HTTP/1.0).
        self._chunked = prepared.headers.get("Transfer-Encoding") == "chunked"
        # Its head is serialized: the header table is not read again, and would
        # otherwise stay for the whole stream (docs/decisions.md, "Memory per
        # open stream is a budget").
        prepared.headers.clear()
        # A future only while the task waits: lighter than an Event, which
        # keeps a deque per stream (docs/decisions.md, "Memory per open stream
        # is a budget").
        self._waiter: asyncio.Future[None] | None = None
        self._woken = False
        self._busy = self._again = self._held = self._client_gone = False
        self.sent = 0
        # The last two pieces written (references, not copies): the usage
        # object of a stream is read from them after the end (observe/usage.py).
        self.tail = self.previous = b""
        # The piece written after one that ended an event (a reference): the
        # start of the last event, which a large one (a Responses stream's
        # response.completed carries the whole response) can spread over more
        # pieces than the last two (observe/stream_end.py).
        # Tracked for event streams only (``events``): no other body is read
        # for its last event, and a binary piece would be kept alive for nothing.
        self.event_start = b""
        self.event_start_at = 0  # the count of bytes sent before it
        self._events = events
        # With keep_first (an Anthropic event stream), its first event: where
        # it reports its input tokens.
        self._keep_first = keep_first
        self.first = b""

    async def run(self) -> BaseException | None:
        """Pump until the body ends. Returns None when it ended whole, or the
        upstream's failure (reset, cut short, idle timeout); raises
        ``ConnectionResetError`` when the client went away."""
        response = self._response
        response.on_body(self.pump)
        try:
            self.pump()  # what arrived with the head, sent with the head
            head = self._head
            if head is not None:  # nothing came with it: the head goes alone, now
                self._head = None
                out = self._out
                if out is not None and not out.is_closing():
                    out.write(head)
            loop = asyncio.get_running_loop()
            while True:
                # Waited for here, not in a coroutine of its own: that would be
                # one more frame kept for the life of the stream.
                if not self._woken:
                    waiter = self._waiter = loop.create_future()
                    try:
                        await waiter
                    finally:
                        self._waiter = None
                self._woken = False
                if self._client_gone:
                    raise ConnectionResetError("the client went away")
                if self._held:
                    await self._writer.drain()
                    self._held = False
                    response.resume()
                    self.pump()
                    continue
                body = self._body
                failure = body.exception()
                if failure is not None:
                    return failure
                if body.is_eof():
                    return None
        finally:
            response.on_body(None)

    def _wake(self) -> None:
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pump(self) -> None:
        """Write whatever the parser has produced; called by the upstream
        connection after each read, and re-entered safely (reading the body can
        resume a paused parser, which parses and calls back). It runs for every
        relayed chunk: keep its Python calls few (docs/decisions.md, "A relayed
        chunk costs few Python calls")."""
        if self._busy:
            self._again = True
            return
        self._busy = True
        try:
            again = True
            while again:
                self._again = False
                if self._held:
                    return
                data, ended = take_parsed(self._body)
                if data:
                    out = self._out
                    if out is None or out.is_closing():
                        self._client_gone = True
                        self._wake()
                        return
                    head = self._head
                    if head is not None:
                        self._head = None
                        if self._chunked:
                            out.writelines((head, b"%x\r\n" % len(data), data, _CRLF))
                        else:
                            out.writelines((head, data))
                    elif self._chunked:
                        if len(data) < _FRAME_COPY_BELOW:
                            # One bytes object: cheaper than three for uvloop.
                            out.write(b"%x\r\n%b\r\n" % (len(data), data))
                        else:
                            out.writelines((b"%x\r\n" % len(data), data, _CRLF))
                    else:
                        out.write(data)
                    if not self.sent:
                        self._first_piece(data)
                    elif self._events and self.tail.endswith(_EVENT_ENDS):
                        self.event_start, self.event_start_at = data, self.sent
                    self.sent += len(data)
                    self.previous = self.tail
                    self.tail = data
                    # Writing is paused only with bytes in the buffer: the C call
                    # spares the property's Python call for each chunk sent whole.
                    if out.get_write_buffer_size() and self._client.writing_paused:
                        # The client reads slower than the upstream sends: hold the
                        # upstream until the client has drained (back-pressure).
                        self._held = True
                        self._response.hold()
                        self._wake()
                        return
                if ended:
                    self._wake()
                    return
                again = self._again
        finally:
            self._busy = False

    def _first_piece(self, data: bytes) -> None:
        """Note the body's first piece: it starts an event, and with keep_first
        its first event is kept."""
        if self._events:
            self.event_start = data
        if self._keep_first:
            self.first = _first_event(data)


def _first_event(data: bytes) -> bytes:
    """The first server-sent event of ``data`` (up to its blank line), at most
    ``_FIRST_KEPT`` bytes."""
    end = data.find(b"\n\n", 0, _FIRST_KEPT)
    return data[: end + 2] if end >= 0 else data[:_FIRST_KEPT]
