"""Reading a request body within bounds, and finding the model in it.

The body is read once, into one buffer (no list of pieces joined at the
end), within bounds (:class:`BodyBounds`): ``server.max_body_bytes`` (a
``Content-Length`` above it is refused before a byte is read; exactly that
many bytes is accepted, one more is 413), ``server.body_idle_timeout`` (the
longest silence while the body arrives) and ``server.body_timeout`` (the
longest the whole body may take, so a client sending a byte now and then,
never silent for long, still cannot hold a connection forever). aiohttp's
own decompression of request bodies is off (``auto_decompress=False``); the
bytes read are the bytes that came.

What is read depends on the route (inbound/route.py):

- a model-routed body is read whole (:func:`model_body`), except a large form
  (:func:`streamable_form`), read only up to its ``model`` field
  (:func:`read_form_head`); the rest of it streams on (:func:`stream_form_rest`);
- a path-routed body (:func:`read_path_body`) is read whole when small, else
  streamed through as it arrives (:class:`BodyStream`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Final, TypeVar

import aiohttp
from aiohttp import StreamReader, web
from aiohttp.helpers import parse_mimetype
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from ..config.settings import ServerSettings
from ..errors import InvalidRequest, ProxyError, RequestTimeout
from .model import FoundModel
from .multipart_model import multipart_boundary
from .routable import (
    BodyBytes,
    body_if_whole,
    cut_short,
    decoded_for_routing,
    find_model,
    too_large,
)
from .upload import MultipartHead, PartWatcher, read_until_model

T = TypeVar("T")

__all__ = [
    "STREAM_ABOVE",
    "BodyBounds",
    "BodyBytes",
    "BodyStream",
    "ModelBody",
    "close_without_lingering",
    "read_body",
    "model_body",
    "read_form_head",
    "read_multipart_head",
    "read_path_body",
    "stream_form_rest",
    "streamable_form",
]


# A timer may fire this much before its time: asyncio by its clock's
# resolution, uvloop by its whole milliseconds.
_TIMER_SLACK: Final = 0.005


@dataclass(frozen=True, slots=True)
class BodyBounds:
    """How large one request body may be, and how slowly it may arrive: at
    most ``limit`` bytes, at most ``idle`` seconds of silence, and all of it
    by ``deadline`` (event-loop time), ``total`` seconds after reading began."""

    limit: int
    idle: float
    total: float
    deadline: float

    @classmethod
    def start(cls, server: ServerSettings) -> BodyBounds:
        """The bounds of a body whose reading begins now."""
        now = asyncio.get_running_loop().time()
        return cls(
            server.max_body_bytes,
            server.body_idle_timeout,
            server.body_timeout,
            now + server.body_timeout,
        )

    def due(self, now: float) -> float:
        """When the next piece must have come, if the last one came ``now``."""
        return min(now + self.idle, self.deadline)

    def timed_out(self) -> RequestTimeout:
        """The client's error once a wait set by :meth:`due` ran out."""
        # Not a gateway timeout (aiohttp would answer 504): the client stalled.
        if asyncio.get_running_loop().time() + _TIMER_SLACK >= self.deadline:
            err = RequestTimeout(
                f"The request body did not arrive in full within {self.total:g} seconds."
            )
        else:
            err = RequestTimeout(f"The request body stopped arriving for {self.idle:g} seconds.")
        err.close_connection = True
        return err


async def read_body(request: web.Request, server: ServerSettings) -> BodyBytes:
    """All of the body's bytes, as sent, or :class:`RequestTooLarge`, or
    :class:`RequestTimeout` when the client went silent for
    ``server.body_idle_timeout`` or the body took longer than ``server.body_timeout``.

    A body that came with its head is the ``bytes`` aiohttp buffered; one
    that arrived in pieces (or chunked) is a ``bytearray`` they were appended
    to. Nothing changes it once returned.
    """
    whole = body_if_whole(request, server)
    if whole is not None:
        return whole
    return await _as_client_fault(_read_body(request, server), request)


async def read_multipart_head(
    request: web.Request, boundary: bytes, bounds: BodyBounds
) -> MultipartHead:
    """Read a multipart body only until its ``model`` field is complete (or it ends),
    within ``bounds`` (the rest of the body, streamed on, keeps them)."""
    length = request.content_length
    if length is not None and length > bounds.limit:
        raise too_large(bounds.limit)
    return await _as_client_fault(_read_multipart_head(request, boundary, bounds), request)


async def _read_multipart_head(
    request: web.Request, boundary: bytes, bounds: BodyBounds
) -> MultipartHead:
    try:
        return await read_until_model(
            request.content, boundary, bounds.limit, bounds.idle, bounds.deadline
        )
    except TimeoutError:
        raise bounds.timed_out() from None


async def _as_client_fault(reading: Coroutine[object, object, T], request: web.Request) -> T:
    """Await a body read; a stall or broken framing is the client's fault."""
    try:
        return await reading
    except RequestTimeout:
        close_without_lingering(request)
        raise
    except (web.RequestPayloadError, HttpProcessingError):
        # Broken chunked framing found while reading (the head was fine).
        close_without_lingering(request)
        err = InvalidRequest(
            "The request body's framing is not valid HTTP/1.1.", code="malformed_request"
        )
        err.close_connection = True
        raise err from None


async def _read_body(request: web.Request, server: ServerSettings) -> BodyBytes:
    length = request.content_length
    limit = server.max_body_bytes
    if length is not None and length > limit:
        raise too_large(limit)
    content = request.content
    if length is None:
        return await _read_unsized(content, BodyBounds.start(server))
    if length == 0:
        return b""
    # What aiohttp has buffered, without arming a timer (nobody else waits on it).
    buffered = content.read_nowait(-1)
    if len(buffered) >= length:
        return buffered
    # The rest arrives in pieces, each appended once to one growing buffer:
    # no list of pieces joined at the end, a peak of twice the body
    # (docs/decisions.md, "Request bodies grow in one buffer").
    # readchunk() hands over a piece as aiohttp got it, where readany() would
    # join the pieces buffered so far. Not preallocated at Content-Length: a
    # client announcing the limit and sending one byte must not make us touch
    # that much memory, and the zero-fill of bytearray(n) measured slower
    # (~1.6 ms per 10 MiB) than growing, which realloc mostly does in place.
    body = bytearray(buffered)
    del buffered
    # The bounds' clock starts here: a body that came with its head needs none.
    bounds = BodyBounds.start(server)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(bounds.due(loop.time())) as wait:
            while len(body) < length:
                chunk, _ = await content.readchunk()
                if not chunk:
                    # aiohttp's parser raises on a short body; never hand one on
                    # should that change.
                    raise cut_short()
                body += chunk
                wait.reschedule(bounds.due(loop.time()))
    except TimeoutError:
        raise bounds.timed_out() from None
    return body


async def _read_unsized(content: StreamReader, bounds: BodyBounds) -> bytearray:
    """A chunked body (no Content-Length), grown as it arrives; refused with 413
    as soon as it crosses the limit. readany() rather than readchunk(): a
    client sending one-byte chunks then costs one step per read, not per chunk."""
    body = bytearray()
    limit = bounds.limit
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(bounds.due(loop.time())) as wait:
            while chunk := await content.readany():
                if len(body) + len(chunk) > limit:
                    raise too_large(limit)
                body += chunk
                wait.reschedule(bounds.due(loop.time()))
    except TimeoutError:
        raise bounds.timed_out() from None
    return body


# Path-routed bodies above this size are streamed to the upstream as they
# arrive; smaller ones are read whole, so retries and fallback still apply.
STREAM_ABOVE = 1024 * 1024


class _BodyFailed(Exception):
    """Ends a :class:`BodyStream` early; the reason is in ``BodyStream.failure``."""


class BodyStream:
    """A request body passed on as it arrives, never held whole: path routes
    (file uploads need no model, so the proxy never needs their bytes) and
    large multipart forms once their ``model`` field has been read.

    An async iterator of chunks for the upstream client, within ``bounds``
    (those of :func:`read_body`; a multipart head read before keeps its
    clock running). ``head`` (bytes already read, possibly rewritten) goes first and
    ``received`` counts what was read for it; ``watcher`` sees every later
    chunk (a second ``model`` form field stops the upload). When the client is
    at fault (stalled, too large, cut short, ambiguous), ``failure`` holds the
    error to answer, so the upstream is not blamed. Once ``started``, the body
    cannot be sent again: no retry, no fallback. ``length`` is what the
    upstream is told (the client's ``Content-Length`` adjusted for a rewritten
    head; ``None``: chunked).
    """

    def __init__(
        self,
        request: web.Request,
        bounds: BodyBounds,
        *,
        head: bytes = b"",
        received: int = 0,
        watcher: PartWatcher | None = None,
    ) -> None:
        client_length = request.content_length
        if client_length is not None and client_length > bounds.limit:
            raise too_large(bounds.limit)
        self.length = None if client_length is None else client_length - received + len(head)
        self._head = head
        self._watcher = watcher
        self._request = request
        self._content = request.content
        self._bounds = bounds
        self.size = received
        self.started = False
        self.failure: ProxyError | None = None

    def __aiter__(self) -> BodyStream:
        return self

    async def __anext__(self) -> bytes:
        self.started = True
        if self._head:
            head, self._head = self._head, b""
            return head
        bounds = self._bounds
        try:
            async with asyncio.timeout_at(bounds.due(asyncio.get_running_loop().time())):
                chunk = await self._content.readany()
        except TimeoutError:
            self.failure = bounds.timed_out()
            # Its answer ends the connection: the rest of a stalled body is not awaited.
            close_without_lingering(self._request)
            raise _BodyFailed from None
        except (ConnectionError, aiohttp.ClientError):
            self.failure = InvalidRequest("The request body was cut short.", code="incomplete_body")
            raise _BodyFailed from None
        if not chunk:
            raise StopAsyncIteration
        self.size += len(chunk)
        if self.size > bounds.limit:
            self.failure = too_large(bounds.limit)
            raise _BodyFailed
        if self._watcher is not None:
            try:
                self._watcher.feed(chunk)
            except InvalidRequest as err:
                self.failure = err
                raise _BodyFailed from None
        return chunk


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


@dataclass(slots=True)
class ModelBody:
    """A model-routed request's body as read to route it (:func:`model_body`,
    :func:`read_form_head`); never changed after. Slotted, not frozen, as
    :class:`~proxy.inbound.head.Target` is."""

    body: BodyBytes  # as read: the whole body, or a large form's head
    routable: BodyBytes  # decoded for routing (differs when compressed)
    found: FoundModel | None  # None: the body names no model
    boundary: bytes | None  # a large form's, whose rest is still unread; else None
    bounds: BodyBounds | None  # the bounds that rest streams within


def streamable_form(request: web.Request) -> bytes | None:
    """The boundary of a multipart body worth streaming (over STREAM_ABOVE bytes, or
    chunked, and not compressed), else None: small forms are read whole, so
    retries and fallback keep working for them."""
    length = request.content_length
    if (length is not None and length <= STREAM_ABOVE) or request.headers.get("Content-Encoding"):
        return None
    mime = parse_mimetype(request.headers.get("Content-Type", "application/json"))
    if mime.type != "multipart" or mime.subtype != "form-data":
        return None
    return multipart_boundary(dict(mime.parameters))


def model_body(
    request: web.Request, body: BodyBytes, server: ServerSettings, with_cap: bool = False
) -> ModelBody:
    """A model-routed body read whole (:func:`read_body`), and the model it names
    (JSON key or form field; ``with_cap``: and its output cap). Not a coroutine:
    the caller awaits the read, so the hot path has one layer fewer."""
    content_type = request.headers.get("Content-Type", "application/json")
    encoding = request.headers.get("Content-Encoding")
    routable = decoded_for_routing(body, encoding, server.max_body_bytes)
    found = find_model(routable, content_type, with_cap)
    return ModelBody(body, routable, found, None, None)


async def read_form_head(
    request: web.Request, boundary: bytes, server: ServerSettings
) -> ModelBody:
    """A large form (:func:`streamable_form`) read only up to its model field
    (docs/decisions.md, "Large forms stream once their model field is in")."""
    bounds = BodyBounds.start(server)
    head = await read_multipart_head(request, boundary, bounds)
    if head.complete:
        return ModelBody(head.head, head.head, head.found, None, None)
    return ModelBody(head.head, head.head, head.found, boundary, bounds)


def stream_form_rest(request: web.Request, read: ModelBody, head: BodyBytes) -> BodyStream:
    """A large form's body to send: ``head`` (its head as read, or rewritten)
    first, then the rest as it arrives, every later part header checked for a
    second ``model`` field (:class:`PartWatcher`)."""
    # Set together by read_form_head for a form whose head held the model.
    assert read.boundary is not None and read.bounds is not None and read.found is not None
    assert isinstance(head, bytes)  # a head read while the body goes on is bytes
    watcher = PartWatcher(read.boundary)
    watcher.feed(read.body[read.found.end :])  # the rest of the head, after the model
    return BodyStream(request, read.bounds, head=head, received=len(read.body), watcher=watcher)


async def read_path_body(request: web.Request, server: ServerSettings) -> BodyBytes | BodyStream:
    """A path-routed body: streamed through when large or chunked (README,
    "Uploads are streamed"), else read whole, so retries and fallback apply."""
    length = request.content_length
    if request.body_exists and (length is None or length > STREAM_ABOVE):
        return BodyStream(request, BodyBounds.start(server))
    if request.method not in ("GET", "HEAD", "DELETE", "OPTIONS") or request.body_exists:
        return await read_body(request, server)
    return b""
