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

:class:`Usage` is what every reader hands on (to the metrics, the access log
and the token budgets' reconciliation, admission/budget.py). OpenAI's
``cached_tokens`` (in ``prompt_tokens_details`` or ``input_tokens_details``)
is the part of ``prompt_tokens`` read from the provider's cache: counted in
the prompt, and apart.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["Usage", "billable_tokens", "usage_from_stream", "usage_from_tail"]

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
# The plainest usage object, compact, in OpenAI's order, with nothing nested (so no
# cached tokens to look for): a compact-JSON server's answer, read in one match that
# also checks the object is whole (about half the steps of _KEYED_LAYOUT's).
_COMPACT = re.compile(
    rb'"usage":\{"prompt_tokens":(\d+),"completion_tokens":(\d+)(?:,"total_tokens":\d+)?\}'
)
# A count: its key, then a whole number (followed by what ends a JSON number in an object).
_COUNT = re.compile(
    rb'"(prompt_tokens|input_tokens|completion_tokens|output_tokens|cached_tokens'
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
    b"cached_tokens": 4,
}
# OpenAI's cached input tokens: inside the usage object's *_details.
_CACHED = b'"cached_tokens"'


class Usage(NamedTuple):
    """Prompt (input) and completion (output) tokens, and Anthropic's cache
    reads and writes; ``None`` where not reported. ``cached_tokens``: the part
    of an OpenAI prompt read from the provider's cache (0 when not reported)."""

    prompt_tokens: int | None
    completion_tokens: int | None
    cache_read_tokens: int | None = None
    cache_creation_tokens: int | None = None
    cached_tokens: int = 0


# A Usage made from a tuple of its five fields, without the generated __new__ (a
# Python frame: ~2,000 instructions against ~400). Used where one is made per answer.
_new_usage = tuple.__new__


def billable_tokens(usage: Usage) -> int | None:
    """The tokens a token budget is charged for an answer: input and output,
    without input read from a prompt cache (providers do not count it against
    their own rate limits): OpenAI's prompt less its cached part, Anthropic's
    input (cache reads already left out) plus its cache writes. ``None`` when
    the usage reports neither count."""
    # Read by index: a named field is a descriptor call in CPython 3.11, and
    # unpacking a tuple's subclass goes through an iterator.
    prompt, completion, written, cached = usage[0], usage[1], usage[3], usage[4]
    if prompt is None and completion is None:
        return None
    return max(0, (prompt or 0) - cached) + (written or 0) + (completion or 0)


def usage_from_tail(previous: bytes, last: bytes) -> Usage | None:
    """The usage object found last in ``previous + last``, or ``None``.

    ``previous`` and ``last`` are the final two chunks of a response body as
    they arrived. Both the Chat Completions names (``prompt_tokens``,
    ``completion_tokens``) and the Responses API names (``input_tokens``,
    ``output_tokens``) are read. ``"usage": null`` counts as no usage.
    """
    at = last.rfind(_KEY)
    if at >= 0:  # the usual cases first, in one match (this runs once per answer)
        compact = _COMPACT.match(last, at)
        if compact is not None:
            prompt, completion = compact.groups()
            return _new_usage(Usage, (int(prompt), int(completion), None, None, 0))
        common = _KEYED_LAYOUT.match(last, at)
        if common is not None and last.find(_CACHED, common.end(), at + _WINDOW) < 0:
            prompt, completion = common.groups()
            return _new_usage(Usage, (int(prompt), int(completion), None, None, 0))
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
    return Usage(
        start.prompt_tokens if end.prompt_tokens is None else end.prompt_tokens,
        start.completion_tokens if end.completion_tokens is None else end.completion_tokens,
        start.cache_read_tokens if end.cache_read_tokens is None else end.cache_read_tokens,
        start.cache_creation_tokens
        if end.cache_creation_tokens is None
        else end.cache_creation_tokens,
        end.cached_tokens or start.cached_tokens,
    )


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
    if common is not None and data.find(_CACHED, start, start + _WINDOW) < 0:
        return Usage(int(common.group(1)), int(common.group(2)))  # both first, whole, no cache
    depth = 0
    for brace in _BRACES.finditer(data, start, start + _WINDOW):
        depth += 1 if brace.group() == b"{" else -1
        if depth == 0:
            stop = brace.end()
            break
    else:
        return None  # cut off (or not a usage object we understand)
    counts: list[int | None] = [None, None, None, None, None]
    for match in _COUNT.finditer(data, start, stop):
        field = _FIELD[match.group(1)]
        if counts[field] is None:
            counts[field] = int(match.group(2))
    prompt, completion, cache_read, cache_creation, cached = counts
    if prompt is None and completion is None and cache_read is None and cache_creation is None:
        return None
    return Usage(prompt, completion, cache_read, cache_creation, cached or 0)
