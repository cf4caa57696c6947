"""The model finder agrees with json.loads and only looks at the top level."""

from __future__ import annotations

import json

import pytest

from proxy.errors import InvalidRequest
from proxy.findmodel import find_json_model, find_multipart_model, rewrite_model


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


def test_large_blob_body_is_scanned_structurally() -> None:
    blob = "A" * (3 << 20)
    body = json.dumps({"messages": [{"content": [{"image_url": {"url": blob}}]}], "model": "gpt-4o"}).encode()
    found = find_json_model(body)
    assert found.model == "gpt-4o"
    assert body[found.start : found.end] == b'"gpt-4o"'


def test_large_body_of_many_small_values_falls_back_to_exact_scan() -> None:
    messages = [{"role": "user", "content": f"message {i} \"q\""} for i in range(40000)]
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
