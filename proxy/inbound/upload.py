"""Large multipart uploads stream to the upstream as soon as the model is known.

A transcription or image edit can be tens of megabytes, with the ``model``
field usually first (the official SDKs send form fields before files).
:func:`read_until_model` reads only until the ``model`` part is complete; a
:class:`~proxy.inbound.body.BodyStream` then sends that head (rewritten if the route
says so) followed by the rest of the body as it arrives, while
:class:`PartWatcher` checks every later part header, so a second ``model``
field is still refused (``ambiguous_model``): the upload is cut off before the
upstream has the whole request, and the client gets the 400 (no response byte
has gone out yet).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from aiohttp import StreamReader

from ..errors import InvalidRequest, RequestTooLarge
from .model import FoundModel, ModelAbsent
from .multipart_model import MultipartModelScan, find_multipart_model, part_name

__all__ = ["MultipartHead", "PartWatcher", "read_until_model"]

# Part headers are short; a longer block is not a form a client library makes.
_MAX_PART_HEADERS = 16 * 1024


@dataclass(slots=True)
class MultipartHead:
    """The bytes read so far, the model found in them (None: the complete form
    has no ``model`` field), and whether the body ended.

    ``head`` is ``bytes`` while the body goes on (it is sent first, the rest
    streams after it); a complete body is handed on in the buffer it was read
    into, without a copy.
    """

    head: bytes | bytearray
    found: FoundModel | None
    complete: bool


async def read_until_model(
    content: StreamReader,
    boundary: bytes,
    limit: int,
    idle_timeout: float,
    deadline: float = math.inf,
) -> MultipartHead:
    """Read until the model field is complete, or the whole body if it ends first.

    ``TimeoutError`` after ``idle_timeout`` seconds without a byte, or at
    ``deadline`` (event-loop time)."""
    buf = bytearray()
    scan = MultipartModelScan(boundary)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout_at(min(loop.time() + idle_timeout, deadline)) as wait:
        while True:
            chunk = await content.readany()
            if not chunk:
                try:
                    return MultipartHead(buf, find_multipart_model(buf, boundary), True)
                except ModelAbsent:
                    return MultipartHead(buf, None, True)
            if len(buf) + len(chunk) > limit:
                raise RequestTooLarge(
                    f"The request body is larger than this proxy accepts ({limit} bytes)."
                )
            buf += chunk
            wait.reschedule(min(loop.time() + idle_timeout, deadline))
            found = scan.feed(buf)
            if found is not None:
                return MultipartHead(bytes(buf), found, False)


class PartWatcher:
    """Looks at the part headers of the body's remainder for a second ``model`` field.

    ``feed`` takes the remainder's chunks in order and raises ``ambiguous_model``;
    it keeps at most one partial header block between calls.
    """

    def __init__(self, boundary: bytes) -> None:
        self._marker = b"\r\n--" + boundary
        self._carry: bytes | bytearray = b""

    def feed(self, chunk: bytes | bytearray) -> None:
        data = self._carry + chunk if self._carry else chunk
        marker = self._marker
        pos = 0
        while True:
            at = data.find(marker, pos)
            if at < 0:
                # Keep a tail that could be the start of a marker cut by the chunk edge.
                self._carry = data[max(pos, len(data) - len(marker) + 1) :]
                return
            headers_end = data.find(b"\r\n\r\n", at + len(marker))
            if headers_end < 0:
                if len(data) - at > _MAX_PART_HEADERS:
                    raise InvalidRequest(
                        "A multipart part header block is too long.", code="invalid_multipart"
                    )
                self._carry = data[at:]
                return
            line_end = data.find(b"\r\n", at + len(marker))
            if part_name(data[line_end + 2 : headers_end]) == "model":
                raise InvalidRequest(
                    "the form names 'model' more than once", code="ambiguous_model", param="model"
                )
            pos = headers_end
