"""Rate limiting over real sockets: the 429 and its headers, who the client is,
route overrides, what counts, and exactness under 500 concurrent requests.

The upstream is a small in-process OpenAI stand-in that, like OpenAI, sends its
own ``x-ratelimit-*`` headers on every success; distinct client addresses come
from binding the client side to loopback aliases (127.0.0.2, 127.0.0.3: Linux
routes all of 127/8 to ``lo``).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import ServeConfig

JSON = {"Content-Type": "application/json"}
UPSTREAM_LIMIT_HEADERS = {
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-reset-requests": "6ms",
    "x-ratelimit-limit-tokens": "2000000",
}


@dataclass
class Upstream:
    url: str
    completions: int = 0


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Upstream:
    state = Upstream(url="")

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        state.completions += 1
        return web.json_response(
            {
                "id": "chatcmpl-rl",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
            headers=UPSTREAM_LIMIT_HEADERS,
        )

    async def anything(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_route("*", "/{tail:.*}", anything)
    server: TestServer = await aiohttp_server(app)
    state.url = str(server.make_url("/v1"))
    return state


def config(upstream: Upstream, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "upstreams": {"up": {"url": upstream.url}},
        "routes": [
            {"model": "cheap", "upstream": "up"},
            {
                "model": "pricey",
                "upstream": "up",
                "rate_limit": {"requests_per_minute": 1, "burst": 1},
            },
            {"path": "files", "upstream": "up"},
        ],
    }
    cfg.update(extra)
    return cfg


Client = TestClient[web.Request, web.Application]


def chat(model: str = "cheap") -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()


def alias_available(addr: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((addr, 0))
        return True
    except OSError:
        return False


@pytest.fixture
async def from_addr() -> AsyncIterator[Any]:
    """``session(addr)``: a client session whose connections come from ``addr``."""
    sessions: list[aiohttp.ClientSession] = []

    def session(addr: str) -> aiohttp.ClientSession:
        if not alias_available(addr):
            pytest.skip(f"cannot bind {addr}: loopback aliases need Linux")
        s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(addr, 0)))
        sessions.append(s)
        return s

    yield session
    for s in sessions:
        await s.close()


async def post(
    session: aiohttp.ClientSession | Client,
    url: Any,
    model: str = "cheap",
    headers: dict[str, str] | None = None,
) -> int:
    async with session.post(url, data=chat(model), headers={**JSON, **(headers or {})}) as r:
        await r.read()
        return r.status


# ---------------------------------------------------------------------------
# The 429


async def test_the_429_has_openais_shape_and_headers(
    serve_config: ServeConfig, upstream: Upstream
) -> None:
    client = await serve_config(config(upstream, rate_limit={"requests_per_minute": 1, "burst": 2}))
    for _ in range(2):
        assert await post(client, "/v1/chat/completions") == 200
    resp = await client.post("/v1/chat/completions", data=chat(), headers=JSON)
    assert resp.status == 429
    body = await resp.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "requests"
    assert error["code"] == "rate_limit_exceeded"
    assert error["param"] is None
    # One token a minute, both spent just now: the next one is ~60 s away.
    assert re.fullmatch(r"Rate limit reached for requests.* try again in 60s\.", error["message"])
    h = resp.headers
    assert h["x-oaimux-error"] == "rate_limit_exceeded"
    assert h["Retry-After"] == "60"
    assert 59_000 < int(h["retry-after-ms"]) <= 60_000
    assert h["x-ratelimit-limit-requests"] == "2"
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert h["x-ratelimit-reset-requests"] == "2m0s"  # two tokens to refill
    assert upstream.completions == 2  # the refused request never left


async def test_successes_keep_the_upstreams_own_ratelimit_headers(
    serve_config: ServeConfig, upstream: Upstream
) -> None:
    client = await serve_config(config(upstream, rate_limit={"requests_per_minute": 1, "burst": 5}))
    resp = await client.post("/v1/chat/completions", data=chat(), headers=JSON)
    assert resp.status == 200
    for name, value in UPSTREAM_LIMIT_HEADERS.items():
        assert resp.headers.getall(name) == [value]  # untouched, not doubled
    assert "Retry-After" not in resp.headers


async def test_every_request_counts_but_healthz_and_metrics(
    serve_config: ServeConfig, upstream: Upstream
) -> None:
    client = await serve_config(config(upstream, rate_limit={"requests_per_minute": 1, "burst": 4}))
    for _ in range(20):
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/metrics")).status == 200
    # Each of these takes a token, whatever its answer.
    assert (await client.get("/v1/models")).status == 200
    assert (await client.post("/v1/chat/completions", data=b"{oops", headers=JSON)).status == 400
    assert (await client.get("/v1/no/such/thing")).status == 404
    assert (await client.get("/v1/files")).status == 200  # a path route
    for path in ("/v1/models", "/v1/files", "/about", "/v1/no/such/thing"):
        resp = await client.get(path)
        assert resp.status == 429, path
        assert resp.headers["x-oaimux-error"] == "rate_limit_exceeded"
    resp = await client.post("/v1/chat/completions", data=chat(), headers=JSON)
    assert resp.status == 429
    assert (await client.get("/healthz")).status == 200


# ---------------------------------------------------------------------------
# Who the client is


async def test_each_peer_address_has_its_own_bucket(
    serve_config: ServeConfig, upstream: Upstream, from_addr: Any
) -> None:
    client = await serve_config(config(upstream, rate_limit={"requests_per_minute": 1, "burst": 1}))
    url = client.make_url("/v1/chat/completions")
    a, b = from_addr("127.0.0.2"), from_addr("127.0.0.3")
    assert await post(a, url) == 200
    assert await post(a, url) == 429
    # A forged X-Forwarded-For from an untrusted peer changes nothing.
    assert await post(a, url, headers={"X-Forwarded-For": "198.51.100.77"}) == 429
    assert await post(b, url) == 200
    assert await post(b, url) == 429


async def test_forwarded_for_is_believed_only_from_trusted_proxies(
    serve_config: ServeConfig, upstream: Upstream, from_addr: Any
) -> None:
    client = await serve_config(
        config(
            upstream,
            rate_limit={"requests_per_minute": 1, "burst": 1},
            server={"trusted_proxies": ["127.0.0.1/32"]},
        )
    )
    url = client.make_url("/v1/chat/completions")
    nginx = from_addr("127.0.0.1")  # the trusted proxy
    stranger = from_addr("127.0.0.2")

    def xff(value: str) -> dict[str, str]:
        return {"X-Forwarded-For": value}

    # The right-most untrusted address is the client; the left-most is the
    # client's own writing and cannot buy a new bucket.
    assert await post(nginx, url, headers=xff("6.6.6.6, 198.51.100.1")) == 200
    assert await post(nginx, url, headers=xff("7.7.7.7, 198.51.100.1")) == 429
    assert await post(nginx, url, headers=xff("198.51.100.1")) == 429
    assert await post(nginx, url, headers=xff("198.51.100.2")) == 200
    # IPv6 clients are limited per /64.
    assert await post(nginx, url, headers=xff("2001:db8:0:1::1")) == 200
    assert await post(nginx, url, headers=xff("2001:db8:0:1:ffff::2")) == 429
    assert await post(nginx, url, headers=xff("2001:db8:0:2::1")) == 200
    # An untrusted peer's header is ignored: its own address is the client.
    assert await post(stranger, url, headers=xff("198.51.100.3")) == 200
    assert await post(stranger, url, headers=xff("198.51.100.4")) == 429


async def test_with_proxy_keys_the_key_is_the_client(
    serve_config: ServeConfig, upstream: Upstream, from_addr: Any
) -> None:
    client = await serve_config(
        config(
            upstream,
            rate_limit={"requests_per_minute": 1, "burst": 3},
            auth={
                "keys": [
                    {
                        "name": "alice",
                        "key": "sk-alice-0001",
                        "rate_limit": {"requests_per_minute": 1, "burst": 2},
                    },
                    {"name": "bob", "key": "sk-bob-000001"},
                    {"name": "carol", "key": "sk-carol-0001"},
                ]
            },
        )
    )
    url = client.make_url("/v1/chat/completions")
    a, b = from_addr("127.0.0.2"), from_addr("127.0.0.3")

    def key(k: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {k}"}

    # alice's own limit (burst 2), one bucket whichever address she comes from.
    assert await post(a, url, headers=key("sk-alice-0001")) == 200
    assert await post(b, url, headers=key("sk-alice-0001")) == 200
    async with b.post(url, data=chat(), headers={**JSON, **key("sk-alice-0001")}) as r:
        assert r.status == 429
        assert r.headers["x-ratelimit-limit-requests"] == "2"
    # bob has no limit of his own: the global one, for bob alone.
    for _ in range(3):
        assert await post(a, url, headers=key("sk-bob-000001")) == 200
    assert await post(a, url, headers=key("sk-bob-000001")) == 429
    # Wrong keys are charged to the caller's address (global burst 3) ...
    for _ in range(3):
        assert await post(a, url, headers=key("sk-guess-0000")) == 401
    assert await post(a, url, headers=key("sk-guess-0001")) == 429
    assert await post(a, url) == 429  # no key at all: the same address bucket
    assert await post(b, url, headers=key("sk-guess-0002")) == 401  # another address
    # ... and do not touch the buckets of valid keys used from that address.
    assert await post(a, url, headers=key("sk-carol-0001")) == 200


# ---------------------------------------------------------------------------
# Route overrides


async def test_a_route_limit_is_its_own_bucket(
    serve_config: ServeConfig, upstream: Upstream
) -> None:
    client = await serve_config(config(upstream, rate_limit={"requests_per_minute": 1, "burst": 2}))
    assert await post(client, "/v1/chat/completions", "pricey") == 200
    resp = await client.post("/v1/chat/completions", data=chat("pricey"), headers=JSON)
    assert resp.status == 429
    assert resp.headers["x-ratelimit-limit-requests"] == "1"  # the route's burst
    assert "to this model" in (await resp.json())["error"]["message"]
    # The global budget is untouched by the pricey route, and vice versa.
    assert await post(client, "/v1/chat/completions", "cheap") == 200
    assert await post(client, "/v1/chat/completions", "cheap") == 200
    resp = await client.post("/v1/chat/completions", data=chat("cheap"), headers=JSON)
    assert resp.status == 429
    assert resp.headers["x-ratelimit-limit-requests"] == "2"
    assert upstream.completions == 3


async def test_a_route_limit_applies_without_a_global_one(
    serve_config: ServeConfig, upstream: Upstream
) -> None:
    client = await serve_config(config(upstream))
    assert await post(client, "/v1/chat/completions", "pricey") == 200
    assert await post(client, "/v1/chat/completions", "pricey") == 429
    for _ in range(10):
        assert await post(client, "/v1/chat/completions", "cheap") == 200


# ---------------------------------------------------------------------------
# Accuracy


async def burst_of(url: Any, n: int) -> list[int]:
    """``n`` requests at once, each on its own connection; their statuses."""
    start = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            await start.wait()
            return await post(session, url)

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        await asyncio.sleep(0)  # every task is parked on the event
        start.set()
        return await asyncio.gather(*tasks)


async def test_500_concurrent_requests_against_burst_100_admit_exactly_100(
    serve_config: ServeConfig, upstream: Upstream
) -> None:
    # One token a minute: refill during the test is far below one token.
    client = await serve_config(
        config(upstream, rate_limit={"requests_per_minute": 1, "burst": 100})
    )
    statuses = await burst_of(client.make_url("/v1/chat/completions"), 500)
    assert statuses.count(200) == 100
    assert statuses.count(429) == 400
    assert upstream.completions == 100
