"""Reading a request body within bounds, and finding the model in it.

The body is read once, into one buffer (no list of pieces joined at the
end), with two bounds: ``server.max_body_bytes`` (a ``Content-Length`` above
it is refused before a byte is read; exactly that many bytes is accepted, one
more is 413) and ``server.body_idle_timeout`` (the longest silence while the
body arrives, so a slow client cannot hold a connection forever). aiohttp's
own decompression of request bodies is off (``auto_decompress=False``); the
bytes read are the bytes that came.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Coroutine
from typing import TypeVar

import aiohttp
from aiohttp import StreamReader, web
from aiohttp.helpers import parse_mimetype
from aiohttp.http_exceptions import HttpProcessingError

from .connections import close_without_lingering
from .errors import InvalidRequest, ProxyError, RequestTimeout, RequestTooLarge
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
    "BodyBytes",
    "BodyStream",
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


async def read_body(request: web.Request, limit: int, idle_timeout: float) -> BodyBytes:
    """All of the body's bytes, as sent, or :class:`RequestTooLarge`, or
    :class:`RequestTimeout` when the client went silent for ``idle_timeout``.

    A body that came with its head is the ``bytes`` aiohttp buffered; one
    that arrived in pieces (or chunked) is a ``bytearray`` they were appended
    to. Nothing changes it once returned.
    """
    return await _as_client_fault(_read_body(request, limit, idle_timeout), request, idle_timeout)


async def read_multipart_head(
    request: web.Request, boundary: bytes, limit: int, idle_timeout: float
) -> MultipartHead:
    """Read a multipart body only until its ``model`` field is complete (or it ends),
    with the bounds of :func:`read_body`."""
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    return await _as_client_fault(
        read_until_model(request.content, boundary, limit, idle_timeout), request, idle_timeout
    )


async def _as_client_fault(
    reading: Coroutine[object, object, T], request: web.Request, idle_timeout: float
) -> T:
    """Await a body read; a stall or broken framing is the client's fault."""
    try:
        return await reading
    except TimeoutError:
        # Not a gateway timeout (aiohttp would answer 504): the client stalled.
        close_without_lingering(request)
        err: ProxyError = RequestTimeout(
            f"The request body stopped arriving for {idle_timeout:g} seconds."
        )
    except (web.RequestPayloadError, HttpProcessingError):
        # Broken chunked framing found while reading (the head was fine).
        close_without_lingering(request)
        err = InvalidRequest(
            "The request body's framing is not valid HTTP/1.1.", code="malformed_request"
        )
    err.close_connection = True
    raise err


async def _read_body(request: web.Request, limit: int, idle_timeout: float) -> BodyBytes:
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    content = request.content
    if length is None:
        return await _read_unsized(content, limit, idle_timeout)
    if length == 0:
        return b""
    # Small bodies usually arrived with the headers: take what aiohttp has
    # buffered without arming a timer (nobody else waits on this reader).
    buffered = content.read_nowait(-1)
    if len(buffered) >= length:
        return buffered
    # The rest arrives in pieces, each appended once to one growing buffer:
    # no list of pieces joined at the end (a peak of twice the body; issue 8).
    # readchunk() hands over a piece as aiohttp got it, where readany() would
    # join the pieces buffered so far. Not preallocated at Content-Length: a
    # client announcing the limit and sending one byte must not make us touch
    # that much memory, and the zero-fill of bytearray(n) measured slower
    # (~1.6 ms per 10 MiB) than growing, which realloc mostly does in place.
    body = bytearray(buffered)
    del buffered
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(idle_timeout) as deadline:
        while len(body) < length:
            chunk, _ = await content.readchunk()
            if not chunk:
                # aiohttp's parser raises on a short body; never hand one on
                # should that change.
                raise _cut_short()
            body += chunk
            deadline.reschedule(loop.time() + idle_timeout)
    return body


async def _read_unsized(content: StreamReader, limit: int, idle_timeout: float) -> bytearray:
    """A chunked body (no Content-Length), grown as it arrives; refused with 413
    as soon as it crosses ``limit``. readany() rather than readchunk(): a
    client sending one-byte chunks then costs one step per read, not per chunk."""
    body = bytearray()
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(idle_timeout) as deadline:
        while chunk := await content.readany():
            if len(body) + len(chunk) > limit:
                raise _too_large(limit)
            body += chunk
            deadline.reschedule(loop.time() + idle_timeout)
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


def find_model(body: BodyBytes, content_type_header: str) -> FoundModel | None:
    """The model of a model-routed request: multipart form field or JSON key;
    None when the body names none at all (it may be routed by path)."""
    mime = parse_mimetype(content_type_header)
    try:
        if mime.type == "multipart" and mime.subtype == "form-data":
            return find_multipart_model(body, multipart_boundary(dict(mime.parameters)))
        return find_json_model(body)
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

    An async iterator of chunks for aiohttp's client, with the bounds of
    :func:`read_body`: at most ``limit`` bytes and at most ``idle_timeout`` of
    silence. ``head`` (bytes already read, possibly rewritten) goes first and
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
        limit: int,
        idle_timeout: float,
        *,
        head: bytes = b"",
        received: int = 0,
        watcher: PartWatcher | None = None,
    ) -> None:
        client_length = request.content_length
        if client_length is not None and client_length > limit:
            raise _too_large(limit)
        self.length = None if client_length is None else client_length - received + len(head)
        self._head = head
        self._watcher = watcher
        self._content = request.content
        self._limit = limit
        self._idle_timeout = idle_timeout
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
        try:
            async with asyncio.timeout(self._idle_timeout):
                chunk = await self._content.readany()
        except TimeoutError:
            self.failure = RequestTimeout(
                f"The request body stopped arriving for {self._idle_timeout:g} seconds."
            )
            raise _BodyFailed from None
        except (ConnectionError, aiohttp.ClientError):
            self.failure = InvalidRequest("The request body was cut short.", code="incomplete_body")
            raise _BodyFailed from None
        if not chunk:
            raise StopAsyncIteration
        self.size += len(chunk)
        if self.size > self._limit:
            self.failure = _too_large(self._limit)
            raise _BodyFailed
        if self._watcher is not None:
            try:
                self._watcher.feed(chunk)
            except InvalidRequest as err:
                self.failure = err
                raise _BodyFailed from None
        return chunk
