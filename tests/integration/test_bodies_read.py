"""Reading a whole request body: bounds, framing and exact bytes.

Bodies here are megabytes, written in pieces over a raw socket, so the proxy
reads them as they arrive rather than finding them buffered with the head:
that is the path that appends pieces to one growing buffer (docs/decisions.md,
"Request bodies grow in one buffer"). Every test checks
what the upstream was sent, byte for byte, or that it was sent nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest

from tests.conftest import basic_config
from tests.fakes.security import error_of, running_proxy, split_response
from tests.fakes.upstream import FakeUpstream

LIMIT = 3 * 1024 * 1024
PIECE = 64 * 1024


def chat_body(size: int, *, model: str = "gpt-4o-mini", model_last: bool = False) -> bytes:
    """A chat request of exactly ``size`` bytes, its model first or last."""
    empty = {"messages": [{"role": "user", "content": ""}]}
    fields = [("model", model), ("messages", empty["messages"])]
    if model_last:
        fields.reverse()
    shell = json.dumps(dict(fields), separators=(",", ":")).encode()
    pad = size - len(shell)
    assert pad >= 0
    return shell.replace(b'"content":""', b'"content":"' + b"a" * pad + b'"')


def request_head(headers: str, path: str = "/v1/chat/completions") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n{headers}\r\n"
    ).encode()


def chunked(body: bytes) -> bytes:
    out = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + PIECE]), body[i : i + PIECE])
        for i in range(0, len(body), PIECE)
    )
    return out + b"0\r\n\r\n"


def responses_in(raw: bytes) -> list[tuple[int, bytes]]:
    """Status and body of each complete Content-Length-framed response in ``raw``."""
    out = []
    while (head_end := raw.find(b"\r\n\r\n")) >= 0:
        status, headers, _ = split_response(raw[: head_end + 4])
        end = head_end + 4 + int(headers.get("content-length", "0"))
        if len(raw) < end:
            break
        out.append((status, raw[head_end + 4 : end]))
        raw = raw[end:]
    return out


async def send_in_pieces(
    port: int, data: bytes, *, responses: int = 1, half_close: bool = False
) -> bytes:
    """Write ``data`` a piece at a time (each drained) while reading; return what the
    server said once it closed or ``responses`` whole responses came. The server
    may answer (and stop reading) before the last piece: writing then stops."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = b""

    async def read() -> None:
        nonlocal raw
        while len(responses_in(raw)) < responses and (chunk := await reader.read(1 << 16)):
            raw += chunk

    reading = asyncio.ensure_future(read())
    try:
        async with asyncio.timeout(10):
            for i in range(0, len(data), PIECE):
                if reading.done():
                    break
                writer.write(data[i : i + PIECE])
                # Drained, or the answer came first (the server stopped reading).
                draining = asyncio.ensure_future(writer.drain())
                await asyncio.wait({draining, reading}, return_when=asyncio.FIRST_COMPLETED)
                if not draining.done():
                    draining.cancel()
                with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                    await draining
            if half_close and not reading.done():
                writer.write_eof()
            with contextlib.suppress(ConnectionError):
                await reading
        return raw
    finally:
        reading.cancel()
        writer.close()


@pytest.fixture
def settings(make_settings: Any, upstream_url: str) -> Any:
    return make_settings(
        basic_config(upstream_url, server={"max_body_bytes": LIMIT, "body_idle_timeout": 0.5})
    )


@pytest.mark.parametrize("model_last", [False, True], ids=["model_first", "model_last"])
async def test_a_body_of_exactly_the_limit_arrives_whole(
    settings: Any, fake: FakeUpstream, model_last: bool
) -> None:
    body = chat_body(LIMIT, model_last=model_last)
    async with running_proxy(settings) as proxy:
        raw = await send_in_pieces(
            proxy.port,
            request_head(f"Content-Length: {len(body)}\r\nConnection: close\r\n") + body,
        )
    assert split_response(raw)[0] == 200
    assert len(fake.received) == 1
    assert fake.last.body == body
    assert fake.last.headers["content-length"] == str(LIMIT)


async def test_one_byte_over_the_limit_is_413_and_nothing_upstream(
    settings: Any, fake: FakeUpstream
) -> None:
    body = chat_body(LIMIT + 1)
    async with running_proxy(settings) as proxy:
        raw = await send_in_pieces(
            proxy.port, request_head(f"Content-Length: {len(body)}\r\n") + body
        )
    status, _, answer = split_response(raw)
    assert status == 413 and error_of(answer)["code"] == "request_too_large"
    assert fake.received == []


@pytest.mark.parametrize("model_last", [False, True], ids=["model_first", "model_last"])
async def test_a_chunked_body_of_exactly_the_limit_arrives_whole(
    settings: Any, fake: FakeUpstream, model_last: bool
) -> None:
    body = chat_body(LIMIT, model_last=model_last)
    async with running_proxy(settings) as proxy:
        raw = await send_in_pieces(
            proxy.port,
            request_head("Transfer-Encoding: chunked\r\nConnection: close\r\n") + chunked(body),
        )
    assert split_response(raw)[0] == 200
    assert fake.last.body == body


async def test_a_chunked_body_one_byte_over_the_limit_is_413(
    settings: Any, fake: FakeUpstream
) -> None:
    body = chat_body(LIMIT + 1)
    async with running_proxy(settings) as proxy:
        raw = await send_in_pieces(
            proxy.port, request_head("Transfer-Encoding: chunked\r\n") + chunked(body)
        )
    status, _, answer = split_response(raw)
    assert status == 413 and error_of(answer)["code"] == "request_too_large"
    assert fake.received == []


async def test_a_body_shorter_than_its_content_length_then_silence_is_408(
    settings: Any, fake: FakeUpstream
) -> None:
    body = chat_body(2 * 1024 * 1024)
    async with running_proxy(settings) as proxy:
        raw = await send_in_pieces(
            proxy.port, request_head(f"Content-Length: {len(body)}\r\n") + body[: len(body) // 2]
        )
    status, _, answer = split_response(raw)
    assert status == 408 and error_of(answer)["code"] == "request_timeout"
    assert fake.received == []


async def test_a_body_shorter_than_its_content_length_then_half_close_sends_nothing(
    settings: Any, fake: FakeUpstream
) -> None:
    """The client stops sending (FIN) mid-body: the body is incomplete, so nothing of
    it goes upstream, and no success is answered."""
    body = chat_body(2 * 1024 * 1024)
    async with running_proxy(settings) as proxy:
        raw = await send_in_pieces(
            proxy.port,
            request_head(f"Content-Length: {len(body)}\r\n") + body[: len(body) // 2],
            half_close=True,
        )
    assert raw == b"" or split_response(raw)[0] == 400
    assert fake.received == []


async def test_bytes_past_the_content_length_are_not_part_of_the_body(
    settings: Any, fake: FakeUpstream
) -> None:
    """Content-Length frames the body: the upstream gets exactly that many bytes; what
    follows is read as the next request (here garbage: 400, connection closed)."""
    body = chat_body(2 * 1024 * 1024)
    extra = b"a" * 300_000 + b'"}'
    async with running_proxy(settings) as proxy:
        raw = await send_in_pieces(
            proxy.port, request_head(f"Content-Length: {len(body)}\r\n") + body + extra, responses=2
        )
    [(first, _), (second, answer)] = responses_in(raw)
    assert first == 200
    assert second == 400 and error_of(answer)["code"] == "malformed_request"
    assert len(fake.received) == 1
    assert fake.last.body == body


@pytest.mark.parametrize("model_last", [False, True], ids=["model_first", "model_last"])
async def test_a_large_body_is_rewritten_in_place_of_the_model_only(
    settings: Any, fake: FakeUpstream, model_last: bool
) -> None:
    body = chat_body(LIMIT - 100, model="fast", model_last=model_last)
    async with running_proxy(settings) as proxy:
        raw = await send_in_pieces(
            proxy.port,
            request_head(f"Content-Length: {len(body)}\r\nConnection: close\r\n") + body,
        )
    assert split_response(raw)[0] == 200
    assert fake.last.body == body.replace(b'"model":"fast"', b'"model":"llama3.2:3b"')
    assert fake.last.headers["content-length"] == str(len(body) + len("llama3.2:3b") - 4)


SMALL_LIMIT = 256


@pytest.mark.parametrize("size", [2, SMALL_LIMIT, SMALL_LIMIT + 1])
async def test_a_body_that_came_with_its_head_is_taken_whole_within_the_limit(
    make_settings: Any, upstream_url: str, fake: FakeUpstream, size: int
) -> None:
    """Head and body in one write: the body is in before the view runs, and read
    without waiting (inbound/routable.py, body_if_whole); the limit still applies,
    and the next request on the connection is read as one."""
    settings = make_settings(basic_config(upstream_url, server={"max_body_bytes": SMALL_LIMIT}))
    body = b"{}" if size == 2 else chat_body(size)
    assert len(body) == size
    head = request_head(f"Content-Length: {len(body)}\r\n")
    async with running_proxy(settings) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(head + body + head + body)
            raw = b""
            async with asyncio.timeout(10):
                while len(responses_in(raw)) < 2 and (chunk := await reader.read(1 << 16)):
                    raw += chunk
        finally:
            writer.close()
    answers = responses_in(raw)
    if size > SMALL_LIMIT:  # refused (the body was in: the connection goes on)
        assert [status for status, _ in answers] == [413, 413]
        assert error_of(answers[0][1])["code"] == "request_too_large"
        assert fake.received == []
    elif size == 2:  # no model
        assert [status for status, _ in answers] == [400, 400]
    else:
        assert [status for status, _ in answers] == [200, 200]
        assert [r.body for r in fake.received] == [body, body]
