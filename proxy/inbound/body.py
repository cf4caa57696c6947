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
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Final, TypeVar

import aiohttp
from aiohttp import StreamReader, web
from aiohttp.helpers import parse_mimetype
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from ..config.settings import ServerSettings
from ..errors import InvalidRequest, ProxyError, RequestTimeout, RequestTooLarge
from .findmodel import (
    FoundModel,
    ModelAbsent,
    find_json_model,
    find_multipart_model,
    multipart_boundary,
)
from .upload import MultipartHead, PartWatcher, read_until_model

T = TypeVar("T")

__all__ = [
    "STREAM_ABOVE",
    "BodyBounds",
    "BodyBytes",
    "BodyStream",
    "close_without_lingering",
    "decoded_for_routing",
    "find_model",
    "read_body",
    "read_multipart_head",
]


# A body read whole (read_body): bytes, or a bytearray filled as it arrived
# (never changed after). Both are bytes-like: slice, find, write, send.
BodyBytes = bytes | bytearray


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(
        f"The request body is larger than this proxy accepts ({limit} bytes).",
        param=None,
    )


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
    return await _as_client_fault(_read_body(request, server), request)


async def read_multipart_head(
    request: web.Request, boundary: bytes, bounds: BodyBounds
) -> MultipartHead:
    """Read a multipart body only until its ``model`` field is complete (or it ends),
    within ``bounds`` (the rest of the body, streamed on, keeps them)."""
    length = request.content_length
    if length is not None and length > bounds.limit:
        raise _too_large(bounds.limit)
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
        raise _too_large(limit)
    content = request.content
    if length is None:
        return await _read_unsized(content, BodyBounds.start(server))
    if length == 0:
        return b""
    # Small bodies usually arrived with the headers: take what aiohttp has
    # buffered without arming a timer (nobody else waits on this reader).
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
                    raise _cut_short()
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
                    raise _too_large(limit)
                body += chunk
                wait.reschedule(bounds.due(loop.time()))
    except TimeoutError:
        raise bounds.timed_out() from None
    return body


def _cut_short() -> InvalidRequest:
    err = InvalidRequest("The request body was cut short.", code="incomplete_body")
    err.close_connection = True
    return err


def decoded_for_routing(body: BodyBytes, content_encoding: str | None, limit: int) -> BodyBytes:
    """The body as the upstream will understand it, for finding the model only.

    A compressed body is inflated with a hard output bound (``limit``), so a
    gzip bomb costs at most that much memory; the compressed bytes are what is
    forwarded.
    """
    if not content_encoding or content_encoding.strip().lower() == "identity":
        return body
    encoding = content_encoding.strip().lower()
    if encoding in ("gzip", "x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        wbits = zlib.MAX_WBITS
    else:
        raise InvalidRequest(
            f"Content-Encoding {encoding!r} is not supported on this endpoint "
            "(gzip, deflate or none).",
            code="unsupported_content_encoding",
        )
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise InvalidRequest(
            "The request body is not valid compressed data.", code="invalid_body_encoding"
        ) from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise _too_large(limit)
    if not inflater.eof or inflater.unused_data:
        # A truncated stream, or bytes after the first gzip member: the upstream's
        # decoder could see a body we did not route by (one parse decides).
        raise InvalidRequest(
            "The request body is not one complete compressed stream.",
            code="invalid_body_encoding",
        )
    return out


def find_model(
    body: BodyBytes, content_type_header: str, output_cap: bool = False
) -> FoundModel | None:
    """The model of a model-routed request: multipart form field or JSON key
    (with ``output_cap``, a JSON body's output cap too; see findmodel.py);
    None when the body names none at all (it may be routed by path)."""
    mime = parse_mimetype(content_type_header)
    try:
        if mime.type == "multipart" and mime.subtype == "form-data":
            return find_multipart_model(body, multipart_boundary(dict(mime.parameters)))
        return find_json_model(body, None, output_cap)
    except ModelAbsent:
        return None


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
            raise _too_large(bounds.limit)
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
            self.failure = _too_large(bounds.limit)
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
