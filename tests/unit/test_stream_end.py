"""stream_ended: the last event of the last two chunks sent, terminal or not."""

from __future__ import annotations

import pytest

from proxy.observe.stream_end import stream_ended

COMPLETED = b'event: response.completed\ndata: {"type":"response.completed","response":{}}\n\n'
DELTA = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta"}\n\n'

# (previous, last, all bytes sent: None for "more than these two chunks", expected)
CASES = {
    "[DONE] alone in the last chunk": (b"data: {}\n\n", b"data: [DONE]\n\n", None, True),
    "[DONE] after a chunk in the same piece": (b"", b"data: {}\n\ndata: [DONE]\n\n", None, True),
    "[DONE] without the space": (b"data: {}\n\n", b"data:[DONE]\n\n", None, True),
    "the whole body is one [DONE]": (b"", b"data: [DONE]\n\n", 14, True),
    "a lone [DONE] whose start is unknown": (b"", b"data: [DONE]\n\n", None, False),
    "an event split across the two chunks": (DELTA + COMPLETED[:20], COMPLETED[20:], None, True),
    "an event begun before the two chunks": (COMPLETED[:20], COMPLETED[20:], None, False),
    "the blank line split across the chunks": (DELTA + COMPLETED[:-1], b"\n", None, True),
    "CRLF line endings": (b"", DELTA + COMPLETED.replace(b"\n", b"\r\n"), None, True),
    "CR line endings": (b"", DELTA + COMPLETED.replace(b"\n", b"\r"), None, True),
    "one CRLF is not a blank line": (DELTA, b"data: [DONE]\r\n", None, False),
    "no blank line yet": (DELTA, COMPLETED[:-1], None, False),
    "a comment line after the event": (DELTA, COMPLETED + b": keep-alive\n\n", None, False),
    "message_stop by its event name": (
        b"",
        DELTA + b"event: message_stop\ndata: {}\n\n",
        None,
        True,
    ),
    "message_stop by its data type": (
        b"",
        DELTA + b'data: {"type": "message_stop"}\n\n',
        None,
        True,
    ),
    "another event last": (COMPLETED, DELTA, None, False),
    "response.failed": (
        DELTA,
        b'event: response.failed\ndata: {"type":"response.failed"}\n\n',
        None,
        True,
    ),
    "response.incomplete": (b"", DELTA + b'data: {"type":"response.incomplete"}\n\n', None, True),
    "an error event": (DELTA, b'event: error\ndata: {"type":"error"}\n\n', None, False),
    "the event name wins over the data": (
        b"",
        DELTA + b'event: ping\ndata: {"type":"message_stop"}\n\n',
        None,
        False,
    ),
    "data that is not JSON": (b"", DELTA + b"data: {not json\n\n", None, False),
    "JSON that is not an object": (b"", DELTA + b'data: ["message_stop"]\n\n', None, False),
    "nothing sent": (b"", b"", 0, False),
}


@pytest.mark.parametrize("case", CASES)
def test_stream_ended(case: str) -> None:
    previous, last, sent, expected = CASES[case]
    total = len(previous) + len(last) if sent is not None else 10**6
    assert stream_ended(previous, last, total) is expected
