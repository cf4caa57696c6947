"""A client that hangs up once it has a stream's terminal event got the whole
answer: logged ``complete``, and the upstream's response is still closed.

The upstream here writes a stream's events (one write each, in the wire format
of each API) and then keeps the response open until the client leaves, as a
slow network or an upstream that sends its last bytes late does; the client
(aiohttp's) reads until it has the event it waits for, then closes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import MakeProxy
from tests.fakes.access_lines import LogLines, capture_logs, parse_text_line
from tests.fakes.recorded import hold_until_client_leaves


def _data(doc: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def _named(name: str, doc: dict[str, Any], crlf: bool = False) -> bytes:
    text = f"event: {name}\ndata: {json.dumps(doc)}\n\n"
    return (text.replace("\n", "\r\n") if crlf else text).encode()


CHUNK = _data({"object": "chat.completion.chunk", "choices": [{"delta": {"content": "hi"}}]})
DONE = b"data: [DONE]\n\n"
DELTA = {"type": "response.output_text.delta", "delta": "hi"}
COMPLETED = {"type": "response.completed", "response": {"id": "resp_1", "status": "completed"}}
# The key order of a server that writes "type" last (pydantic models of openai's types).
COMPLETED_TYPE_LAST = {
    "response": {"id": "resp_1", "status": "completed"},
    "type": "response.completed",
}
MESSAGE_DELTA = {"type": "message_delta", "usage": {"output_tokens": 3}}
MESSAGE_STOP = {"type": "message_stop"}

# (the events written, in order; the bytes the client waits for before it hangs up)
FINISHED = {
    "chat [DONE]": ([CHUNK, CHUNK, DONE], DONE),
    "responses completed": (
        [_named("response.output_text.delta", DELTA), _named("response.completed", COMPLETED)],
        b'"response.completed", "response"',
    ),
    "responses completed, CRLF": (
        [_named("response.output_text.delta", DELTA), _named("response.completed", COMPLETED, crlf=True)],
        b"completed\"}}\r\n\r\n",
    ),
    "responses completed, data only, type last": (
        [_data(DELTA), _data(COMPLETED_TYPE_LAST)],
        b'"type": "response.completed"}',
    ),
    "anthropic message_stop": (
        [_named("message_delta", MESSAGE_DELTA), _named("message_stop", MESSAGE_STOP)],
        b'{"type": "message_stop"}',
    ),
    "the whole stream in one chunk": ([CHUNK + DONE], DONE),
}  # fmt: skip
UNFINISHED = {
    "chat, no [DONE]": ([CHUNK, CHUNK], CHUNK + CHUNK),
    "responses, a delta last": (
        [_named("response.created", {"type": "response.created"}), _named("response.output_text.delta", DELTA)],
        b'"delta": "hi"}',
    ),
    "anthropic, message_delta last": ([_named("message_delta", MESSAGE_DELTA)], b'"output_tokens": 3'),
    "the terminal event not whole": ([CHUNK, b"data: [DONE]\n"], b"[DONE]\n"),
    "[DONE] inside a JSON string": ([_data({"choices": [{"delta": {"content": "data: [DONE]"}}]})], b"[DONE]"),
}  # fmt: skip


@dataclass
class HeldStream:
    """An upstream that writes ``events`` as SSE, then holds the response open."""

    events: list[bytes] = field(default_factory=list)
    left: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/{path:.*}", self.stream)
        return app

    async def stream(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in self.events:
            await resp.write(event)
        await hold_until_client_leaves(self.left)
        return resp


@pytest.fixture
def logs() -> Iterator[LogLines]:
    with capture_logs() as lines:
        yield lines


@pytest.fixture
def held() -> HeldStream:
    return HeldStream()


@pytest.fixture
async def held_url(aiohttp_server: Any, held: HeldStream) -> str:
    server: TestServer = await aiohttp_server(held.app())
    return str(server.make_url("/v1"))


async def _hang_up_after(
    make_proxy: MakeProxy, held: HeldStream, held_url: str, logs: LogLines, awaited: bytes
) -> dict[str, Any]:
    """Stream through the proxy, hang up once ``awaited`` is in; the access line."""
    config = {
        "upstreams": {"held": {"url": held_url}},
        "routes": [{"model": "m", "upstream": "held"}],
    }
    client = await make_proxy(config)
    resp = await client.post("/v1/responses", json={"model": "m", "stream": True})
    assert resp.status == 200
    received = b""
    async with asyncio.timeout(10):
        while awaited not in received:
            chunk = await resp.content.readany()
            assert chunk, received
            received += chunk
    resp.close()
    async with asyncio.timeout(10):
        await held.left.wait()  # the upstream's response was closed
    (line,) = await logs.wait_for(1)
    fields = parse_text_line(line)
    assert fields["status"] == "200" and int(fields["bytes_out"]) == len(received)
    return fields


@pytest.mark.parametrize("case", FINISHED)
async def test_a_client_leaving_after_the_terminal_event_is_complete(
    make_proxy: MakeProxy, held: HeldStream, held_url: str, logs: LogLines, case: str
) -> None:
    held.events, awaited = FINISHED[case]
    fields = await _hang_up_after(make_proxy, held, held_url, logs, awaited)
    assert fields["outcome"] == "complete"


@pytest.mark.parametrize("case", UNFINISHED)
async def test_a_client_leaving_before_the_terminal_event_is_client_gone(
    make_proxy: MakeProxy, held: HeldStream, held_url: str, logs: LogLines, case: str
) -> None:
    held.events, awaited = UNFINISHED[case]
    fields = await _hang_up_after(make_proxy, held, held_url, logs, awaited)
    assert fields["outcome"] == "client_gone"


# A terminal event of 30 KB (OpenAI's response.completed carries the whole
# response) written in three parts, each sent only once the client has the one
# before: the proxy reads and relays it as three chunks, more than the last two
# it keeps. Small terminal events in three writes as the control.
BIG = {"type": "response.completed", "response": {"id": "r", "output": [{"text": "x" * 30000}]}}
BIG_EVENT = _named("response.completed", BIG)
BIG_DELTA = _named("response.output_text.delta", {**BIG, "type": "response.output_text.delta"})
CREATED = _named("response.created", {"type": "response.created"})


def _thirds(event: bytes) -> list[bytes]:
    return [event[:10000], event[10000:20000], event[20000:]]


PACED = {
    "responses completed of 30 KB in three writes": ([CREATED, *_thirds(BIG_EVENT)], "complete"),
    "a delta of 30 KB in three writes": ([CREATED, *_thirds(BIG_DELTA)], "client_gone"),
    "anthropic message_stop in three writes": (
        [_named("message_delta", MESSAGE_DELTA), b"event: message_stop\n", b"data: ", b'{"type": "message_stop"}\n\n'],
        "complete",
    ),
    "chat [DONE] in three writes": ([CHUNK, b"data: ", b"[DONE]", b"\n\n"], "complete"),
}  # fmt: skip


@dataclass
class PacedStream:
    """An upstream that writes each of ``pieces`` once the client has the one
    before (one read each at the proxy), then holds the response open."""

    pieces: list[bytes] = field(default_factory=list)
    received: asyncio.Queue[None] = field(default_factory=asyncio.Queue)
    left: asyncio.Event = field(default_factory=asyncio.Event)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in self.pieces:
            await resp.write(piece)
            async with asyncio.timeout(10):
                await self.received.get()
        await hold_until_client_leaves(self.left)
        return resp


@pytest.mark.parametrize("case", PACED)
async def test_a_terminal_event_over_more_than_two_chunks(
    make_proxy: MakeProxy, aiohttp_server: Any, logs: LogLines, case: str
) -> None:
    pieces, outcome = PACED[case]
    paced = PacedStream(pieces)
    app = web.Application()
    app.router.add_post("/v1/{path:.*}", paced.stream)
    server: TestServer = await aiohttp_server(app)
    config = {
        "upstreams": {"paced": {"url": str(server.make_url("/v1"))}},
        "routes": [{"model": "m", "upstream": "paced"}],
    }
    client = await make_proxy(config)
    resp = await client.post("/v1/responses", json={"model": "m", "stream": True})
    received, wanted = b"", b""
    async with asyncio.timeout(10):
        for piece in pieces:
            wanted += piece
            while len(received) < len(wanted):
                chunk = await resp.content.readany()
                assert chunk, received
                received += chunk
            paced.received.put_nowait(None)
    assert received == wanted
    resp.close()
    async with asyncio.timeout(10):
        await paced.left.wait()
    (line,) = await logs.wait_for(1)
    assert parse_text_line(line)["outcome"] == outcome
