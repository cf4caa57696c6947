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

:class:`Usage` is what every reader hands on (to the metrics, the access log
and the token budgets' reconciliation, admission/budget.py): a reader of another
dialect fills the same three fields, with ``prompt_tokens`` counting every
input token, cached ones included.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["Usage", "billable_tokens", "usage_from_tail"]

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
# The same, from the key on: the usual answer's usage in one match.
_KEYED_LAYOUT = re.compile(rb'"usage"[ \t\r\n]*:[ \t\r\n]*' + _OPENAI_LAYOUT.pattern)
# A count: its key, then a whole number (followed by what ends a JSON number in an object).
_COUNT = re.compile(
    rb'"(prompt_tokens|input_tokens|completion_tokens|output_tokens|cached_tokens)"'
    rb"[ \t\r\n]*:[ \t\r\n]*(\d+)(?=[ \t\r\n,}])"
)
# Cached input tokens: prompt_tokens_details (Chat Completions) or
# input_tokens_details (Responses API), inside the usage object.
_CACHED = b'"cached_tokens"'


class Usage(NamedTuple):
    """Prompt (input) and completion (output) tokens, ``None`` where not
    reported; ``cached_tokens``: the part of the input read from the
    provider's prompt cache (0 when not reported)."""

    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int = 0


def billable_tokens(usage: Usage) -> int | None:
    """The tokens a token budget is charged for an answer: input and output,
    without cached input (providers do not count it against their own rate
    limits). ``None`` when the usage reports neither count."""
    prompt, completion = usage.prompt_tokens, usage.completion_tokens
    if prompt is None and completion is None:
        return None
    return max(0, (prompt or 0) - usage.cached_tokens) + (completion or 0)


def usage_from_tail(previous: bytes, last: bytes) -> Usage | None:
    """The usage object found last in ``previous + last``, or ``None``.

    ``previous`` and ``last`` are the final two chunks of a response body as
    they arrived. Both the Chat Completions names (``prompt_tokens``,
    ``completion_tokens``) and the Responses API names (``input_tokens``,
    ``output_tokens``) are read. ``"usage": null`` counts as no usage.
    """
    at = last.rfind(_KEY)
    if at >= 0:  # the usual case first, in one match (this runs once per answer)
        common = _KEYED_LAYOUT.match(last, at)
        if common is not None and last.find(_CACHED, common.end(), at + _WINDOW) < 0:
            return Usage(int(common.group(1)), int(common.group(2)))
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
            return _read(data, colon.end())
        end = at  # "usage" was a value, not a key; look further back


def _read(data: bytes, start: int) -> Usage | None:
    """The counts of the usage object starting at ``start``, if it is whole.

    Its extent is found by matching braces (its values are numbers and
    objects of numbers); its counts by their key names, which its nested
    ``*_details`` objects do not reuse (but ``cached_tokens``, read from
    them). No JSON is decoded: this runs once per response.
    """
    common = _OPENAI_LAYOUT.match(data, start)
    cached_at = data.find(_CACHED, start, start + _WINDOW)
    if common is not None and cached_at < 0:  # both counts first, whole, no cache
        return Usage(int(common.group(1)), int(common.group(2)))
    depth = 0
    for brace in _BRACES.finditer(data, start, start + _WINDOW):
        depth += 1 if brace.group() == b"{" else -1
        if depth == 0:
            stop = brace.end()
            break
    else:
        return None  # cut off (or not a usage object we understand)
    prompt: int | None = None
    completion: int | None = None
    cached = 0
    if common is not None:
        prompt, completion = int(common.group(1)), int(common.group(2))
        counts = _COUNT.finditer(data, cached_at, stop) if cached_at < stop else ()
    else:
        counts = _COUNT.finditer(data, start, stop)
    seen_cached = False
    for match in counts:
        name, value = match.group(1), int(match.group(2))
        if name in (b"prompt_tokens", b"input_tokens"):
            if prompt is None:
                prompt = value
        elif name == b"cached_tokens":
            if not seen_cached:
                seen_cached, cached = True, value
        elif completion is None:
            completion = value
    if prompt is None and completion is None:
        return None
    return Usage(prompt, completion, cached)
