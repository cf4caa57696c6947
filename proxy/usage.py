"""Token usage read from the last bytes of a response, never from the whole body.

OpenAI puts the ``usage`` object at the end: near the end of a non-streaming
JSON body (only ``service_tier``/``system_fingerprint`` follow it), and in the
last data event of a stream when the client asked for
``stream_options: {"include_usage": true}`` (earlier events carry
``"usage": null``; the final ``data: [DONE]`` follows). The relay keeps a
reference to the last two chunks it wrote; after the response has ended,
:func:`usage_from_tail` looks for the last ``"usage"`` key in those bytes and
decodes only the object after it.

A literal ``"usage"`` inside a JSON string cannot match: there the quotes are
escaped (``\\"usage\\"``). Compressed bodies cannot be read from their tail
(deflate needs everything before it), so they yield nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

__all__ = ["Usage", "usage_from_tail"]

_KEY = b'"usage"'
# JSON whitespace, the colon, whitespace: what follows a key.
_COLON = re.compile(rb"[ \t\r\n]*:[ \t\r\n]*")
# A usage object is a few hundred bytes; never decode more than this of what follows it.
_WINDOW = 4096
_decoder = json.JSONDecoder()


@dataclass(frozen=True, slots=True)
class Usage:
    """Prompt (input) and completion (output) tokens; ``None`` where not reported."""

    prompt_tokens: int | None
    completion_tokens: int | None


def usage_from_tail(previous: bytes, last: bytes) -> Usage | None:
    """The usage object found last in ``previous + last``, or ``None``.

    ``previous`` and ``last`` are the final two chunks of a response body as
    they arrived. Both the Chat Completions names (``prompt_tokens``,
    ``completion_tokens``) and the Responses API names (``input_tokens``,
    ``output_tokens``) are read. ``"usage": null`` counts as no usage.
    """
    found = _find(last)
    if found is None and previous:
        # The usage event may sit in the chunk before (a lone "data: [DONE]" last),
        # or straddle the two chunks.
        found = _find(previous + last)
    return found


def _find(data: bytes) -> Usage | None:
    end = len(data)
    while True:
        at = data.rfind(_KEY, 0, end)
        if at < 0:
            return None
        colon = _COLON.match(data, at + len(_KEY))
        if colon is not None:
            if data[colon.end() : colon.end() + 1] != b"{":
                return None  # "usage": null (or a non-object): the last one decides
            return _decode(data, colon.end())
        end = at  # "usage" was a value, not a key; look further back


def _decode(data: bytes, start: int) -> Usage | None:
    # Decode from the '{' on: a multi-byte character cut at the chunk's start is
    # never part of this slice.
    text = data[start : start + _WINDOW].decode("utf-8", "replace")
    try:
        obj, _ = _decoder.raw_decode(text)
    except ValueError:
        return None  # cut off: the object began before the bytes we kept
    if not isinstance(obj, dict):
        return None
    prompt = _count(obj.get("prompt_tokens", obj.get("input_tokens")))
    completion = _count(obj.get("completion_tokens", obj.get("output_tokens")))
    if prompt is None and completion is None:
        return None
    return Usage(prompt, completion)


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value
