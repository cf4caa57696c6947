"""Responses and audio-capable chat pass byte for byte (README, "Endpoints").

Real-shaped bodies both ways; the bytes the client gets are hashed against
the bytes the fake upstream sent, and the bytes the upstream got against the
bytes the client sent.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.config import parse_settings
from proxy.server.app import create_app, server_options
from tests.fakes.openai_like import OpenAILike, audio_blob


@pytest.fixture
def upstream() -> OpenAILike:
    return OpenAILike(name="openai", audio_bytes=4 * 1024 * 1024 + 5)


@pytest.fixture
async def proxy(
    aiohttp_client: Any, aiohttp_server: Any, upstream: OpenAILike
) -> TestClient[Any, Any]:
    server: TestServer = await aiohttp_server(upstream.app())
    cfg = {
        "upstreams": {
            "openai": {
                "url": str(server.make_url("/v1")),
                "headers": {"set": {"Authorization": "Bearer sk-upstream"}},
            }
        },
        "routes": [
            {"model": "gpt-4o", "upstream": "openai"},
            {"model": "gpt-4o-audio-preview", "upstream": "openai"},
            {"model": "o3-mini", "upstream": "openai"},
        ],
    }
    app = create_app(parse_settings(cfg, environ={}))
    client: TestClient[web.Request, web.Application] = await aiohttp_client(
        app, server_kwargs=server_options()
    )
    return client


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


RESPONSES_REQUEST = json.dumps(
    {
        "model": "gpt-4o",
        "instructions": "You are a coding assistant that talks like a pirate.",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Are semicolons optional in JavaScript?"}
                ],
            }
        ],
        "tools": [{"type": "web_search_preview"}],
        "reasoning": None,
        "metadata": {"ticket": "ü-42"},
        "store": False,
    },
    ensure_ascii=False,
    indent=2,
).encode()


async def test_responses_json_passes_byte_for_byte(
    proxy: TestClient[Any, Any], upstream: OpenAILike
) -> None:
    resp = await proxy.post(
        "/v1/responses", data=RESPONSES_REQUEST, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 200
    body = await resp.read()
    assert sha(body) == sha(upstream.sent["/v1/responses"])
    assert upstream.last.body_sha256 == sha(RESPONSES_REQUEST)
    assert json.loads(body)["object"] == "response"
    assert resp.headers["x-request-id"].startswith("req_openai_")


async def test_responses_stream_with_named_events_passes_byte_for_byte(
    proxy: TestClient[Any, Any], upstream: OpenAILike
) -> None:
    request = json.loads(RESPONSES_REQUEST)
    request["stream"] = True
    raw = json.dumps(request).encode()
    resp = await proxy.post("/v1/responses", data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    chunks = []
    async for chunk in resp.content.iter_any():
        chunks.append(chunk)
    body = b"".join(chunks)
    assert sha(body) == sha(upstream.sent["/v1/responses"])
    events = [line[7:] for line in body.decode().splitlines() if line.startswith("event: ")]
    assert events[0] == "response.created" and events[-1] == "response.completed"
    assert events.count("response.output_text.delta") == 3
    assert upstream.last.body_sha256 == sha(raw)


async def test_audio_chat_with_megabytes_of_base64_passes_byte_for_byte(
    proxy: TestClient[Any, Any], upstream: OpenAILike
) -> None:
    """Input audio of ~5 MB base64 in the request, ~5.6 MB base64 WAV in the reply."""
    wav = b"RIFF" + audio_blob(3_750_000)
    request = json.dumps(
        {
            "model": "gpt-4o-audio-preview",
            "modalities": ["text", "audio"],
            "audio": {"voice": "alloy", "format": "wav"},
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in this recording?"},
                        {
                            "type": "input_audio",
                            "input_audio": {
                                "data": base64.b64encode(wav).decode(),
                                "format": "wav",
                            },
                        },
                    ],
                }
            ],
        }
    ).encode()
    assert len(request) > 5_000_000
    resp = await proxy.post(
        "/v1/chat/completions",
        data=io.BytesIO(request),
        headers={"Content-Type": "application/json"},
    )
    assert resp.status == 200
    body = await resp.read()
    assert len(body) > 5_500_000
    assert sha(body) == sha(upstream.sent["/v1/chat/completions"])
    assert upstream.last.body_sha256 == sha(request)
    audio = json.loads(body)["choices"][0]["message"]["audio"]
    assert base64.b64decode(audio["data"]) == audio_blob(upstream.audio_bytes)
