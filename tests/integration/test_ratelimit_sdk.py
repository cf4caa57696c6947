"""The official ``openai`` SDK against the proxy's rate limit, over a real port.

The SDK maps a 429 to ``RateLimitError`` and, with retries on, waits as long
as ``retry-after-ms`` (else ``Retry-After``) says before trying again. The
sync client runs in a worker thread so the proxy keeps serving in this loop.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.config import parse_settings
from proxy.server.app import create_app, server_options

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def upstream(aiohttp_server: Any) -> tuple[str, list[str]]:
    seen: list[str] = []

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body["model"])
        return web.json_response(
            {
                "id": "chatcmpl-sdk",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "stop",
                    }
                ],
            },
            headers={"x-ratelimit-remaining-requests": "4999"},
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server: TestServer = await aiohttp_server(app)
    return str(server.make_url("/v1")), seen


async def serve(aiohttp_client: Any, upstream_url: str, rpm: float, burst: int) -> str:
    settings = parse_settings(
        {
            "upstreams": {"up": {"url": upstream_url}},
            "routes": [{"model": "gpt-4o-mini", "upstream": "up"}],
            "rate_limit": {"requests_per_minute": rpm, "burst": burst},
        },
        environ={},
    )
    client: TestClient[web.Request, web.Application] = await aiohttp_client(
        create_app(settings), server_kwargs=server_options()
    )
    return str(client.make_url("/v1"))


async def test_without_retries_the_sdk_raises_rate_limit_error(
    aiohttp_client: Any, upstream: tuple[str, list[str]]
) -> None:
    base_url = await serve(aiohttp_client, upstream[0], rpm=1, burst=1)
    sdk = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    try:
        first = await asyncio.to_thread(
            sdk.chat.completions.with_raw_response.create, model="gpt-4o-mini", messages=MESSAGES
        )
        # A success keeps the upstream's own rate-limit header.
        assert first.headers["x-ratelimit-remaining-requests"] == "4999"
        with pytest.raises(openai.RateLimitError) as info:
            await asyncio.to_thread(
                sdk.chat.completions.create, model="gpt-4o-mini", messages=MESSAGES
            )
    finally:
        sdk.close()
    err = info.value
    assert err.status_code == 429
    assert err.code == "rate_limit_exceeded"
    assert err.type == "requests"
    assert "try again in 60s" in err.message
    assert err.response.headers["retry-after"] == "60"
    assert err.response.headers["x-ratelimit-limit-requests"] == "1"
    assert upstream[1] == ["gpt-4o-mini"]


async def test_with_retries_the_sdk_waits_as_told_and_succeeds(
    aiohttp_client: Any, upstream: tuple[str, list[str]]
) -> None:
    # One token a second, burst 1: the second call is refused with
    # retry-after-ms ~1000. The SDK's own backoff for a first retry is at most
    # 0.5 s, so a wait of 0.9 s or more shows it followed our header.
    base_url = await serve(aiohttp_client, upstream[0], rpm=60, burst=1)
    sdk = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=3)
    try:
        await asyncio.to_thread(sdk.chat.completions.create, model="gpt-4o-mini", messages=MESSAGES)
        started = time.monotonic()
        done = await asyncio.to_thread(
            sdk.chat.completions.create, model="gpt-4o-mini", messages=MESSAGES
        )
        waited = time.monotonic() - started
    finally:
        sdk.close()
    assert done.choices[0].message.content == "ok"
    assert waited >= 0.9
    assert upstream[1] == ["gpt-4o-mini", "gpt-4o-mini"]
