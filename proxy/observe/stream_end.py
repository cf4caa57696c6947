"""Did a server-sent event stream reach its terminal event? Read from its last bytes.

A client that hangs up once it has a stream's last event (Codex closes the
connection as soon as ``response.completed`` is in) got the whole answer,
though the upstream's response had not ended yet. The relay asks
:func:`stream_ended` only when a client left mid-body, with the last two
chunks it wrote (the references the usage reading keeps, observe/usage.py):
nothing is read or kept per chunk for it.

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


def stream_ended(previous: bytes, last: bytes, sent: int) -> bool:
    """Is the last event of a stream a terminal one? ``previous`` and ``last``
    are the final two chunks sent, ``sent`` the count of all bytes sent (when
    the two chunks are all of it, the first starts an event).

    Runs once, for a client that left mid-body; the chunks are joined here.
    """
    data = previous + last if previous else last
    runs = list(_ENDINGS.finditer(data))
    if not runs or runs[-1].end() != len(data) or not _blank_line(runs[-1].group()):
        return False  # the last event is not whole
    start = 0 if len(data) == sent else -1
    for run in reversed(runs[:-1]):
        if _blank_line(run.group()):
            start = run.end()
            break
    if start < 0:
        return False  # the last event began before these chunks
    return _is_terminal(data[start : runs[-1].start()])


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
