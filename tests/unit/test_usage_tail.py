"""Token usage read from the last chunks of real-shaped OpenAI responses."""

from __future__ import annotations

import json

import pytest

from proxy.observe.usage import Usage, billable_tokens, usage_from_stream, usage_from_tail
from tests.fakes.openai_shaped import (
    CHAT_USAGE,
    RESPONSES_USAGE,
    STREAM_USAGE,
    chat_completion_body,
    chat_stream_events,
    responses_body,
)


def test_non_stream_body_whole_in_last_chunk() -> None:
    body = chat_completion_body("gpt-4o-2024-08-06")
    assert usage_from_tail(b"", body) == Usage(*CHAT_USAGE)


def test_non_stream_body_split_anywhere_across_the_two_chunks() -> None:
    # However the socket cut the body, the usage object is read whole.
    body = chat_completion_body("gpt-4o-2024-08-06")
    start = body.index(b'"usage"') - 5
    for cut in range(start, len(body)):
        assert usage_from_tail(body[:cut], body[cut:]) == Usage(*CHAT_USAGE), cut


def test_usage_beginning_before_the_kept_chunks_is_not_guessed() -> None:
    body = chat_completion_body("gpt-4o-2024-08-06")
    inside = body.index(b'"completion_tokens"')
    # The previous chunk starts after "usage": the object is cut; nothing is reported.
    assert usage_from_tail(body[inside:-40], body[-40:]) is None


def test_responses_api_names() -> None:
    assert usage_from_tail(b"", responses_body("gpt-4.1")) == Usage(*RESPONSES_USAGE)


def test_embeddings_usage_has_no_completion_tokens() -> None:
    body = b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,0.2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}'
    assert usage_from_tail(b"", body) == Usage(8, None)


def test_stream_with_include_usage_done_in_its_own_chunk() -> None:
    events = chat_stream_events("gpt-4o-mini", include_usage=True)
    assert events[-1] == b"data: [DONE]\n\n"
    assert usage_from_tail(events[-2], events[-1]) == Usage(*STREAM_USAGE)


def test_stream_with_include_usage_everything_in_one_chunk() -> None:
    stream = b"".join(chat_stream_events("gpt-4o-mini", include_usage=True))
    assert usage_from_tail(b"", stream) == Usage(*STREAM_USAGE)


@pytest.mark.parametrize("cut", [1, 10, 40, 100, 200])
def test_stream_usage_event_split_in_two(cut: int) -> None:
    events = chat_stream_events("gpt-4o-mini", include_usage=True)
    usage_and_done = events[-2] + events[-1]
    assert usage_from_tail(usage_and_done[:cut], usage_and_done[cut:]) == Usage(*STREAM_USAGE)


def test_stream_with_include_usage_earlier_chunks_carry_null() -> None:
    events = chat_stream_events("gpt-4o-mini", include_usage=True)
    assert b'"usage":null' in events[0]
    # A stream cut before its usage chunk: the last "usage" is null, so none.
    assert usage_from_tail(events[1], events[2]) is None


def test_stream_without_include_usage() -> None:
    events = chat_stream_events("gpt-4o-mini", include_usage=False)
    assert not any(b"usage" in e for e in events)
    assert usage_from_tail(b"".join(events[:-1]), events[-1]) is None


def test_the_word_usage_inside_generated_text_is_not_a_key() -> None:
    trap = 'My "usage": {"prompt_tokens": 999999, "completion_tokens": 999999}'
    events = chat_stream_events("gpt-4o-mini", include_usage=False, words=(trap,))
    assert usage_from_tail(b"", b"".join(events)) is None
    events = chat_stream_events("gpt-4o-mini", include_usage=True, words=(trap,))
    assert usage_from_tail(b"", b"".join(events)) == Usage(*STREAM_USAGE)
    body = chat_completion_body("gpt-4o", content=trap)
    assert usage_from_tail(b"", body) == Usage(*CHAT_USAGE)


def test_usage_as_a_value_is_skipped_for_the_key_before_it() -> None:
    body = json.dumps(
        {"usage": {"prompt_tokens": 3, "completion_tokens": 4}, "purpose": "usage"}
    ).encode()
    assert usage_from_tail(b"", body) == Usage(3, 4)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x00\xff binary \x89PNG",
        b'{"usage": "lots"}',
        b'{"usage": {"prompt_tokens": "nine", "completion_tokens": -1}}',
        b'{"usage": {"prompt_tokens": true}}',
        b'{"usage"',
        b'{"usage": ',
        b'{"usage": {"prompt_tokens": 1',
        '{"usage": {"prompt_tokens": 2, "note": "\u00e9t\u00e9"}}'.encode()[:-3],
    ],
)
def test_garbage_and_truncation_yield_nothing(body: bytes) -> None:
    assert usage_from_tail(b"", body) is None


def test_multibyte_text_before_the_usage_object() -> None:
    body = chat_completion_body("gpt-4o", content="日本語のテキスト")
    cut = body.index("本".encode()) + 1  # inside a multi-byte character
    assert usage_from_tail(body[:cut], body[cut:]) == Usage(*CHAT_USAGE)


def test_usage_objects_with_more_than_counts() -> None:
    # OpenRouter-style: floats, booleans, null and nested objects beside the counts.
    body = b'data: {"id":"gen-1","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,"cost":0.00012,"is_byok":false,"prompt_tokens_details":{"cached_tokens":0},"cost_details":{"upstream_inference_cost":null}}}\n\ndata: [DONE]\n\n'
    assert usage_from_tail(b"", body) == Usage(10, 5)
    # Whitespace as a pretty-printer writes it.
    assert usage_from_tail(
        b"", b'{"usage" :\n {\n  "input_tokens" : 7 ,\n  "output_tokens":\t8\n }\n}'
    ) == Usage(7, 8)


def test_a_count_cut_at_the_end_is_not_read() -> None:
    assert usage_from_tail(b"", b'{"usage":{"completion_tokens":12') is None
    assert usage_from_tail(b"", b'{"usage":{"completion_tokens":12}') == Usage(None, 12)


def test_openai_layout_cut_inside_the_object_is_not_read() -> None:
    assert usage_from_tail(b"", b'{"usage":{"prompt_tokens":5,"completion_tokens":1') is None
    assert usage_from_tail(
        b"", b'{"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}'
    ) == Usage(5, 1)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # Chat Completions: cached input in prompt_tokens_details, after both counts.
        (b'{"usage":{"prompt_tokens":2006,"completion_tokens":300,"total_tokens":2306,'
         b'"prompt_tokens_details":{"cached_tokens":1920,"audio_tokens":0},'
         b'"completion_tokens_details":{"reasoning_tokens":0}},"service_tier":"default"}',
         Usage(2006, 300, cached_tokens=1920)),
        # The Responses API: input_tokens_details, between the counts.
        (b'data: {"type":"response.completed","response":{"usage":{"input_tokens":36,'
         b'"input_tokens_details":{"cached_tokens":12},"output_tokens":87,'
         b'"output_tokens_details":{"reasoning_tokens":0},"total_tokens":123}}}\n\n',
         Usage(36, 87, cached_tokens=12)),
        # A "cached_tokens" after the usage object is not its own.
        (b'{"usage":{"prompt_tokens":5,"completion_tokens":1},"meta":{"cached_tokens":4}}',
         Usage(5, 1)),
    ],
)  # fmt: skip
def test_cached_input_tokens_are_read(body: bytes, expected: Usage) -> None:
    assert usage_from_tail(b"", body) == expected


@pytest.mark.parametrize(
    ("usage", "billable"),
    [
        (Usage(2006, 300, cached_tokens=1920), 386),  # cached input is not charged
        (Usage(8, None), 8),  # embeddings: input only
        (Usage(None, 12), 12),
        (Usage(None, None), None),
        (Usage(5, 1, cached_tokens=9), 1),  # a cached count above the input charges no input
        # Anthropic: input leaves cache reads out already; cache writes are charged.
        (Usage(9, 4, 2048, 100), 113),
    ],
)
def test_billable_tokens(usage: Usage, billable: int | None) -> None:
    assert billable_tokens(usage) == billable


# -- Anthropic's Messages API: a JSON answer, and a stream that splits its usage.


def _anthropic_stream(input_tokens: int, output_tokens: int) -> list[bytes]:
    """The events of an Anthropic stream, as its API frames them."""
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-5-5",
            "content": [],
            "stop_reason": None,
            "usage": {
                "input_tokens": input_tokens,
                "cache_creation_input_tokens": 3,
                "cache_read_input_tokens": 40,
                "cache_creation": {"ephemeral_5m_input_tokens": 3, "ephemeral_1h_input_tokens": 0},
                "output_tokens": 1,
            },
        },
    }
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": output_tokens},
    }

    def event(name: str, data: dict[str, object]) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

    return [
        event("message_start", start),
        event("ping", {"type": "ping"}),
        event("message_delta", delta),
        event("message_stop", {"type": "message_stop"}),
    ]


def test_anthropic_stream_takes_input_from_the_start_and_output_from_the_end() -> None:
    events = _anthropic_stream(1200, 37)
    first, previous, last = events[0] + events[1], events[2], events[3]
    assert usage_from_stream(first, previous, last) == Usage(1200, 37, 40, 3)
    # Without its first chunk the stream's end still gives the output tokens.
    assert usage_from_stream(b"", previous, last) == Usage(None, 37)
    # A first chunk cut inside message_start's usage object yields nothing more.
    cut = first[: first.index(b'"cache_read_input_tokens"')]
    assert usage_from_stream(cut, previous, last) == Usage(None, 37)


def test_counts_at_the_end_win_over_the_start() -> None:
    """Anthropic's message_delta counts are cumulative: when it reports input too, it wins."""
    events = _anthropic_stream(1200, 37)
    end = events[2].replace(b'"output_tokens": 37', b'"input_tokens": 1300, "output_tokens": 37')
    assert usage_from_stream(events[0], end, events[3]) == Usage(1300, 37, 40, 3)


def test_an_openai_stream_reads_the_same_with_its_first_chunk() -> None:
    events = chat_stream_events("gpt-4o", include_usage=True)
    first, previous, last = events[0], events[-2], events[-1]
    assert usage_from_stream(first, previous, last) == usage_from_tail(previous, last)


def test_anthropic_json_answer_with_cache_counts() -> None:
    body = json.dumps(
        {
            "id": "msg_1",
            "type": "message",
            "content": [{"type": "text", "text": "hi"}],
            "usage": {
                "input_tokens": 9,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 2048,
                "output_tokens": 4,
            },
        }
    ).encode()
    assert usage_from_tail(b"", body) == Usage(9, 4, 2048, 0)
