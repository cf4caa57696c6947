"""An open event stream keeps its first event only where the usage reader needs
it: on Anthropic's paths, whose ``message_start`` carries the input tokens
(observe/usage.py). An OpenAI stream keeps none of it for its life, and a
body that is no event stream notes no event start either.

The pipe of a stream held open is found among the live objects while the
client still reads it.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestServer

from proxy.outbound.pipe import BodyPipe
from tests.conftest import MakeProxy
from tests.fakes.recorded import hold_until_client_leaves

MESSAGE_START = (
    b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
    b'{"input_tokens":25,"output_tokens":1}}}\n\n'
)
CHAT_CHUNK = b'data: {"object":"chat.completion.chunk","choices":[{"delta":{"content":"hi"}}]}\n\n'


async def open_pipe(
    make_proxy: MakeProxy,
    aiohttp_server: Any,
    path: str,
    content_type: str,
    piece: bytes,
) -> tuple[BodyPipe, ClientResponse, asyncio.Event]:
    """A stream through the proxy whose upstream sends ``piece`` and holds on:
    the proxy's live pipe, the client's response, and the event set once the
    upstream sees the client leave."""
    left = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        await resp.prepare(request)
        await resp.write(piece)
        await hold_until_client_leaves(left)
        return resp

    app = web.Application()
    app.router.add_post("/{path:.*}", stream)
    server: TestServer = await aiohttp_server(app)
    client = await make_proxy(
        {
            "upstreams": {"u": {"url": str(server.make_url("/v1"))}},
            "routes": [{"model": "m", "upstream": "u"}],
        }
    )
    resp = await client.post(path, json={"model": "m", "stream": True, "max_tokens": 5})
    assert resp.status == 200
    received = b""
    async with asyncio.timeout(10):
        while received != piece:
            chunk = await resp.content.readany()
            assert chunk, received
            received += chunk
    gc.collect()  # pipes of earlier tests left in cycles
    (pipe,) = [o for o in gc.get_objects() if isinstance(o, BodyPipe)]
    return pipe, resp, left


async def _close(resp: ClientResponse, left: asyncio.Event) -> None:
    resp.close()
    async with asyncio.timeout(10):
        await left.wait()


@pytest.mark.parametrize(
    ("path", "event", "kept"),
    [
        ("/v1/messages", MESSAGE_START, MESSAGE_START),
        ("/messages", MESSAGE_START, MESSAGE_START),
        ("/v1/chat/completions", CHAT_CHUNK, b""),
        ("/v1/responses", MESSAGE_START, b""),
    ],
)
async def test_only_an_anthropic_stream_keeps_its_first_event(
    make_proxy: MakeProxy, aiohttp_server: Any, path: str, event: bytes, kept: bytes
) -> None:
    pipe, resp, left = await open_pipe(make_proxy, aiohttp_server, path, "text/event-stream", event)
    assert pipe.first == kept
    await _close(resp, left)


@pytest.mark.parametrize(
    ("content_type", "tracked"),
    [("text/event-stream", True), ("audio/mpeg", False), ("application/x-ndjson", False)],
)
async def test_only_an_event_stream_notes_where_its_last_event_began(
    make_proxy: MakeProxy, aiohttp_server: Any, content_type: str, tracked: bool
) -> None:
    """The start of the last event is read only for an event stream's end
    (observe/stream_end.py); any other body keeps no piece for it."""
    pipe, resp, left = await open_pipe(
        make_proxy, aiohttp_server, "/v1/chat/completions", content_type, CHAT_CHUNK
    )
    assert pipe.event_start == (CHAT_CHUNK if tracked else b"")
    await _close(resp, left)
