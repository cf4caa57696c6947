"""Streaming multipart uploads: the head holds the model; later parts are watched."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from proxy.errors import InvalidRequest
from proxy.inbound.body import BodyBounds, BodyStream
from proxy.inbound.upload import PartWatcher, read_until_model

B = b"bnd"


def part(name: str, value: bytes) -> bytes:
    return (
        b'--bnd\r\nContent-Disposition: form-data; name="'
        + name.encode()
        + b'"\r\n\r\n'
        + value
        + b"\r\n"
    )


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + b"--bnd--\r\n"


class ChunkReader:
    """Hands out the body a chunk per read, as a socket would."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = list(chunks)

    async def readany(self) -> bytes:
        await asyncio.sleep(0)
        return self._chunks.pop(0) if self._chunks else b""


def reader(chunks: list[bytes]) -> Any:
    return ChunkReader(chunks)


class FakeRequest:
    """What BodyStream reads of a request: its length and its body reader."""

    def __init__(self, content: Any, content_length: int | None) -> None:
        self.content = content
        self.content_length = content_length


def stream_after_head(content: Any, head: Any, total: int | None, limit: int = 10**9) -> BodyStream:
    watcher = PartWatcher(B)
    watcher.feed(head.head[head.found.end :])
    return BodyStream(
        FakeRequest(content, total),  # type: ignore[arg-type]
        BodyBounds(limit, 5, math.inf, math.inf),
        head=head.head,
        received=len(head.head),
        watcher=watcher,
    )


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def drain(stream: BodyStream) -> bytes:
    return b"".join([c async for c in stream])


async def test_head_stops_after_model_part_and_stream_restores_body() -> None:
    body = form(
        part("model", b"whisper-1"), part("file", b"\x00" * 100_000), part("language", b"en")
    )
    chunks = split(body, 1000)
    content = reader(chunks)
    head = await read_until_model(content, B, 10**9, 5)
    assert not head.complete
    assert head.found.model == "whisper-1"
    assert len(head.head) < 2000
    stream = stream_after_head(content, head, len(body))
    assert stream.length == len(body)
    assert await drain(stream) == body


async def test_model_after_file_is_found_when_it_arrives() -> None:
    body = form(part("file", b"x" * 50_000), part("model", b"m"))
    head = await read_until_model(reader(split(body, 4096)), B, 10**9, 5)
    assert head.found.model == "m"


async def test_second_model_in_the_streamed_rest_is_refused() -> None:
    body = form(part("model", b"a"), part("file", b"y" * 30_000), part("model", b"b"))
    for size in (7, 1000, 4096):  # markers and headers cut at every kind of edge
        content = reader(split(body, size))
        head = await read_until_model(content, B, 10**9, 5)
        stream = stream_after_head(content, head, len(body))
        with pytest.raises(Exception):  # noqa: B017 - the reason is kept on the stream
            await drain(stream)
        assert stream.failure is not None and stream.failure.code == "ambiguous_model"


async def test_second_model_within_the_head_is_refused() -> None:
    body = form(part("model", b"a"), part("model", b"b"), part("file", b"z" * 10))
    content = reader([body[:200], body[200:]])
    with pytest.raises(InvalidRequest) as err:
        head = await read_until_model(content, B, 10**9, 5)
        stream_after_head(content, head, len(body))
    assert err.value.code == "ambiguous_model"


async def test_limit_applies_to_the_streamed_rest() -> None:
    body = form(part("model", b"a"), part("file", b"q" * 10_000))
    content = reader(split(body, 512))
    head = await read_until_model(content, B, 5_000, 5)
    stream = stream_after_head(content, head, None, limit=5_000)
    with pytest.raises(Exception):  # noqa: B017 - the reason is kept on the stream
        await drain(stream)
    assert stream.failure is not None and stream.failure.code == "request_too_large"


def test_watcher_ignores_model_bytes_inside_file_content() -> None:
    watcher = PartWatcher(B)
    watcher.feed(b'name="model" inside a file, and --bnd without CRLF before it')
    watcher.feed(b'\r\n--bnd\r\nContent-Disposition: form-data; name="file2"\r\n\r\ndata')
