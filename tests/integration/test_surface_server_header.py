"""Every response carries ``Server: oaimux``, with no version, once.

aiohttp's default (``Python/3.11 aiohttp/3.14.5``) is a version disclosure
scanners flag, and a relayed upstream's own ``Server`` (here an aiohttp one,
versions and all) says what runs behind the proxy. Each kind of response is
made for real against the proxy as ``oaimux serve`` serves it: relayed answers
(whole, streamed, an upstream error), the proxy's own endpoints, its errors
(raised in views, before the body, by the HTTP parser, by the head deadline),
CORS preflights, the realtime handshake's 101 and the separate metrics
listener.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.config import parse_settings
from proxy.observe.metrics import Metrics, serve_metrics
from tests.fakes.openai_like import OpenAILike
from tests.fakes.security import running_proxy, split_response

KEY = "pk-server-header-0001"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "https://app.example"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def assert_named(where: str, headers: Any) -> None:
    assert headers.getall("Server", []) == ["oaimux"], (where, headers.getall("Server", []))


@pytest.fixture
async def upstream_url(aiohttp_server: Any) -> str:
    server: TestServer = await aiohttp_server(OpenAILike(name="openai").app())
    return str(server.make_url("/v1"))


def config(upstream_url: str) -> dict[str, Any]:
    return {
        "server": {
            "max_body_bytes": 4096,
            "header_timeout": 0.5,
            "cors": {"allow_origins": [ORIGIN]},
        },
        "upstreams": {"openai": {"url": upstream_url}},
        "routes": [{"model": "*", "upstream": "openai"}, {"path": "files*", "upstream": "openai"}],
        "auth": {"keys": [{"name": "k", "key": KEY}]},
    }


Call = Callable[[aiohttp.ClientSession, str], Awaitable[aiohttp.ClientResponse]]


def request(method: str, path: str, **kwargs: Any) -> Call:
    async def call(session: aiohttp.ClientSession, base: str) -> aiohttp.ClientResponse:
        async with session.request(method, base + path, **kwargs) as resp:
            await resp.read()
            return resp

    return call


CALLS: dict[str, tuple[Call, int]] = {
    "relayed answer": (request("POST", "/v1/chat/completions", json=CHAT, headers=AUTH), 200),
    "relayed stream": (
        request("POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH),
        200,
    ),
    "relayed path route": (request("GET", "/v1/files", headers=AUTH), 200),
    "relayed upstream error": (request("GET", "/v1/files/file-none", headers=AUTH), 404),
    "healthz": (request("GET", "/healthz"), 200),
    "models": (request("GET", "/v1/models", headers=AUTH), 200),
    "model": (request("GET", "/v1/models/gpt-4o-mini", headers=AUTH), 200),
    "about": (request("GET", "/about", headers=AUTH), 200),
    "metrics": (request("GET", "/metrics"), 200),
    "no key": (request("POST", "/v1/chat/completions", json=CHAT), 401),
    "wrong method": (request("GET", "/v1/chat/completions", headers=AUTH), 405),
    "unknown path": (request("GET", "/v1/nothing-here", headers=AUTH), 404),
    "bad json": (request("POST", "/v1/chat/completions", data=b"{", headers=AUTH), 400),
    "too large": (
        request("POST", "/v1/chat/completions", data=b"x" * 8192, headers=AUTH),
        413,
    ),
    "preflight": (
        request(
            "OPTIONS",
            "/v1/chat/completions",
            headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
        ),
        204,
    ),
    "preflight refused": (
        request(
            "OPTIONS",
            "/v1/chat/completions",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        ),
        403,
    ),
}

RAW: dict[str, tuple[bytes, int]] = {
    "refused by the parser": (b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n", 400),
    "unknown expectation": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nExpect: nonsense\r\n"
        b"Content-Length: 2\r\n\r\n",
        417,
    ),
    "head deadline": (b"GET /v1/models HTTP/1.1\r\nHost: a\r\n", 408),  # never finished
    "realtime handshake": (
        b"GET /v1/realtime?model=gpt-4o-mini HTTP/1.1\r\nHost: a\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        101,
    ),
}


async def raw_head(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(10):
            return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()


async def test_every_response_is_named_oaimux_without_a_version(upstream_url: str) -> None:
    settings = parse_settings(config(upstream_url), environ={})
    async with running_proxy(settings) as proxy, aiohttp.ClientSession() as session:
        for name, (call, status) in CALLS.items():
            resp = await call(session, proxy.url)
            assert resp.status == status, (name, resp.status)
            assert_named(name, resp.headers)
        for name, (data, status) in RAW.items():
            head = await raw_head(proxy.port, data)
            assert split_response(head)[0] == status, (name, head)
            named = [line for line in head.split(b"\r\n") if line.lower().startswith(b"server:")]
            assert [line.split(b":", 1)[1].strip() for line in named] == [b"oaimux"], (name, head)


async def test_every_answer_is_named_without_cors_too(upstream_url: str) -> None:
    """With ``server.cors`` the app has a middleware; without it none, and each
    view names its own answers (docs/decisions.md, "The error boundary is in the
    views")."""
    plain = config(upstream_url)
    del plain["server"]["cors"]
    settings = parse_settings(plain, environ={})
    async with running_proxy(settings) as proxy, aiohttp.ClientSession() as session:
        for name, (call, status) in CALLS.items():
            if name.startswith("preflight"):
                continue
            resp = await call(session, proxy.url)
            assert resp.status == status, (name, resp.status)
            assert_named(name, resp.headers)


async def test_the_metrics_listener_is_named_oaimux_too() -> None:
    runner = await serve_metrics(Metrics(), "/metrics", "127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with aiohttp.ClientSession() as session:
            for path, status in (("/metrics", 200), ("/elsewhere", 404)):
                async with session.get(base + path) as resp:
                    assert resp.status == status
                    assert_named(path, resp.headers)
    finally:
        await runner.cleanup()
