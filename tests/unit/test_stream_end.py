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


# A terminal event of 30 KB (a Responses stream's response.completed carries
# the whole response) spread over three chunks: the first is the one the pipe
# keeps as the last event's start, the middle one is not kept.
TEXT = "x" * 30000
BIG_NAMED = (
    b'event: response.completed\ndata: {"type":"response.completed","response":{"text":"%b"}}\n\n'
    % TEXT.encode()
)
BIG_TYPE_FIRST = b'data: {"type": "response.completed", "response": {"text": "%b"}}\n\n' % (
    TEXT.encode()
)
BIG_TYPE_LAST = b'data: {"response": {"text": "%b"}, "type": "response.completed"}\n\n' % (
    TEXT.encode()
)
BIG_DELTA = BIG_NAMED.replace(b"response.completed", b"response.output_text.delta")
BIG_NESTED_TYPE = b'data: {"response": {"type": "response.completed"}, "text": "%b"}\n\n' % (
    TEXT.encode()
)


def _thirds(event: bytes, before: bytes = b"") -> tuple[bytes, bytes, bytes]:
    return before + event[:10000], event[10000:20000], event[20000:]


# (the event, what preceded it in its first chunk, expected)
SPLIT_CASES = {
    "named by its event line": (BIG_NAMED, b"", True),
    "after another event in the first chunk": (BIG_NAMED, DELTA, True),
    "data only, type first": (BIG_TYPE_FIRST, b"", True),
    "data only, type last": (BIG_TYPE_LAST, b"", True),
    "a large delta": (BIG_DELTA, b"", False),
    "a terminal type nested, not at the top": (BIG_NESTED_TYPE, b"", False),
    "after a terminal event in the first chunk": (BIG_DELTA, COMPLETED, False),
}


@pytest.mark.parametrize("case", SPLIT_CASES)
def test_an_event_over_three_chunks(case: str) -> None:
    event, before, expected = SPLIT_CASES[case]
    start, middle, last = _thirds(event, before)
    assert stream_ended(middle, last, 10**6, event_start=start) is expected


def test_an_event_over_three_chunks_without_its_start_is_not_taken() -> None:
    _, middle, last = _thirds(BIG_NAMED)
    assert stream_ended(middle, last, 10**6) is False


def test_the_start_among_the_last_two_chunks_is_read_from_them() -> None:
    first, second = BIG_NAMED[:20000], BIG_NAMED[20000:]
    assert stream_ended(first, second, 10**6, event_start=first) is True
    done = b"data: [DONE]\n\n"
    assert stream_ended(b"", done, 10**6, event_start=done) is True


def test_three_chunks_in_a_row_are_read_whole() -> None:
    """The chunk the event began in, just before the last two (its place in
    the stream says so): [DONE] written as its field, its value, its blank line."""
    sent_before = 1000
    start, middle, last = b"data: ", b"[DONE]", b"\n\n"
    total = sent_before + len(start + middle + last)
    assert stream_ended(middle, last, total, event_start=start, event_start_at=sent_before)
    # Not in a row (a chunk between them unknown): the value is not read.
    assert not stream_ended(middle, last, total + 1, event_start=start, event_start_at=sent_before)
