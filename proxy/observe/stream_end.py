"""Did a server-sent event stream reach its terminal event? Read from its last bytes.

A client that hangs up once it has a stream's last event (Codex closes the
connection as soon as ``response.completed`` is in) got the whole answer,
though the upstream's response had not ended yet. The relay asks
:func:`stream_ended` only when a client left mid-body, with the last two
chunks it wrote (the references the usage reading keeps, observe/usage.py)
and the one where the last event began when that is older (a Responses
stream's ``response.completed`` carries the whole response, tens of KB, often
more than two reads): per chunk, the pipe only checks whether it ends with a
blank line.

The terminal events (README, "Access log"):

- ``data: [DONE]``, the end of an OpenAI Chat Completions or Completions stream;
- ``response.completed``, the end of a Responses API stream (and
  ``response.incomplete`` and ``response.failed``, which end it the same way:
  the response went out whole, it just did not succeed);
- ``message_stop``, the end of an Anthropic Messages stream.

An event counts when it is whole (the blank line that ends it was sent,
WHATWG HTML §9.2.6 "Interpreting an event stream") and is the last event
sent, named by its ``event:`` field or by the ``type`` of its JSON data.
On the Responses WebSocket each message is one JSON event
(:func:`message_ended`); the tunnel keeps the last message it passed to
the client, and asks only when the client vanished.
"""

from __future__ import annotations

import json
import re

__all__ = ["TERMINAL_EVENTS", "message_ended", "stream_ended"]

TERMINAL_EVENTS = frozenset(
    {"response.completed", "response.incomplete", "response.failed", "message_stop"}
)

_DONE = b"[DONE]"
# A run of line endings; one with two or more is a blank line: an event's end.
_ENDINGS = re.compile(rb"[\r\n]+")
_LINE_END = re.compile(rb"\r\n|\r|\n")
# The type of a JSON event as its first key (at the start of its data) or its
# last (at the end of its data): read when the middle of the event is unknown.
_TYPE_FIRST = re.compile(rb' ?\{\s*"type"\s*:\s*"([^"\\]*)"')
_TYPE_LAST = re.compile(rb'"type"\s*:\s*"([^"\\]*)"\s*\}\s*$')


def stream_ended(
    previous: bytes, last: bytes, sent: int, *, event_start: bytes = b"", event_start_at: int = 0
) -> bool:
    """Is the last event of a stream a terminal one? ``previous`` and ``last``
    are the final two chunks sent, ``sent`` the count of all bytes sent (when
    the two chunks are all of it, the first starts an event); ``event_start``
    is the chunk sent after the last one that ended with a blank line (the
    pipe keeps it: outbound/pipe.py), where an event begun before the two
    chunks starts, and ``event_start_at`` the count of bytes sent before it.

    Runs once, for a client that left mid-body; the chunks are joined here.
    """
    data = previous + last if previous else last
    # Does data begin an event: is it all that was sent, or is its first chunk
    # the one the last event began in?
    starts_event = len(data) == sent or event_start is (previous or last)
    if not starts_event and event_start and event_start_at + len(event_start) + len(data) == sent:
        data = event_start + data  # the chunk just before the two: all three are known
        starts_event = True
    runs = list(_ENDINGS.finditer(data))
    if not runs or runs[-1].end() != len(data) or not _blank_line(runs[-1].group()):
        return False  # the last event is not whole
    start = 0 if starts_event else -1
    for run in reversed(runs[:-1]):
        if _blank_line(run.group()):
            start = run.end()
            break
    if start >= 0:
        return _is_terminal(data[start : runs[-1].start()])
    if not event_start:
        return False  # the last event began before these chunks
    return _is_terminal_split(_last_event_start(event_start), data[: runs[-1].start()])


def _last_event_start(chunk: bytes) -> bytes:
    """What follows the last blank line in ``chunk`` (all of it when none)."""
    start = 0
    for run in _ENDINGS.finditer(chunk):
        if _blank_line(run.group()):
            start = run.end()
    return chunk[start:]


def _is_terminal_split(head: bytes, end: bytes) -> bool:
    """Is an event whose first bytes are ``head`` and last ``end`` (the chunks
    between them not kept) a terminal one? Named by an ``event:`` line whole in
    either part, else by its JSON data's ``type`` when that is the first key
    (at the start of ``head``'s data) or the last (at the end of ``end``): the
    only places a top-level key can be told from a part of a document.
    A terminal event is its stream's last, so no later event is taken for it."""
    head_lines = _LINE_END.split(head)[:-1]  # the last may be cut
    end_lines = _LINE_END.split(end)[1:]  # the first may be cut
    data_start = b""
    for line in head_lines + end_lines:
        field, colon, value = line.partition(b":")
        if colon and field == b"event":
            name = value[1:] if value.startswith(b" ") else value
            return name.decode("utf-8", "replace") in TERMINAL_EVENTS
    for line in _LINE_END.split(head):
        field, colon, value = line.partition(b":")
        if colon and field == b"data":
            data_start = value
            break
    found = _TYPE_FIRST.match(data_start) or _TYPE_LAST.search(end)
    return found is not None and found.group(1).decode("utf-8", "replace") in TERMINAL_EVENTS


def _blank_line(run: bytes) -> bool:
    return len(_LINE_END.findall(run)) >= 2


def _is_terminal(event: bytes) -> bool:
    name = b""
    lines: list[bytes] = []
    for line in _LINE_END.split(event):
        field, colon, value = line.partition(b":")
        if not colon:
            continue
        if value.startswith(b" "):
            value = value[1:]
        if field == b"event":
            name = value
        elif field == b"data":
            lines.append(value)
    if name:
        return name.decode("utf-8", "replace") in TERMINAL_EVENTS
    payload = b"\n".join(lines)
    return payload == _DONE or message_ended(payload)


def message_ended(message: bytes) -> bool:
    """Is ``message`` (one JSON event, as on the Responses WebSocket) a terminal event?"""
    if not message.lstrip().startswith(b"{"):
        return False
    try:
        doc = json.loads(message)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("type") in TERMINAL_EVENTS
