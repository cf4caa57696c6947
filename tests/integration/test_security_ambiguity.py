"""One parse decides: the model the proxy routes by is the model the upstream sees.

Ambiguous requests are refused before anything reaches the upstream
(README, "One parse decides"). Each case is an entry of
(docs/faults.md, "Requests: one parse decides").
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import tracemalloc
import zlib
from typing import Any

import pytest

from tests.fakes.security import error_of, exchange, running_proxy, split_response
from tests.fakes.upstream import FakeUpstream

JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "gpt-4o-mini", "model": "fast"}',
        b'{"model": "gpt-4o-mini", "\\u006dodel": "fast"}',
        b'{"mod\\u0065l": "gpt-4o-mini", "messages": [], "model": "fast"}',
        b'{"model": null, "model": "gpt-4o-mini"}',
        b'{"model": "gpt-4o-mini", "x": {"y": 1}, "model": "gpt-4o-mini"}',
    ],
)
async def test_two_top_level_models_are_refused(
    make_proxy: Any, fake: FakeUpstream, body: bytes
) -> None:
    client = await make_proxy()
    resp = await client.post("/v1/chat/completions", data=body, headers=JSON)
    assert resp.status == 400
    error = error_of(await resp.read())
    assert error["code"] == "ambiguous_model" and error["param"] == "model"
    assert fake.received == []


async def test_escaped_key_is_the_model_key_and_is_rewritten(
    make_proxy: Any, fake: FakeUpstream
) -> None:
    client = await make_proxy()
    body = b'{"\\u006dodel": "fast", "messages": [{"model": "nested"}], "n": 1.50}'
    resp = await client.post("/v1/chat/completions", data=body, headers=JSON)
    assert resp.status == 200, await resp.text()
    sent = fake.last.body
    # Routed by the escaped key, as json.loads reads it; only the value changed.
    assert json.loads(sent) == {**json.loads(body), "model": "llama3.2:3b"}
    assert sent == body.replace(b'"fast"', b'"llama3.2:3b"')


async def test_nested_model_alone_is_not_a_model(make_proxy: Any, fake: FakeUpstream) -> None:
    client = await make_proxy()
    body = b'{"tools": [{"model": "gpt-4o-mini"}], "response_format": {"model": "fast"}}'
    resp = await client.post("/v1/chat/completions", data=body, headers=JSON)
    assert resp.status == 400
    assert error_of(await resp.read())["param"] == "model"
    assert fake.received == []


@pytest.mark.parametrize(
    ("model", "code"),
    [
        ("", "missing_model"),
        ("gpt-4o-mini\n127.0.0.1 - - fake access line", "invalid_model"),
        ("meta-llama/\x1b[31mred", "invalid_model"),
        ("meta-llama/\u2028x", "invalid_model"),
        ("meta-llama/" + "x" * 10_000, "invalid_model"),
    ],
    ids=["empty", "newline", "ansi", "line-separator", "10k"],
)
async def test_models_that_could_inject_into_logs_are_refused(
    make_proxy: Any, fake: FakeUpstream, caplog: pytest.LogCaptureFixture, model: str, code: str
) -> None:
    client = await make_proxy()
    resp = await client.post("/v1/chat/completions", json={"model": model}, headers=JSON)
    assert resp.status == 400
    body = await resp.read()
    error = error_of(body)
    assert error["code"] == code and error["param"] == "model"
    assert len(body) < 1000  # never echoes a 10 KB model back
    assert fake.received == []
    assert "fake access line" not in caplog.text and "\x1b[31m" not in caplog.text


@pytest.mark.parametrize(
    "models",
    [
        {"model": "gpt-4o-mini"},
        {"model": "fast"},
        {"model": "meta-llama/x"},
    ],
)
@pytest.mark.parametrize(
    "query",
    [
        "model=a&model=b",
        "model=a&MODEL=b",
        "model=a&mod%65l=b",
        "model=a&model=a",
    ],
)
async def test_two_model_query_parameters_are_refused(
    make_proxy: Any, fake: FakeUpstream, query: str, models: dict[str, str]
) -> None:
    client = await make_proxy(
        routes=[{"model": "*", "upstream": "fake"}, {"path": "*", "upstream": "fake"}]
    )
    for method, path, body in (
        ("POST", "/v1/chat/completions", json.dumps(models).encode()),
        ("GET", "/v1/files", None),
    ):
        resp = await client.request(method, f"{path}?{query}", data=body, headers=JSON)
        assert resp.status == 400
        error = error_of(await resp.read())
        assert error["code"] == "ambiguous_model"
    assert fake.received == []


@pytest.mark.parametrize("query", ["model=a;model=b", "a=1;b=2", "model=%ZZ", "x=%4", "x=100%"])
async def test_queries_another_parser_could_split_differently_are_refused(
    make_settings: Any, fake: FakeUpstream, query: str
) -> None:
    settings = make_settings(routes=[{"path": "*", "upstream": "fake"}])
    async with running_proxy(settings) as proxy:
        raw = await exchange(
            proxy.port,
            f"GET /v1/files?{query} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode(),
        )
    status, _, body = split_response(raw)
    assert status == 400
    assert error_of(body)["code"] == "invalid_query"
    assert fake.received == []


async def test_the_upstream_gets_the_query_the_proxy_parsed(
    make_proxy: Any, fake: FakeUpstream
) -> None:
    client = await make_proxy(routes=[{"path": "*", "upstream": "fake"}])
    resp = await client.get("/v1/files?purpose=fine-tune&limit=2&model=gpt-4o-mini")
    assert resp.status == 200
    assert fake.last.query_string == "purpose=fine-tune&limit=2&model=gpt-4o-mini"


def form(*parts: tuple[str, bytes, str]) -> tuple[bytes, str]:
    """A multipart/form-data body from (part headers, content, ...) triples."""
    boundary = "sec0b0undary"
    out = b""
    for disposition, content, extra in parts:
        out += (
            f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n{extra}\r\n".encode()
            + content
            + b"\r\n"
        )
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize(
    "parts",
    [
        [('name="model"', b"whisper-1", ""), ('name="model"', b"gpt-4o-mini", "")],
        [
            ('name="model"', b"whisper-1", ""),
            ('name="file"; filename="a.wav"', b"RIFF", ""),
            ('name="model"', b"whisper-1", ""),
        ],
        [('name="model"', b"whisper-1", ""), ('name="MODEL"', b"fast", "")],
    ],
    ids=["two", "around-a-file", "case"],
)
async def test_two_model_form_fields_are_refused(
    make_proxy: Any, fake: FakeUpstream, parts: list[tuple[str, bytes, str]]
) -> None:
    client = await make_proxy(routes=[{"model": "*", "upstream": "fake"}])
    body, content_type = form(*parts)
    resp = await client.post(
        "/v1/audio/transcriptions", data=body, headers={"Content-Type": content_type}
    )
    if resp.status == 200:
        # Only acceptable when the second field does not name "model" to any
        # form parser: RFC 7578 names are case-sensitive.
        assert parts[1][0] == 'name="MODEL"'
        assert fake.last.body == body
        return
    assert resp.status == 400
    assert error_of(await resp.read())["code"] == "ambiguous_model"
    assert fake.received == [] or fake.last.body != body


@pytest.mark.parametrize(
    "parts",
    [
        [('name="model"; filename="m.txt"', b"gpt-4o-mini", "Content-Type: text/plain\r\n")],
        [('name="model"', b"Z3B0LTRvLW1pbmk=", "Content-Transfer-Encoding: base64\r\n")],
        [("name=\"x\"; name*=UTF-8''model", b"gpt-4o-mini", "")],
        [('name="model"; name="file"', b"gpt-4o-mini", "")],
        [('name="file"', b"gpt-4o-mini", 'Content-Disposition: form-data; name="model"\r\n')],
        [('name="mod\\el"', b"gpt-4o-mini", "")],
        [
            ('name="model"', b"gpt-4o-mini", ""),
            ('name="file"; filename="a\\"; name="model"', b"x", ""),
        ],
    ],
    ids=[
        "filename",
        "base64",
        "rfc2231",
        "param-twice",
        "two-dispositions",
        "escaped",
        "quote-games",
    ],
)
async def test_parts_form_parsers_could_read_differently_are_refused(
    make_proxy: Any, fake: FakeUpstream, parts: list[tuple[str, bytes, str]]
) -> None:
    client = await make_proxy(routes=[{"model": "*", "upstream": "fake"}])
    body, content_type = form(*parts)
    resp = await client.post(
        "/v1/audio/transcriptions", data=body, headers={"Content-Type": content_type}
    )
    assert resp.status == 400
    assert error_of(await resp.read())["code"] == "invalid_multipart"
    assert all(r.body != body for r in fake.received)


async def test_plain_form_fields_are_read_as_every_parser_reads_them(
    make_proxy: Any, fake: FakeUpstream
) -> None:
    client = await make_proxy(routes=[{"model": "*", "upstream": "fake"}])
    body, content_type = form(
        ("name=model", b"whisper-1", ""),
        ('NAME="file";  filename="speech; take 2.wav"', b"RIFF....", "Content-Type: audio/wav\r\n"),
    )
    resp = await client.post(
        "/v1/audio/transcriptions", data=body, headers={"Content-Type": content_type}
    )
    assert resp.status == 200, await resp.text()
    assert fake.last.body == body


async def test_gzip_body_is_routed_and_forwarded_compressed(
    make_proxy: Any, fake: FakeUpstream
) -> None:
    client = await make_proxy()
    packed = gzip.compress(b'{"model": "gpt-4o-mini", "input": "hello"}')
    resp = await client.post(
        "/v1/embeddings", data=packed, headers={**JSON, "Content-Encoding": "gzip"}
    )
    assert resp.status == 200, await resp.text()
    assert fake.last.body == packed  # byte-identical, still labelled gzip
    assert fake.last.headers["content-encoding"] == "gzip"


async def test_gzip_body_with_an_alias_is_sent_decompressed_and_unlabelled(
    make_proxy: Any, fake: FakeUpstream
) -> None:
    client = await make_proxy()
    plain = b'{"model": "fast", "input": "hello"}'
    resp = await client.post(
        "/v1/embeddings", data=gzip.compress(plain), headers={**JSON, "Content-Encoding": "gzip"}
    )
    assert resp.status == 200
    assert "content-encoding" not in fake.last.headers
    assert fake.last.body == plain.replace(b'"fast"', b'"llama3.2:3b"')
    assert int(fake.last.headers["content-length"]) == len(fake.last.body)


def gzip_bomb(inflated_mib: int) -> bytes:
    """A valid gzip body: a JSON object whose string holds ``inflated_mib`` MiB of
    zeros, built from one fully flushed deflate block repeated (~1 KiB per MiB)."""
    prefix, suffix = b'{"model": "gpt-4o-mini", "input": "', b'"}'
    chunk = b"0" * (1 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = deflate.compress(prefix) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    tail = deflate.compress(suffix) + deflate.flush()
    crc = zlib.crc32(prefix)
    for _ in range(inflated_mib):
        crc = zlib.crc32(chunk, crc)
    crc = zlib.crc32(suffix, crc)
    size = len(prefix) + len(chunk) * inflated_mib + len(suffix)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF)
    return header + head + block * inflated_mib + tail + trailer


async def test_gzip_bomb_is_413_with_bounded_inflation(make_proxy: Any, fake: FakeUpstream) -> None:
    limit = 2 << 20
    client = await make_proxy(server={"max_body_bytes": limit})
    bomb = gzip_bomb(1024)  # 1 GiB when inflated
    assert len(bomb) < limit
    tracemalloc.start()
    try:
        resp = await client.post(
            "/v1/embeddings", data=io.BytesIO(bomb), headers={**JSON, "Content-Encoding": "gzip"}
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert resp.status == 413
    assert error_of(await resp.read())["code"] == "request_too_large"
    assert fake.received == []
    # The body, one inflated copy bounded by the limit, and their slices.
    assert peak < 8 * limit, peak


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (gzip.compress(b'{"model": "gpt-4o-mini"}') + gzip.compress(b" "), "invalid_body_encoding"),
        (gzip.compress(b'{"model": "gpt-4o-mini"}')[:-6], "invalid_body_encoding"),
        (b"not gzip at all", "invalid_body_encoding"),
    ],
    ids=["two-members", "truncated", "garbage"],
)
async def test_compressed_bodies_read_one_way_only(
    make_proxy: Any, fake: FakeUpstream, body: bytes, code: str
) -> None:
    client = await make_proxy()
    resp = await client.post(
        "/v1/embeddings", data=body, headers={**JSON, "Content-Encoding": "gzip"}
    )
    assert resp.status == 400
    assert error_of(await resp.read())["code"] == code
    assert fake.received == []


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, gzip", "compress"])
async def test_unsupported_encodings_are_refused(
    make_proxy: Any, fake: FakeUpstream, encoding: str
) -> None:
    client = await make_proxy()
    resp = await client.post(
        "/v1/embeddings",
        data=b'{"model": "gpt-4o-mini"}',
        headers={**JSON, "Content-Encoding": encoding},
    )
    assert resp.status == 400
    assert fake.received == []
