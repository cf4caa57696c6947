"""An open event stream keeps its first event only where the usage reader needs
it: on Anthropic's paths, whose ``message_start`` carries the input tokens
(observe/usage.py). An OpenAI stream keeps none of it for its life.

The pipe of a stream held open is found among the live objects while the
client still reads it.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.outbound.pipe import BodyPipe
from tests.conftest import MakeProxy
from tests.fakes.recorded import hold_until_client_leaves

MESSAGE_START = (
    b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
    b'{"input_tokens":25,"output_tokens":1}}}\n\n'
)
CHAT_CHUNK = b'data: {"object":"chat.completion.chunk","choices":[{"delta":{"content":"hi"}}]}\n\n'


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
    left = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(event)
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
        while received != event:
            chunk = await resp.content.readany()
            assert chunk, received
            received += chunk
    gc.collect()  # pipes of earlier tests left in cycles
    (pipe,) = [o for o in gc.get_objects() if isinstance(o, BodyPipe)]
    assert pipe.first == kept
    resp.close()
    async with asyncio.timeout(10):
        await left.wait()
