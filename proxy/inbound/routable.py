"""The body as the router reads it: taken whole when it came with its head
(:func:`body_if_whole`), inflated (within a bound) when it came compressed,
and the model found in it, as a JSON key or a form field.

What is forwarded is the body as it came; this copy is for routing only.
"""

from __future__ import annotations

import zlib

from aiohttp import web
from aiohttp.helpers import parse_mimetype

from ..config.settings import ServerSettings
from ..errors import InvalidRequest, RequestTooLarge
from .json_model import find_json_model
from .model import FoundModel, ModelAbsent
from .multipart_model import find_multipart_model, multipart_boundary

__all__ = [
    "BodyBytes",
    "body_if_whole",
    "cut_short",
    "decoded_for_routing",
    "find_model",
    "too_large",
]

# A body read whole (body.read_body): bytes, or a bytearray filled as it arrived
# (never changed after). Both are bytes-like: slice, find, write, send.
BodyBytes = bytes | bytearray


def too_large(limit: int) -> RequestTooLarge:
    """The 413 for a body over ``limit`` bytes (read, announced or inflated)."""
    return RequestTooLarge(
        f"The request body is larger than this proxy accepts ({limit} bytes).",
        param=None,
    )


def body_if_whole(request: web.BaseRequest, server: ServerSettings) -> bytes | None:
    """The body if all of it is in (a small one comes with its head) and sound:
    read with no coroutine (docs/decisions.md, "A body that came with its head
    is read without a coroutine"). Else None: body.py's ``read_body`` reads or refuses it."""
    length = request.content_length
    if length is None or length > server.max_body_bytes:
        return None
    content = request.content
    if not content.is_eof() or content.exception() is not None:
        return None
    buffered = content.read_nowait(-1)
    # The bytes as sent (server_options sets auto_decompress=False), so they
    # match Content-Length; aiohttp's parser raises on a short body first.
    if len(buffered) != length:
        raise cut_short()
    return buffered


def cut_short() -> InvalidRequest:
    """A body that ended before its ``Content-Length``: its connection closes."""
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
        raise too_large(limit)
    if not inflater.eof or inflater.unused_data:
        # A truncated stream, or bytes after the first gzip member: the upstream's
        # decoder could see a body we did not route by (one parse decides).
        raise InvalidRequest(
            "The request body is not one complete compressed stream.",
            code="invalid_body_encoding",
        )
    return out


def find_model(
    body: BodyBytes, content_type_header: str, with_cap: bool = False
) -> FoundModel | None:
    """The model of a model-routed request: multipart form field or JSON key
    (``with_cap``: a JSON body's output cap too, json_model.py); None when the
    body names none at all (it may be routed by path)."""
    mime = parse_mimetype(content_type_header)
    try:
        if mime.type == "multipart" and mime.subtype == "form-data":
            return find_multipart_model(body, multipart_boundary(dict(mime.parameters)))
        return find_json_model(body, None, with_cap)
    except ModelAbsent:
        return None
