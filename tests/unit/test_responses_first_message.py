"""The model of a Responses WebSocket's first message when it sits under
``response`` (README, "Codex CLI"): found by one walk over the top-level
members, with byte offsets that point at the value's own bytes."""

from __future__ import annotations

import json

import pytest

from proxy.inbound.model import ModelAbsent
from proxy.inbound.responses_route import _responses_model

FOUND = [
    b'{"type":"response.create","response":{"model":"gpt-b","input":"hi"}}',
    b' { "type" : "response.create" ,\n "response" : { "input" : [1, {"model": "no"}], "model" : "gpt-b" } } ',
    b'{"x":"\xc3\xa9\xe2\x82\xac","response":{"input":"\xc3\xa9","model":"gpt-b"},"z":"\xf0\x9f\x98\x80"}',
    b'{"response":3,"response":{"model":"gpt-b"}}',  # the last, as json.loads
    b'{"res\\u0070onse":{"model":"gpt-b"},"tools":[{"model":"no"}]}',
]
ABSENT = [
    b'{"type":"response.create","response":{"model":"gpt-b"},"response":null}',
    b'{"type":"response.create","response":["model","gpt-b"]}',
    b'{"type":"response.create","input":{"model":"gpt-b"}}',
]


@pytest.mark.parametrize("message", FOUND)
def test_the_model_under_response_and_its_byte_offsets(message: bytes) -> None:
    found = _responses_model(message)
    assert found.model == "gpt-b"
    assert json.loads(message[found.start : found.end]) == "gpt-b"


@pytest.mark.parametrize("message", ABSENT)
def test_no_object_under_response_is_no_model(message: bytes) -> None:
    with pytest.raises(ModelAbsent):
        _responses_model(message)


def test_invalid_json_under_response_in_a_large_message_is_no_model() -> None:
    # Over 1 MiB the first scan is structural and leaves nested values unchecked.
    message = b'{"x":"' + b"a" * (2 << 20) + b'","response":{"model":"m","y":[1,]}}'
    with pytest.raises(ModelAbsent):
        _responses_model(message)
