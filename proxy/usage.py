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
from dataclasses import dataclass

__all__ = ["Usage", "usage_from_tail"]

_KEY = b'"usage"'
_WHITESPACE = b" \t\r\n"
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
        value_at = _value_start(data, at + len(_KEY))
        if value_at is not None:
            if data[value_at : value_at + 1] != b"{":
                return None  # "usage": null (or a non-object): the last one decides
            return _decode(data, value_at)
        end = at  # "usage" was a value, not a key; look further back


def _value_start(data: bytes, i: int) -> int | None:
    """Index of the value after ``"usage"`` when a colon follows it, else ``None``."""
    n = len(data)
    while i < n and data[i] in _WHITESPACE:
        i += 1
    if i >= n or data[i] != 0x3A:  # ':'
        return None
    i += 1
    while i < n and data[i] in _WHITESPACE:
        i += 1
    return i if i < n else None


def _decode(data: bytes, start: int) -> Usage | None:
    # Decode from the '{' on: a multi-byte character cut at the chunk's start is
    # never part of this slice.
    text = data[start:].decode("utf-8", "replace")
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
