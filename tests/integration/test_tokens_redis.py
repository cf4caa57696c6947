"""Token budgets in a real Redis: exact across proxies, processes and workers;
reconciled through the same queue; expiring; felt at once after a change.

Each test gets its own ``redis-server`` (tests/redis_server.py). Missing
redis-server: skipped locally, a failure when CI is set.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.admission.buckets import Decision
from proxy.admission.buckets_redis import KEY_PREFIX, RedisRateLimiter
from proxy.admission.token_buckets import TokenDecision, token_decision
from proxy.config.settings import RateLimitSettings, TokenBudget
from tests.conftest import ServeConfig
from tests.fakes.usage_upstream import UsageUpstream, usage
from tests.faults.process import running_proxy, write_config
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

Client = TestClient[web.Request, web.Application]
JSON = {"Content-Type": "application/json"}
REPO = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
RAW = json.dumps({"model": "m", "messages": MESSAGES, "max_tokens": 115}).encode()
COST = math.ceil(len(RAW) / 4) + 115
TOKEN_KEY = KEY_PREFIX + "ip:127.0.0.1|global|tokens"


@pytest.fixture
def upstream() -> UsageUpstream:
    return UsageUpstream(usage=None)  # answers keep their reservations unless a test says


@pytest.fixture
async def upstream_url(aiohttp_server: Any, upstream: UsageUpstream) -> str:
    server: TestServer = await aiohttp_server(upstream.app())
    return str(server.make_url("/v1"))


def config(upstream_url: str, storage: str, **rate: Any) -> dict[str, Any]:
    return {
        "log": {"access": False},
        "upstreams": {"up": {"url": upstream_url}},
        "routes": [{"model": "m", "upstream": "up"}],
        "rate_limit": {"storage": storage, **rate},
    }


async def reserve(
    limiter: RedisRateLimiter,
    key: str,
    limit: RateLimitSettings | None,
    budget: TokenBudget,
    estimate: int,
) -> tuple[Decision | None, TokenDecision]:
    """One reservation, and its figures as a refusal's message would give them."""
    decision, before_m, before_d, after_m, after_d, fits, _ = await limiter.reserve(
        key, limit, budget, estimate
    )
    costs = (min(estimate, budget.cap_minute), min(estimate, budget.cap_day))
    tokens = token_decision(budget, (before_m, before_d), (after_m, after_d), costs, fits)
    return decision, tokens


async def burst_of(urls: list[str], n: int, raw: bytes = RAW) -> list[int]:
    """``n`` simultaneous requests spread over ``urls``, each on a new connection."""
    start = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> int:
            await start.wait()
            async with session.post(urls[i % len(urls)], data=raw, headers=JSON) as resp:
                await resp.read()
                return resp.status

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.sleep(0)
        start.set()
        return await asyncio.gather(*tasks)


async def test_two_proxies_sharing_redis_admit_exactly_the_reservations_that_fit(
    serve_config: ServeConfig, upstream: UsageUpstream, upstream_url: str, redis_server: RedisServer
) -> None:
    cfg = config(upstream_url, redis_server.url, tokens_per_day=100 * COST)
    one, two = await serve_config(cfg), await serve_config(cfg)
    urls = [str(one.make_url(CHAT)), str(two.make_url(CHAT))]
    statuses = await burst_of(urls, 500)
    assert (statuses.count(200), statuses.count(429)) == (100, 400)
    assert upstream.requests == 100


async def test_the_request_bucket_is_charged_in_the_same_step(
    serve_config: ServeConfig, upstream: UsageUpstream, upstream_url: str, redis_server: RedisServer
) -> None:
    # 3 requests a minute and room for 2 reservations: 2 pass; the third is
    # refused by tokens and must not have spent a request token.
    cfg = config(
        upstream_url, redis_server.url, requests_per_minute=1, burst=3, tokens_per_day=2 * COST
    )
    client = await serve_config(cfg)
    statuses = [(await client.post(CHAT, data=RAW, headers=JSON)).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    # The model list takes a request token only: one is left, the refused
    # request took none.
    models = await client.get("/v1/models")
    assert models.status == 200
    assert models.headers["x-oaimux-ratelimit-remaining-requests"] == "0"
    assert (await client.get("/v1/models")).status == 429


async def test_reconciliation_goes_through_redis_down_and_up(
    serve_config: ServeConfig, upstream: UsageUpstream, upstream_url: str, redis_server: RedisServer,
    redis_client: aioredis.Redis,
) -> None:  # fmt: skip
    cfg = config(upstream_url, redis_server.url, tokens_per_minute=10000,
                 max_output_reservation=None)  # fmt: skip
    client = await serve_config(cfg)
    big = json.dumps({"model": "m", "messages": MESSAGES, "max_tokens": 9000}).encode()
    upstream.usage = usage(10, 5)
    for _ in range(3):  # each fits only because the one before was charged 15
        assert (await client.post(CHAT, data=big, headers=JSON)).status == 200
    upstream.usage = usage(14000, 1000)  # owes more than the bucket holds
    assert (await client.post(CHAT, data=RAW, headers=JSON)).status == 200
    resp = await client.post(CHAT, data=RAW, headers=JSON)
    assert resp.status == 429
    wait = float(resp.headers["retry-after-ms"]) / 1000
    assert 30 < wait <= (15000 + 45 + COST - 10000) * 60 / 10000 + 0.01
    # The state: tokens owed per minute, per day (not limited: 0), as of when,
    # under which capacities.
    owed_minute, owed_day, _, cap_minute, cap_day = (await redis_client.get(TOKEN_KEY)).split()
    assert 14990 < float(owed_minute) <= 15000 + 45 and float(owed_day) == 0
    assert (cap_minute, cap_day) == (b"10000", b"0")
    # It expires when the minute bucket has drained: ~1.5 minutes.
    assert 80_000 < await redis_client.pttl(TOKEN_KEY) <= 91_000


async def test_a_raised_token_limit_is_felt_at_once_and_a_debt_is_cut_to_the_ceiling(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    before = RedisRateLimiter(redis_server.url)
    small = TokenBudget(per_minute=1000, per_day=None)
    try:
        _, decision = await reserve(before, "k", None, small, 1000)
        assert decision.allowed
        before.settle("k", small, (99000, 0))  # an answer of 100,000 tokens
        _, refused = await reserve(before, "k", None, small, 10)
    finally:
        await before.close()
    assert not refused.allowed
    # Cut to the ceiling, twice the budget: 2000 owed, so 1010 tokens of waiting.
    assert refused.used == 2000
    assert refused.retry_after == pytest.approx(1010 * 60 / 1000, abs=0.2)
    after = RedisRateLimiter(redis_server.url)  # a proxy started with a raised limit
    raised = TokenBudget(per_minute=100000, per_day=None)
    try:
        _, decision = await reserve(after, "k", None, raised, 5000)
        # The 2000 tokens owed are 2000 of the new budget: room at once.
        assert decision.allowed
        assert 93000 <= decision.remaining <= 93500  # plus a few ms of the new refill
    finally:
        await after.close()


@pytest.mark.parametrize(("billable", "minute"), [(0, 900), (1000, 1900)])
async def test_after_a_reload_adds_a_window_an_earlier_answer_settles_only_what_it_charged(
    redis_server: RedisServer, billable: int, minute: int
) -> None:
    # The first answer was reserved under a budget with no day window, the
    # second under the reloaded one, which has one. The first's refund (its
    # upstream failed) or overrun goes to the minute alone: the day keeps what
    # the second owes it (before, a settle under the first's budget wiped it).
    before = TokenBudget(per_minute=100_000, per_day=None)
    after = TokenBudget(per_minute=100_000, per_day=1000)
    limiter = RedisRateLimiter(redis_server.url)
    started = time.monotonic()
    try:
        assert (await reserve(limiter, "k", None, before, 800))[1].allowed
        assert (await reserve(limiter, "k", None, after, 900))[1].allowed
        limiter.settle("k", before, (billable - 800, 0))  # as Reservation.reconcile sends it
        _, _, _, owed_m, owed_d, _, _ = await limiter.reserve("k", None, after, 0)
    finally:
        await limiter.close()
    elapsed = time.monotonic() - started  # what refilled meanwhile, at most:
    assert minute - elapsed * 100_000 / 60 - 1 <= float(owed_m) <= minute
    assert 900 - elapsed * 1000 / 86_400 - 1 <= float(owed_d) <= 900


async def test_a_state_kept_without_its_capacities_settles_under_the_reservations(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    # A state an earlier version wrote ("<minute> <day> <at>") during a rolling
    # upgrade: a settle reads it under the reservation's budget, as it did then.
    budget = TokenBudget(per_minute=100_000, per_day=None)
    started = time.monotonic()
    seconds, micros = await redis_client.time()
    await redis_client.set(
        KEY_PREFIX + "k|tokens", f"900 0 {seconds * 1_000_000 + micros}", px=60_000
    )
    limiter = RedisRateLimiter(redis_server.url)
    try:
        limiter.settle("k", budget, (-800, 0))
        _, _, _, owed_m, owed_d, _, _ = await limiter.reserve("k", None, budget, 0)
    finally:
        await limiter.close()
    refilled = (time.monotonic() - started) * 100_000 / 60 + 1  # at most, since the set
    assert 100 - refilled <= float(owed_m) <= 100
    assert float(owed_d) == 0


async def test_shadow_mode_charges_without_refusing_in_redis(
    serve_config: ServeConfig, upstream: UsageUpstream, upstream_url: str, redis_server: RedisServer,
    redis_client: aioredis.Redis,
) -> None:  # fmt: skip
    cfg = config(upstream_url, redis_server.url, tokens_per_day=2 * COST, enforce=False)
    client = await serve_config(cfg)
    statuses = [(await client.post(CHAT, data=RAW, headers=JSON)).status for _ in range(5)]
    assert statuses == [200] * 5
    _, owed_day, *_ = (await redis_client.get(TOKEN_KEY)).split()
    assert float(owed_day) == pytest.approx(4 * COST, abs=1)  # cut at twice the budget


async def test_fail_closed_refuses_reservations_while_redis_is_down(
    serve_config: ServeConfig, upstream: UsageUpstream, upstream_url: str, redis_server: RedisServer
) -> None:
    cfg = config(upstream_url, redis_server.url, tokens_per_day=10 * COST,
                 on_storage_error="closed")  # fmt: skip
    client = await serve_config(cfg)
    assert (await client.post(CHAT, data=RAW, headers=JSON)).status == 200
    redis_server.stop()
    resp = await client.post(CHAT, data=RAW, headers=JSON)
    assert resp.status == 503
    assert resp.headers["x-oaimux-error"] == "rate_limiter_unavailable"
    assert upstream.requests == 1


# ---------------------------------------------------------------------------
# Real processes


async def test_two_serve_processes_sharing_redis_admit_exactly_the_reservations_that_fit(
    upstream: UsageUpstream, upstream_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    cfg = config(upstream_url, redis_server.url, tokens_per_day=100 * COST)
    async with (
        running_proxy(write_config(tmp_path / "a.yaml", cfg)) as a,
        running_proxy(write_config(tmp_path / "b.yaml", cfg)) as b,
    ):
        statuses = await burst_of([f"{proxy.url}{CHAT}" for proxy in (a, b)], 500)
    assert (statuses.count(200), statuses.count(429)) == (100, 400)
    assert upstream.requests == 100


async def test_two_workers_sharing_redis_admit_exactly_the_reservations_that_fit(
    upstream: UsageUpstream, upstream_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    cfg = config(upstream_url, redis_server.url, tokens_per_day=100 * COST)
    temp = tmp_path / "workers-tmp"
    temp.mkdir()
    config_path = write_config(tmp_path / "workers.yaml", cfg)
    async with running_proxy(config_path, "--workers", "2", env={"TMPDIR": str(temp)}) as proxy:
        statuses = await burst_of([f"{proxy.url}{CHAT}"], 500)
        # Both workers took part: each counted requests in its own metrics file.
        (shared,) = temp.glob("oaimux-metrics-*")
        pattern = re.compile(r"counter_(\d+)\.db")
        async with asyncio.timeout(10):
            while (
                len({m.group(1) for f in shared.iterdir() if (m := pattern.fullmatch(f.name))}) < 2
            ):
                await asyncio.sleep(0.1)  # bounded polling for the workers' next sync
    assert (statuses.count(200), statuses.count(429)) == (100, 400)
    assert upstream.requests == 100
