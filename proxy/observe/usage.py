"""Token usage read from the last bytes of a response, never from the whole body.

OpenAI puts the ``usage`` object at the end: near the end of a non-streaming
JSON body (only ``service_tier``/``system_fingerprint`` follow it), and in the
last data event of a stream when the client asked for
``stream_options: {"include_usage": true}`` (earlier events carry
``"usage": null``; the final ``data: [DONE]`` follows). The relay keeps a
reference to the last two chunks it wrote; after the response has ended,
:func:`usage_from_tail` looks for the last ``"usage"`` key in those bytes and
reads the counts of the object after it, only when that object is whole.

A literal ``"usage"`` inside a JSON string cannot match: there the quotes are
escaped (``\\"usage\\"``). Compressed bodies cannot be read from their tail
(deflate needs everything before it), so they yield nothing.

Anthropic's Messages API ends a JSON answer with its ``usage`` too, but a
stream splits it: ``message_start`` (the first event) carries
``input_tokens`` and the cache counts, the last ``message_delta`` the final
``output_tokens`` (README, "Token usage"). For a stream the relay also keeps
the start of its first chunk, and :func:`usage_from_stream` takes each count
from the end when the end reports it, else from that first event. Anthropic's
``cache_read_input_tokens`` and ``cache_creation_input_tokens`` are counts of
their own: its ``input_tokens`` leaves them out.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["Usage", "usage_from_stream", "usage_from_tail"]

_KEY = b'"usage"'
# JSON whitespace, the colon, whitespace: what follows a key.
_COLON = re.compile(rb"[ \t\r\n]*:[ \t\r\n]*")
# A usage object is a few hundred bytes; never look further than this past its start.
_WINDOW = 4096
_BRACES = re.compile(rb"[{}]")
# OpenAI's own layout, read in one match: {"prompt_tokens": N, "completion_tokens": M ...
_OPENAI_LAYOUT = re.compile(
    rb'\{[ \t\r\n]*"prompt_tokens"[ \t\r\n]*:[ \t\r\n]*(\d+)[ \t\r\n]*,'
    rb'[ \t\r\n]*"completion_tokens"[ \t\r\n]*:[ \t\r\n]*(\d+)(?=[ \t\r\n,}])'
)
# A count: its key, then a whole number (followed by what ends a JSON number in an object).
_COUNT = re.compile(
    rb'"(prompt_tokens|input_tokens|completion_tokens|output_tokens'
    rb'|cache_read_input_tokens|cache_creation_input_tokens)"[ \t\r\n]*:[ \t\r\n]*'
    rb"(\d+)(?=[ \t\r\n,}])"
)
# Which of Usage's fields each count's name fills (the first occurrence wins).
_FIELD = {
    b"prompt_tokens": 0,
    b"input_tokens": 0,
    b"completion_tokens": 1,
    b"output_tokens": 1,
    b"cache_read_input_tokens": 2,
    b"cache_creation_input_tokens": 3,
}


class Usage(NamedTuple):
    """Prompt (input) and completion (output) tokens, and Anthropic's cache
    reads and writes; ``None`` where not reported."""

    prompt_tokens: int | None
    completion_tokens: int | None
    cache_read_tokens: int | None = None
    cache_creation_tokens: int | None = None


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


def usage_from_stream(first: bytes, previous: bytes, last: bytes) -> Usage | None:
    """A stream's usage: each count from its end (:func:`usage_from_tail`) when
    reported there, else from the first ``usage`` object of ``first`` (the start
    of the stream's first chunk: Anthropic's ``message_start``)."""
    end = usage_from_tail(previous, last)
    if not first or (end is not None and None not in end):
        return end
    start = _find_first(first)
    if start is None:
        return end
    if end is None:
        return start
    return Usage(*(e if e is not None else s for e, s in zip(end, start, strict=True)))


def _find_first(data: bytes) -> Usage | None:
    at = data.find(_KEY)
    while at >= 0:
        colon = _COLON.match(data, at + len(_KEY))
        if colon is not None:
            if data[colon.end() : colon.end() + 1] != b"{":
                return None
            return _read(data, colon.end())
        at = data.find(_KEY, at + len(_KEY))
    return None


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
            return _read(data, colon.end())
        end = at  # "usage" was a value, not a key; look further back


def _read(data: bytes, start: int) -> Usage | None:
    """The counts of the usage object starting at ``start``, if it is whole.

    Its extent is found by matching braces (its values are numbers and
    objects of numbers); its counts by their key names, which its nested
    ``*_details`` objects do not reuse. No JSON is decoded: this runs once
    per response.
    """
    common = _OPENAI_LAYOUT.match(data, start)
    if common is not None:  # the usual case: both counts first, whole
        return Usage(int(common.group(1)), int(common.group(2)))
    depth = 0
    for brace in _BRACES.finditer(data, start, start + _WINDOW):
        depth += 1 if brace.group() == b"{" else -1
        if depth == 0:
            stop = brace.end()
            break
    else:
        return None  # cut off (or not a usage object we understand)
    counts: list[int | None] = [None, None, None, None]
    for match in _COUNT.finditer(data, start, stop):
        field = _FIELD[match.group(1)]
        if counts[field] is None:
            counts[field] = int(match.group(2))
    if counts == [None, None, None, None]:
        return None
    return Usage(*counts)
