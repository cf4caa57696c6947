"""The model finder agrees with json.loads and only looks at the top level."""

from __future__ import annotations

import json

import pytest

from proxy.errors import InvalidRequest
from proxy.inbound.json_model import _find_exact, _find_in_one_scan, find_json_model
from proxy.inbound.model import ModelAbsent, rewrite_model
from proxy.inbound.multipart_model import find_multipart_model


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"gpt-4o"}',
        b' \n{ "messages": [], "model" : "gpt-4o" , "x": {"model": "nested"} } \n',
        b'{"tools": [{"model": "inner"}], "response_format": {"model": "no"}, "model": "gpt-4o"}',
        b'{"\\u006dodel": "gpt-4o"}',
        '{"content": "h\u00e9llo \u2603", "model": "gpt-4o"}'.encode(),
        '{"model": "gpt-4o"}'.encode("utf-16"),
        '{"model": "gpt-4o"}'.encode("utf-8-sig"),
    ],
)
@pytest.mark.parametrize("exact_limit", [None, 0], ids=["exact", "structural"])
def test_finds_top_level_model(body: bytes, exact_limit: int | None) -> None:
    found = find_json_model(body, exact_limit=exact_limit)
    assert found.model == "gpt-4o" == json.loads(body)["model"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "invalid_json"),
        (b"not json", "invalid_json"),
        (b'{"model": "a",}', "invalid_json"),
        (b'{"model": "a"} trailing', "invalid_json"),
        (b'{"model": "a"', "invalid_json"),
        (b"\xff\xfe\x00", "invalid_json"),
        (b"[]", "missing_model"),
        (b'"model"', "missing_model"),
        (b"{}", "missing_model"),
        (b'{"model": 4}', "missing_model"),
        (b'{"model": null}', "missing_model"),
        (b'{"x": {"model": "nested"}}', "missing_model"),
        (b'{"model": "a", "model": "b"}', "ambiguous_model"),
        (b'{"model": "a", "\\u006dodel": "b"}', "ambiguous_model"),
    ],
)
@pytest.mark.parametrize("exact_limit", [None, 0], ids=["exact", "structural"])
def test_refusals(body: bytes, code: str, exact_limit: int | None) -> None:
    with pytest.raises(InvalidRequest) as err:
        find_json_model(body, exact_limit=exact_limit)
    assert err.value.code == code


@pytest.mark.parametrize(
    ("body", "absent"),
    [
        (b"{}", True),
        (b'{"input": "x", "x": {"model": "nested"}}', True),
        (b'{"prompt": {"id": "pmpt_1"}, "s": "\\"model\\": \\"a\\""}', True),
        (b'{"model": null}', False),
        (b'{"model": 4}', False),
        (b'{"model": ["a"]}', False),
        (b"[]", False),
        (b'"model"', False),
    ],
)
@pytest.mark.parametrize("exact_limit", [None, 0], ids=["exact", "structural"])
def test_a_model_not_there_is_told_from_one_not_usable(
    body: bytes, absent: bool, exact_limit: int | None
) -> None:
    """Only an object with no top-level model may be routed by path instead."""
    with pytest.raises(InvalidRequest) as err:
        find_json_model(body, exact_limit=exact_limit)
    assert err.value.code == "missing_model"
    assert isinstance(err.value, ModelAbsent) is absent


PRETTY = json.dumps(
    {"messages": [{"role": "user", "content": "hi"}], "model": "a", "n": 1}, indent=2
).encode()


# Over _SEARCH_LIMIT, with containers on both sides of the model and decoys after it.
LARGE_MID = json.dumps(
    {
        "messages": [{"role": "user", "content": "x" * 5000}],
        "model": "a",
        "stream_options": {"include_usage": True},
        "tools": [{"model": "a"}, {"x": {"model": "b", "k": ["model"], "j": 1, "i": 2}}],
    }
).encode()


# Bodies for each way the one-scan road finds the model's bytes (see
# _find_in_one_scan): model first; after scalars only; last; before the end
# with containers on both sides; "model" strings after it that are not the
# key (nested keys, values, escaped quotes, too many of them); a key spelled
# with escapes; non-ASCII on either side; whitespace of every kind.
@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"a","messages":[]}',
        b'{"stream":true,"t":0.5,"s":"x","model":"a","messages":[{"model":"b"}]}',
        b'{"messages":[{"role":"user"}],"model":"a"}',
        b'{"messages":[],"model":"a","stream":true,"stream_options":{"include_usage":true}}',
        b'{"messages":[],"model":"a","tools":[{"model":"a"}],"x":{"model":"a","k":1}}',
        b'{"messages":[],"model":"a","x":{"model":"a"},"y":2}',
        b'{"messages":[],"model":"a","x":"\\"model"}',
        b'{"messages":[],"model":"a","x":"\\\\\\"model"}',
        b'{"messages":[],"model":"a","x":"model","y":["model",1]}',
        b'{"messages":[],"model":"a","x":{"model":1}}',
        b'{"m":[],"model":"a","x":["model","model","model","model","model"]}',
        b'{"messages":[],"\\u006dodel":"a","tools":[{"model":"b"}]}',
        b'{"messages":[],"mod\\u0065l":"a"}',
        '{"content":"\u00e9\u2603\U0001f600","model":"\u00fcber","b":"\u00fc"}'.encode(),
        '{"messages":["\u00e9"],"model":"\u2603","x":"\u00e9\u00e9\u00e9"}'.encode(),
        '{"messages":["\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9"],"model":"\u2603","x":"\u00e9"}'.encode(),
        b'{"model":"a\\"b\\\\","x":1}',
        b' \n{ "messages" : [ ] ,\t"model" :\r\n "a" , "x" : { } }\n ',
        PRETTY,
        LARGE_MID,
        LARGE_MID.replace(b'"model":', b'"\\u006dodel":'),
    ],
    ids=lambda body: f"{len(body)}B:{body[:40].decode('utf-8', 'replace')}",
)
def test_one_scan_finds_the_bytes_the_long_walk_finds(body: bytes) -> None:
    found = _find_in_one_scan(body)
    assert found is not None  # the road handled it: the comparison is not vacuous
    assert found == _find_exact(body) == find_json_model(bytearray(body))
    assert json.loads(body[found.start : found.end]) == found.model == json.loads(body)["model"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"model":"a","x":[],"\\u006dodel":"b"}', "ambiguous_model"),
        (b'{"model":1,"model":"b"}', "ambiguous_model"),
        (b'{"model":["a"]}', "missing_model"),
        (b'{"x":{"model":"a"}}', "missing_model"),
    ],
)
def test_one_scan_refuses_as_the_long_walk_does(body: bytes, code: str) -> None:
    with pytest.raises(InvalidRequest) as fast:
        _find_in_one_scan(body)
    with pytest.raises(InvalidRequest) as slow:
        _find_exact(body)
    assert (fast.value.code, fast.value.message) == (slow.value.code, slow.value.message)
    assert fast.value.code == code


@pytest.mark.parametrize(
    "body",
    [b"{", b"{}x", b'{"model":"a",}', b"  ", b'["model"]', b'{"model":"\xff"}', b'{"a":' * 100_000],
)
def test_one_scan_leaves_invalid_bodies_to_the_long_walk(body: bytes) -> None:
    """So every invalid_json error keeps the long walk's wording."""
    assert _find_in_one_scan(body) is None


def test_large_blob_body_is_scanned_structurally() -> None:
    blob = "A" * (3 << 20)
    body = json.dumps(
        {"messages": [{"content": [{"image_url": {"url": blob}}]}], "model": "gpt-4o"}
    ).encode()
    found = find_json_model(body)
    assert found.model == "gpt-4o"
    assert body[found.start : found.end] == b'"gpt-4o"'


def test_large_body_of_many_small_values_falls_back_to_exact_scan() -> None:
    messages = [{"role": "user", "content": f'message {i} "q"'} for i in range(40000)]
    body = json.dumps({"messages": messages, "model": "gpt-4o"}).encode()
    assert len(body) > 1 << 20
    assert find_json_model(body).model == "gpt-4o"
    with pytest.raises(InvalidRequest) as err:
        find_json_model(body[:-1] + b",}")
    assert err.value.code == "invalid_json"


def test_rewrite_changes_only_the_value() -> None:
    body = b'{"messages":[{"role":"user","content":"x"}],  "model" :"fast",\n "z": 1.50}'
    found = find_json_model(body)
    out = rewrite_model(body, found, "llama3.2:3b")
    assert out == body.replace(b'"fast"', b'"llama3.2:3b"')


def test_rewrite_non_ascii_body_offsets() -> None:
    body = '{"a": "\u00e9\u00e9\u2603", "model": "fast", "b": "\u00fc"}'.encode()
    out = rewrite_model(body, find_json_model(body), "real")
    assert out == body.replace(b'"fast"', b'"real"')


def _form(*parts: tuple[str, bytes], boundary: str = "XyZ") -> bytes:
    out = b""
    for name, value in parts:
        out += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value
            + b"\r\n"
        )
    return out + f"--{boundary}--\r\n".encode()


def test_multipart_model_and_rewrite() -> None:
    body = _form(
        ("file", b"\x00\x01binary--XyZ-not-a-boundary"), ("model", b"fast"), ("language", b"en")
    )
    found = find_multipart_model(body, b"XyZ")
    assert found.model == "fast"
    out = rewrite_model(body, found, "whisper-1")
    assert out == body.replace(b"\r\n\r\nfast\r\n", b"\r\n\r\nwhisper-1\r\n")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (_form(("model", b"a"), ("model", b"b")), "ambiguous_model"),
        (_form(("file", b"x")), "missing_model"),
        (b"garbage", "invalid_multipart"),
        (b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nabc', "invalid_multipart"),
    ],
)
def test_multipart_refusals(body: bytes, code: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        find_multipart_model(body, b"XyZ")
    assert err.value.code == code


@pytest.mark.parametrize(
    ("body", "absent"),
    [
        (_form(("file", b"x"), ("prompt", b"p")), True),
        (_form(("Model", b"a"), ("models", b"b")), True),
        (_form(("model", b""), ("prompt", b"p")), False),
        (
            _form(
                ("model", b"\xff"),
            ),
            False,
        ),
    ],
)
def test_multipart_model_not_there_is_told_from_one_not_usable(body: bytes, absent: bool) -> None:
    with pytest.raises(InvalidRequest) as err:
        find_multipart_model(body, b"XyZ")
    assert err.value.code == "missing_model"
    assert isinstance(err.value, ModelAbsent) is absent
