"""Relaying an upstream's answer to the client: the response head, then the body.

- The response head follows the upstream's, through the upstream's response
  header policy (headers.py), with the request id added.
- A body that arrived whole with its head (most non-stream answers) goes out in
  one write together with the head; any other body is moved by the pipe
  (pipe.py) as it is parsed.
- Before a body is piped, the view's ``piping`` hook is called: the server's
  connection drops what only an idle connection needs (server/connections.py,
  ``body_piped``); outbound/ never reaches up into the server's connection.
- After the response is prepared, the response is the client's. A failure
  can only abort the client's connection, so no terminating chunk is written
  and the client library raises instead of taking a truncated body as whole
  (Go's ReverseProxy does the same: "all we can do is abort the request").
  No byte the upstream did not send is ever written.
- A client that goes away cancels the handler (``handler_cancellation=True``);
  the upstream connection is then closed at once, so an abandoned generation
  stops costing tokens. So does a client that stops reading: the connection's
  send bound (server/send_watch.py, ``server.send_timeout``) aborts it, and the
  access log says ``client_stalled``. A client that leaves once it has the
  stream's terminal event (observe/stream_end.py) is logged ``complete``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp
from aiohttp import web
from multidict import istr

from ..errors import UpstreamUnavailable, anthropic_path
from ..observe import OUR_REQUEST_ID_HEADER, Exchange, Outcome
from ..observe.observer import Observer
from ..observe.stream_end import stream_ended
from .forward import Answered
from .pipe import BodyPipe, head_waits_for_body

__all__ = ["abort_client", "relay"]

log = logging.getLogger("oaimux.forward")

_SSE = "text/event-stream"
# Header names made once: a str name would become a new istr per response,
# kept by the response for the life of a stream (docs/decisions.md, "Memory per
# open stream is a budget").
_X_REQUEST_ID = istr("x-request-id")
_X_ACCEL_BUFFERING = istr("X-Accel-Buffering")


# Told that a body will be piped (see the module docstring).
Piping = Callable[[web.BaseRequest], None]


def abort_client(request: web.BaseRequest) -> None:
    """Close the client's connection without ending the response cleanly.

    The handler then returns the prepared response; aiohttp's ``write_eof`` on a
    closing transport raises ``ConnectionError``, which aiohttp treats as a
    client disconnect: nothing more is written, nothing is logged as an error.
    """
    transport = request.transport
    if transport is not None:
        transport.abort()


async def relay(
    request: web.Request, answered: Answered, ex: Exchange, *, observer: Observer, piping: Piping
) -> web.StreamResponse:
    """Send the upstream's answer to the client: a body that came whole with its
    head in one write with the head, any other chunk by chunk as it arrives
    (``piping`` told first: the server's, passed down; see the module docstring)."""
    upstream_resp, plan = answered.response, answered.plan
    completed = False
    resp: web.StreamResponse | None = None
    pipe: BodyPipe | None = None
    try:
        resp, whole = response_head(answered, ex)
        try:
            await resp.prepare(request)
        except ValueError:
            # A header value with control characters, which aiohttp's writer
            # refuses though its lenient parser let it through: never relayed
            # (docs/faults.md, "Malformed upstream answers"). Nothing was written.
            raise _unrelayable_head(plan.name, ex) from None
        ex.ttfb = time.perf_counter() - ex.started
        if whole is not None:
            try:
                await resp.write_eof()
            finally:
                _answer_ended(ex, len(whole), whole)
        else:
            piping(request)
            pipe = _body_follows(answered, ex, request, resp, observer)
            try:
                failure = await pipe.run()
            finally:
                # Also when the client left mid-body: the log shows what it got.
                _answer_ended(ex, pipe.sent, pipe.tail, previous=pipe.previous, first=pipe.first)
            if _cut_short(failure, plan.name, ex):
                abort_client(request)
                return resp
            await resp.write_eof()
        completed = True
        return resp
    except asyncio.CancelledError:
        ex.outcome = _client_left(request, ex, pipe)
        raise
    except ConnectionError:
        # The client's socket closed under a write (it hung up in the same
        # loop turn the answer came in, before aiohttp cancelled this handler).
        # Raising would have aiohttp log a traceback for an ordinary hang-up;
        # returning the prepared response lets its own write_eof meet the
        # closed socket, which it takes quietly as a client disconnect.
        ex.outcome = _client_left(request, ex, pipe)
        if resp is None:
            raise
        return resp
    finally:
        # Pool the connection only after a whole body; else it is mid-body: close.
        if completed:
            upstream_resp.release()
        else:
            upstream_resp.close()


def response_head(answered: Answered, ex: Exchange) -> tuple[web.StreamResponse, bytes | None]:
    """The client's response head for ``answered``, and the body when it is
    already whole (then the head is held back and written with it, as
    aiohttp's ``Response`` does); notes the answer's kind on ``ex``."""
    upstream_resp = answered.response
    headers = answered.plan.response_headers.build(upstream_resp.headers)
    # The upstream's own x-request-id (OpenAI support asks for it) passes
    # unchanged; ours is always in x-oaimux-request-id, and in x-request-id
    # when the upstream sent none.
    headers[OUR_REQUEST_ID_HEADER] = ex.request_id
    if _X_REQUEST_ID not in headers:
        headers[_X_REQUEST_ID] = ex.request_id
    if ex.charge is not None:  # the proxy's own budgets (README, "Token budgets")
        ex.charge.add_headers(headers)
    length = upstream_resp.content_length
    content_type = upstream_resp.headers.get("Content-Type", "")
    ex.streaming = length is None or content_type.startswith(_SSE)
    ex.content_type = content_type
    ex.content_encoding = upstream_resp.headers.get("Content-Encoding")
    content = upstream_resp.content
    whole: bytes | None = None
    if not ex.streaming and content.is_eof() and content.total_bytes == length:
        # (A HEAD answer or a 304 declares a length it does not carry:
        # total_bytes differs, and it takes the general path.)
        whole = content.read_nowait()
    status, reason = upstream_resp.status, upstream_resp.reason
    resp: web.StreamResponse
    if whole is not None:
        resp = web.Response(status=status, reason=reason, headers=headers)
        resp.body = whole
    else:
        resp = web.StreamResponse(status=status, reason=reason, headers=headers)
        head_waits_for_body(resp)
        if length is not None:
            resp.content_length = length
    if ex.streaming:
        # Keep an nginx in front from buffering the stream.
        resp.headers[_X_ACCEL_BUFFERING] = "no"
    ex.status = status
    return resp, whole


def _body_follows(
    answered: Answered,
    ex: Exchange,
    request: web.BaseRequest,
    resp: web.StreamResponse,
    observer: Observer,
) -> BodyPipe:
    """The head is out and the body is to be piped: from here on, bound the
    silence between two body chunks, and count an open stream. The pipe tracks
    events only in an event stream, and keeps the first one only in an
    Anthropic stream, the one that reports usage there (observe/usage.py)."""
    upstream_resp = answered.response
    upstream_resp.arm_idle_timeout(answered.plan.upstream.timeouts.idle)
    upstream_resp.forget_head()
    if ex.streaming:
        observer.stream_opened(ex)
    events = ex.content_type.startswith(_SSE)
    keep_first = events and anthropic_path(ex.path)
    return BodyPipe(upstream_resp, request, resp, events=events, keep_first=keep_first)


def _client_left(request: web.BaseRequest, ex: Exchange, pipe: BodyPipe | None) -> Outcome:
    """The outcome of a client that left before the response ended: ``complete``
    when the last event sent was its stream's terminal one (README, "Access
    log"), else how it left. The upstream's response is closed either way."""
    event_start, event_start_at = (pipe.event_start, pipe.event_start_at) if pipe else (b"", 0)
    outcome = _client_outcome(request)
    if (
        outcome == "client_gone"
        and ex.content_type.startswith(_SSE)
        and ex.tail
        and stream_ended(
            ex.tail_previous,
            ex.tail,
            ex.bytes_out,
            event_start=event_start,
            event_start_at=event_start_at,
        )
    ):
        return "complete"
    return outcome


def _cut_short(failure: BaseException | None, upstream: str, ex: Exchange) -> bool:
    """Did the body end short (the upstream's ``failure``, or an outcome noted
    already)? Then the client's connection is to be aborted, so its library
    raises instead of taking a truncated body as whole."""
    if isinstance(failure, aiohttp.SocketTimeoutError):
        ex.outcome = "idle_timeout"
    elif failure is not None:
        ex.outcome = "upstream_reset"  # reset, cut short, or broken framing
    if ex.outcome == "complete":
        return False
    log.warning(
        "upstream %s failed mid-body (%s) after %d bytes; aborting the client's "
        "connection [request %s]",
        upstream,
        ex.outcome,
        ex.bytes_out,
        ex.request_id,
    )
    return True


def _answer_ended(
    ex: Exchange, sent: int, tail: bytes, *, previous: bytes = b"", first: bytes = b""
) -> None:
    """The answer ended (whole, cut short, or left by the client): the one place
    the relay notes what the client got. ``tail`` and ``previous`` are the last
    two pieces written, ``first`` the start of the first, from which the
    observer's ``finished`` hook, which every answer reaches, reads the token
    usage (observe/usage.py)."""
    ex.bytes_out = sent
    ex.tail = tail
    ex.tail_previous = previous
    ex.head = first


def _unrelayable_head(upstream: str, ex: Exchange) -> UpstreamUnavailable:
    log.warning(
        "upstream %s sent a response header that cannot be relayed [request %s]",
        upstream,
        ex.request_id,
    )
    return UpstreamUnavailable(
        f"No upstream could answer: {upstream}: sent a response header that cannot be relayed."
    )


def _client_outcome(request: web.BaseRequest) -> Outcome:
    """The access-log outcome of a client that left mid-response: ``client_stalled``
    when the send bound closed its connection (the server's connection protocol
    then says ``stalled``: server/connections.py), ``client_gone`` otherwise."""
    if getattr(request.protocol, "stalled", False):
        return "client_stalled"
    return "client_gone"
