"""Buckets in a real Redis: exactness across proxies, expiry, and outages.

Each test gets its own ``redis-server`` (tests/redis_server.py) and may stop
it halfway to play an outage. Missing redis-server: skipped locally, a
failure when CI is set.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.admission.buckets import Decision, StorageUnavailable
from proxy.admission.buckets_redis import KEY_PREFIX, RedisRateLimiter
from proxy.config import RateLimitSettings, TokenBudget
from tests.conftest import ServeConfig
from tests.faults.process import running_proxy, write_config
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

JSON = {"Content-Type": "application/json"}
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
REPO = Path(__file__).resolve().parents[2]
Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def upstream(aiohttp_server: Any) -> tuple[str, list[int]]:
    count = [0]

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        count[0] += 1
        return web.json_response({"object": "chat.completion", "choices": []})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server: TestServer = await aiohttp_server(app)
    return str(server.make_url("/v1")), count


def config(upstream_url: str, storage: str, **rate: Any) -> dict[str, Any]:
    return {
        "upstreams": {"up": {"url": upstream_url}},
        "routes": [{"model": "m", "upstream": "up"}],
        "rate_limit": {"requests_per_minute": 1, "burst": 3, "storage": storage, **rate},
    }


async def post(client: Client | aiohttp.ClientSession, url: Any = "/v1/chat/completions") -> int:
    async with client.post(url, data=CHAT, headers=JSON) as resp:
        await resp.read()
        return resp.status


async def test_buckets_live_in_redis_with_a_ttl_of_their_time_to_full(
    serve_config: ServeConfig,
    upstream: tuple[str, list[int]],
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
) -> None:
    client = await serve_config(config(upstream[0], redis_server.url))
    assert [await post(client) for _ in range(4)] == [200, 200, 200, 429]
    keys = await redis_client.keys(KEY_PREFIX + "*")
    assert keys == [f"{KEY_PREFIX}ip:127.0.0.1|global".encode()]
    # Three tokens spent at one a minute: full again in three minutes.
    ttl_ms = await redis_client.pttl(keys[0])
    assert 170_000 < ttl_ms <= 180_000
    resp = await client.post("/v1/chat/completions", data=CHAT, headers=JSON)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "60"
    assert resp.headers["x-ratelimit-reset-requests"] == "3m0s"
    assert upstream[1][0] == 3


async def test_idle_buckets_vanish_from_redis(
    serve_config: ServeConfig,
    upstream: tuple[str, list[int]],
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
) -> None:
    # 60000 a minute: a token refills in 1 ms, so the key expires at once.
    client = await serve_config(config(upstream[0], redis_server.url, requests_per_minute=60000))
    assert await post(client) == 200
    async with asyncio.timeout(5):
        while await redis_client.keys(KEY_PREFIX + "*"):
            await asyncio.sleep(0.01)


async def test_a_flushed_script_is_sent_again(
    serve_config: ServeConfig,
    upstream: tuple[str, list[int]],
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
) -> None:
    client = await serve_config(config(upstream[0], redis_server.url))
    assert await post(client) == 200
    await redis_client.script_flush()  # the next EVALSHA answers NOSCRIPT
    assert await post(client) == 200
    assert await post(client) == 200
    assert await post(client) == 429  # the count carried on across the reload


async def burst_of(urls: list[Any], n: int) -> list[int]:
    """``n`` simultaneous requests spread over ``urls``; their statuses."""
    start = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> int:
            await start.wait()
            return await post(session, urls[i % len(urls)])

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.sleep(0)
        start.set()
        return await asyncio.gather(*tasks)


async def test_500_concurrent_requests_against_burst_100_admit_exactly_100(
    serve_config: ServeConfig, upstream: tuple[str, list[int]], redis_server: RedisServer
) -> None:
    client = await serve_config(config(upstream[0], redis_server.url, burst=100))
    statuses = await burst_of([client.make_url("/v1/chat/completions")], 500)
    assert statuses.count(200) == 100
    assert statuses.count(429) == 400
    assert upstream[1][0] == 100


async def test_two_proxies_sharing_redis_admit_one_budget(
    serve_config: ServeConfig, upstream: tuple[str, list[int]], redis_server: RedisServer
) -> None:
    cfg = config(upstream[0], redis_server.url, burst=100)
    one, two = await serve_config(cfg), await serve_config(cfg)
    urls = [one.make_url("/v1/chat/completions"), two.make_url("/v1/chat/completions")]
    statuses = await burst_of(urls, 500)
    # Each proxy got 250 requests: with a budget each they would admit 200.
    assert statuses.count(200) == 100
    assert statuses.count(429) == 400


async def take_token(
    limiter: RedisRateLimiter, key: str, limit: RateLimitSettings, script: str
) -> Decision:
    """One request token from ``key``'s bucket, by the request script
    (``acquire``) or within a token reservation (``reserve``, of no tokens)."""
    if script == "acquire":
        return await limiter.acquire(key, limit)
    budget = TokenBudget(per_minute=1000, per_day=None)
    decision, *_ = await limiter.reserve(key, limit, budget, 0)
    assert decision is not None
    return decision


@pytest.mark.parametrize("script", ["acquire", "reserve"])
async def test_state_left_by_an_earlier_config_is_cut_to_the_new_limit(
    redis_server: RedisServer, redis_client: aioredis.Redis, script: str
) -> None:
    old_limit = RateLimitSettings(requests_per_minute=1, burst=20)
    new_limit = RateLimitSettings(requests_per_minute=6000, burst=100)  # 10 ms a token
    key = KEY_PREFIX + "ip:192.0.2.1|global"
    before = RedisRateLimiter(redis_server.url)  # a proxy under the old config
    try:
        for _ in range(20):
            assert (await take_token(before, "ip:192.0.2.1|global", old_limit, script)).allowed
    finally:
        await before.close()
    assert 1_190_000 < await redis_client.pttl(key) <= 1_200_000  # owes 20 minutes
    after = RedisRateLimiter(redis_server.url)  # one started with the new config
    try:
        first = await take_token(after, "ip:192.0.2.1|global", new_limit, script)
        assert not first.allowed
        # One token of the new limit, not 1,199 s; the bucket is full again in 1 s.
        assert (first.retry_after, first.reset_after) == (0.01, 1.0)
        assert await redis_client.pttl(key) <= 1000  # the cut was written back
        await asyncio.sleep(first.retry_after + 0.005)  # the wait the 429 names
        assert (await take_token(after, "ip:192.0.2.1|global", new_limit, script)).allowed
    finally:
        await after.close()


async def test_two_proxy_processes_sharing_redis_admit_one_budget(
    upstream: tuple[str, list[int]], redis_server: RedisServer, tmp_path: Path
) -> None:
    cfg = config(upstream[0], redis_server.url, burst=100)
    cfg["log"] = {"access": False}
    async with (
        running_proxy(write_config(tmp_path / "a.yaml", cfg)) as a,
        running_proxy(write_config(tmp_path / "b.yaml", cfg)) as b,
    ):
        urls = [f"{proxy.url}/v1/chat/completions" for proxy in (a, b)]
        statuses = await burst_of(urls, 500)
    assert statuses.count(200) == 100
    assert statuses.count(429) == 400
    assert upstream[1][0] == 100


# ---------------------------------------------------------------------------
# Outages


async def test_fail_open_keeps_serving_warns_once_and_recovers(
    serve_config: ServeConfig,
    upstream: tuple[str, list[int]],
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="oaimux.ratelimit")
    client = await serve_config(config(upstream[0], redis_server.url, burst=2))
    assert [await post(client) for _ in range(3)] == [200, 200, 429]
    redis_server.stop()
    # Redis is gone: requests pass (fail open), the limit cannot be enforced.
    assert [await post(client) for _ in range(20)] == [200] * 20
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # one warning, not one per request
    assert "failing open" in warnings[0]
    redis_server.start()  # same port, empty (no persistence)
    # Limiting resumes once the cooldown has passed: the fresh bucket allows
    # two, then refuses.
    statuses: list[int] = []
    async with asyncio.timeout(10):
        while 429 not in statuses:
            statuses.append(await post(client))
            await asyncio.sleep(0.05)
    assert any("rate-limit storage: recovered after" in r.getMessage() for r in caplog.records)


async def test_fail_closed_answers_503(
    serve_config: ServeConfig, upstream: tuple[str, list[int]], redis_server: RedisServer
) -> None:
    client = await serve_config(config(upstream[0], redis_server.url, on_storage_error="closed"))
    assert await post(client) == 200
    redis_server.stop()
    for _ in range(3):
        resp = await client.post("/v1/chat/completions", data=CHAT, headers=JSON)
        assert resp.status == 503
        assert resp.headers["x-oaimux-error"] == "rate_limiter_unavailable"
        body = await resp.json()
        assert body["error"]["code"] == "rate_limiter_unavailable"
        assert body["error"]["type"] == "api_error"
        assert set(body["error"]) == {"message", "type", "param", "code"}
    assert upstream[1][0] == 1
    assert (await client.get("/healthz")).status == 200


@pytest.fixture
async def silent_server() -> AsyncIterator[str]:
    """A TCP server that accepts connections and never answers: a hung Redis."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"redis://127.0.0.1:{port}/0"
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_a_hung_redis_does_not_stall_requests(
    serve_config: ServeConfig, upstream: tuple[str, list[int]], silent_server: str
) -> None:
    client = await serve_config(config(upstream[0], silent_server))
    # Without socket timeouts this would wait forever; the bound here is
    # generous, the limiter gives up after 0.25 s.
    async with asyncio.timeout(5):
        statuses = await asyncio.gather(*(post(client) for _ in range(20)))
    assert statuses == [200] * 20


async def test_the_limiter_reports_an_unreachable_redis() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"redis://:hunter2secret@127.0.0.1:{s.getsockname()[1]}/0"
    limiter = RedisRateLimiter(url)
    try:
        with pytest.raises(StorageUnavailable) as info:
            await limiter.acquire("k", RateLimitSettings(60, 1))
        assert "hunter2secret" not in str(info.value)
        # Within the cooldown it answers at once, without trying, and with the
        # same reason: one outage is one state for the log.
        with pytest.raises(StorageUnavailable) as again:
            await limiter.acquire("k", RateLimitSettings(60, 1))
        assert str(again.value) == str(info.value)
    finally:
        await limiter.close()
