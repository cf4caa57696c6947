"""Token budgets over real sockets, in one process (README: Token budgets).

The proxy runs in front of :class:`~tests.fakes.usage_upstream.UsageUpstream`,
whose answers report the usage each test chooses. Where a figure depends on
time, the limiter's clock is a fake one the test moves (a bucket refills
continuously, so a real clock would make the expected headers drift).
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.admission.buckets import NS
from proxy.admission.buckets_memory import MemoryRateLimiter
from proxy.config import parse_settings
from proxy.server.app import create_app, server_options
from proxy.server.keys import LIMITER, OBSERVER
from tests.fakes.access_lines import capture_logs, parse_text_line
from tests.fakes.upstream import FakeUpstream
from tests.fakes.usage_upstream import ByteTap, UsageUpstream, usage

Client = TestClient[web.Request, web.Application]
CHAT = "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}


class FakeClock:
    """Integer nanoseconds, moved by the test."""

    def __init__(self) -> None:
        self.now = 10**12

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * NS)


def body(max_tokens: int | None = None, **extra: Any) -> bytes:
    data: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    if max_tokens is not None:
        data["max_tokens"] = max_tokens
    data.update(extra)
    return json.dumps(data).encode()


def estimate(raw: bytes, output: int) -> int:
    """What the proxy reserves: ceil(bytes / 4) and the output part."""
    return math.ceil(len(raw) / 4) + output


def body_costing(tokens: int, **extra: Any) -> bytes:
    """A chat body (``max_tokens: 10``) whose estimate is exactly ``tokens``:
    its message is padded to the size that makes it so."""

    def make(pad: int) -> bytes:
        message = [{"role": "user", "content": "x" * pad}]
        return json.dumps({"model": "m", "messages": message, "max_tokens": 10, **extra}).encode()

    raw = make(4 * (tokens - 10) - len(make(0)))
    assert estimate(raw, 10) == tokens
    return raw


@pytest.fixture
def upstream() -> UsageUpstream:
    return UsageUpstream()


@pytest.fixture
async def upstream_url(aiohttp_server: Any, upstream: UsageUpstream) -> str:
    server: TestServer = await aiohttp_server(upstream.app())
    return str(server.make_url("/v1"))


def config(upstream_url: str, **rate: Any) -> dict[str, Any]:
    return {
        "upstreams": {"up": {"url": upstream_url}},
        "routes": [{"model": "m", "upstream": "up"}],
        "rate_limit": rate,
    }


@pytest.fixture
def proxy(aiohttp_client: Any) -> Any:
    async def make(cfg: dict[str, Any], clock: FakeClock | None = None) -> Client:
        client: Client = await aiohttp_client(
            create_app(parse_settings(cfg, environ={})), server_kwargs=server_options()
        )
        if clock is not None:
            admission = client.app[LIMITER]
            await admission.storage.close()
            admission.storage = MemoryRateLimiter(clock)
        return client

    return make


async def post(client: Client, raw: bytes, path: str = CHAT) -> aiohttp.ClientResponse:
    resp = await client.post(path, data=raw, headers=JSON)
    await resp.read()
    return resp


def metric(client: Client, name: str, **labels: str) -> float | None:
    metrics = client.app[OBSERVER].metrics
    assert metrics is not None
    value: float | None = metrics.registry.get_sample_value(name, labels)
    return value


# ---------------------------------------------------------------------------
# The 429


async def test_the_429_for_tokens_has_openai_shape_headers_and_values(
    proxy: Any, upstream: UsageUpstream, upstream_url: str
) -> None:
    clock = FakeClock()
    client = await proxy(config(upstream_url, tokens_per_minute=1000), clock)
    upstream.usage = None  # the first answer keeps its reservation: 600 owed
    raw = body_costing(600)
    assert (await post(client, raw)).status == 200
    resp = await post(client, raw)
    assert resp.status == 429
    # 600 owed + 600 asked = 200 over a 1000/min budget: 12 s of refill.
    assert resp.headers["Retry-After"] == "12"
    assert resp.headers["retry-after-ms"] == "12000"
    assert resp.headers["x-ratelimit-limit-tokens"] == "1000"
    assert resp.headers["x-ratelimit-remaining-tokens"] == "400"
    assert resp.headers["x-ratelimit-reset-tokens"] == "36s"  # 600 owed, refilled in 36 s
    assert resp.headers["x-oaimux-ratelimit-remaining-tokens"] == "400"
    assert resp.headers["x-oaimux-error"] == "rate_limit_exceeded"
    error = (await resp.json())["error"]
    assert error == {
        "message": "Rate limit reached for tokens per min (TPM): Limit 1000, Used 600, "
        "Requested 600. Please try again in 12s.",
        "type": "tokens",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert upstream.requests == 1
    # The wait it names is enough, and not much more than needed.
    clock.advance(11.9)
    assert (await post(client, raw)).status == 429
    clock.advance(0.1)
    assert (await post(client, raw)).status == 200


async def test_a_refused_reservation_sends_no_byte_upstream(
    proxy: Any, upstream: UsageUpstream, aiohttp_server: Any
) -> None:
    server: TestServer = await aiohttp_server(upstream.app())
    tap = ByteTap(server.port or 0)
    await tap.start()
    try:
        url = f"http://127.0.0.1:{tap.port}/v1"
        client = await proxy(config(url, tokens_per_minute=1000), FakeClock())
        upstream.usage = None
        assert (await post(client, body_costing(600))).status == 200
        sent = tap.bytes_in
        assert sent > 0
        for _ in range(3):
            assert (await post(client, body_costing(600))).status == 429
        assert (tap.bytes_in, upstream.requests) == (sent, 1)
    finally:
        await tap.close()


async def test_a_request_larger_than_the_whole_budget_passes_when_it_is_full(
    proxy: Any, upstream: UsageUpstream, upstream_url: str
) -> None:
    clock = FakeClock()
    client = await proxy(config(upstream_url, tokens_per_minute=1000), clock)
    upstream.usage = None
    huge = body_costing(3000)  # more than the budget holds: charged the budget
    assert (await post(client, huge)).status == 200
    resp = await post(client, body_costing(100))
    assert resp.status == 429
    assert resp.headers["retry-after-ms"] == "6000"  # 100 tokens of a 1000/min refill


# ---------------------------------------------------------------------------
# Reconciliation


async def test_an_answer_smaller_than_its_reservation_frees_the_budget_at_once(
    proxy: Any, upstream: UsageUpstream, upstream_url: str
) -> None:
    cfg = config(upstream_url, tokens_per_minute=10000, max_output_reservation=None)
    client = await proxy(cfg, FakeClock())
    upstream.usage = usage(10, 5)
    big = body(max_tokens=9000)  # two of them never fit in 10000
    first = await post(client, big)
    assert first.status == 200
    reserved = estimate(big, 9000)
    assert first.headers["x-oaimux-ratelimit-remaining-tokens"] == str(10000 - reserved)
    second = await post(client, big)  # fits only because the first was charged 15
    assert second.status == 200
    assert second.headers["x-oaimux-ratelimit-remaining-tokens"] == str(10000 - 15 - reserved)


async def test_the_output_part_of_a_reservation_is_capped(
    proxy: Any, upstream: UsageUpstream, upstream_url: str
) -> None:
    client = await proxy(config(upstream_url, tokens_per_minute=100000), FakeClock())
    upstream.usage = None  # keep what was reserved
    raw = body(max_tokens=128000)  # what Claude Code asks on every turn
    resp = await post(client, raw)
    assert resp.headers["x-oaimux-ratelimit-remaining-tokens"] == str(
        100000 - estimate(raw, 4096)  # max_output_reservation's default
    )
    bare = body()  # no cap of its own: default_output_tokens (1024)
    resp = await post(client, bare)
    assert resp.headers["x-oaimux-ratelimit-remaining-tokens"] == str(
        100000 - estimate(raw, 4096) - estimate(bare, 1024)
    )


async def test_an_answer_larger_than_its_reservation_makes_the_next_request_wait(
    proxy: Any, upstream: UsageUpstream, upstream_url: str
) -> None:
    clock = FakeClock()
    client = await proxy(config(upstream_url, tokens_per_minute=10000), clock)
    small = body_costing(50)
    upstream.usage = usage(12000, 3000)  # 15000 used: the bucket owes more than it holds
    assert (await post(client, small)).status == 200
    resp = await post(client, small)
    assert resp.status == 429
    # 15000 owed + 50 asked - 10000 = 5050 tokens of refill at 10000 a minute.
    assert resp.headers["retry-after-ms"] == str(math.ceil(5050 * 60 / 10000 * 1000))
    assert resp.headers["x-ratelimit-remaining-tokens"] == "0"
    assert resp.headers["x-ratelimit-reset-tokens"] == "1m30s"
    clock.advance(5050 * 60 / 10000)
    assert (await post(client, small)).status == 200


async def test_cached_input_is_not_charged(
    proxy: Any, upstream: UsageUpstream, upstream_url: str
) -> None:
    client = await proxy(config(upstream_url, tokens_per_minute=10000), FakeClock())
    upstream.usage = usage(5000, 100, cached=4800)  # 300 billable
    raw = body_costing(1000)
    assert (await post(client, raw)).status == 200
    resp = await post(client, raw)
    assert resp.headers["x-oaimux-ratelimit-remaining-tokens"] == str(10000 - 300 - 1000)


async def test_a_streamed_answer_is_reconciled_from_its_final_usage_event(
    proxy: Any, upstream: UsageUpstream, upstream_url: str
) -> None:
    client = await proxy(config(upstream_url, tokens_per_minute=10000), FakeClock())
    upstream.usage = usage(10, 5)
    with capture_logs() as logs:
        stream = body_costing(9000, stream=True, stream_options={"include_usage": True})
        resp = await post(client, stream)
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        await logs.wait_for(1)
        line = parse_text_line(logs.access[0])
        assert (line["reserved_tokens"], line["charged_tokens"]) == ("9000", "15")
        # The stream charged 15: another 9000 fits.
        assert (await post(client, body_costing(9000))).status == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_a_responses_api_answer_is_reconciled(
    proxy: Any, upstream: UsageUpstream, upstream_url: str, stream: bool
) -> None:
    client = await proxy(config(upstream_url, tokens_per_minute=10000), FakeClock())
    upstream.usage = usage(40, 2)
    raw = json.dumps(
        {"model": "m", "input": "hi", "max_output_tokens": 8900, "stream": stream}
    ).encode()
    first = await post(client, raw, "/v1/responses")
    assert first.status == 200
    second = await post(client, raw, "/v1/responses")
    assert second.status == 200, "the first answer's 42 tokens were not reconciled"


async def test_an_answer_without_usage_keeps_its_reservation_and_is_counted(
    proxy: Any, upstream: UsageUpstream, upstream_url: str
) -> None:
    client = await proxy(config(upstream_url, tokens_per_minute=10000), FakeClock())
    # A stream that did not ask for usage: none is reported, the 6000 stay charged.
    upstream.usage = usage(10, 5)
    resp = await post(client, body_costing(6000, stream=True))
    assert resp.status == 200
    assert (await post(client, body_costing(6000))).status == 429
    assert metric(client, "oaimux_tokens_unreconciled_total", key="", model="m",
                  reason="no_usage") == 1  # fmt: skip


async def test_no_upstream_reached_or_an_upstream_error_is_refunded(
    proxy: Any, upstream: UsageUpstream, upstream_url: str
) -> None:
    with socket_nobody_listens_on() as dead:
        cfg = config(upstream_url, tokens_per_minute=1000)
        cfg["upstreams"]["dead"] = {"url": f"http://127.0.0.1:{dead}/v1"}
        cfg["routes"].insert(0, {"model": "gone", "upstream": "dead"})
        client = await proxy(cfg, FakeClock())
        upstream.usage = None  # an answer from the live upstream would keep its 600
        gone = body_costing(600).replace(b'"model": "m"', b'"model": "gone"')
        assert (await post(client, gone)).status == 502
        upstream.status = 400
        assert (await post(client, body_costing(600))).status == 400
        upstream.status = 200
        # Both refunded: 600 fits, and then nothing more.
        assert (await post(client, body_costing(600))).status == 200
        assert (await post(client, body_costing(600))).status == 429


# ---------------------------------------------------------------------------
# Windows, shadow mode, headers, metrics


async def test_the_day_bucket_refills_over_a_day(
    proxy: Any, upstream: UsageUpstream, upstream_url: str
) -> None:
    clock = FakeClock()
    cfg = config(upstream_url, tokens_per_minute=5000, tokens_per_day=10000)
    client = await proxy(cfg, clock)
    upstream.usage = usage(4000, 1000)
    raw = body_costing(500)
    assert (await post(client, raw)).status == 200
    clock.advance(61)  # the minute bucket is full again, the day one owes 5000 - 3.5
    assert (await post(client, raw)).status == 200
    clock.advance(61)  # the day owes ~9993: 500 more do not fit
    resp = await post(client, raw)
    assert resp.status == 429
    error = (await resp.json())["error"]
    assert error["message"].startswith("Rate limit reached for tokens per day (TPD): Limit 10000")
    assert resp.headers["x-ratelimit-limit-tokens"] == "10000"
    owed = 10000 - 10000 * 122 / 86400  # two answers of 5000, two minutes of refill
    wait = (owed + 500 - 10000) * 86400 / 10000
    assert resp.headers["retry-after-ms"] == str(math.ceil(wait * 1000))
    assert resp.headers["Retry-After"] == str(math.ceil(wait))
    assert int(resp.headers["Retry-After"]) > 3600  # over an hour: a day's refill
    clock.advance(wait)
    assert (await post(client, raw)).status == 200


async def test_shadow_mode_never_refuses_and_counts_what_it_would_have_refused(
    proxy: Any, upstream: UsageUpstream, upstream_url: str
) -> None:
    cfg = config(upstream_url, tokens_per_minute=1000, enforce=False)
    cfg["auth"] = {"keys": [{"name": "team-a", "key": "sk-proxy-team-a-0001"}]}
    client = await proxy(cfg, FakeClock())
    upstream.usage = None
    raw = body_costing(600)
    with capture_logs() as logs:
        statuses = []
        for _ in range(5):
            resp = await client.post(
                CHAT, data=raw, headers={**JSON, "Authorization": "Bearer sk-proxy-team-a-0001"}
            )
            statuses.append(resp.status)
        assert statuses == [200] * 5
        assert upstream.requests == 5
        assert metric(client, "oaimux_token_limit_not_enforced_total", key="team-a",
                      model="m", window="minute") == 4  # fmt: skip
        assert metric(client, "oaimux_token_limited_total", key="team-a", model="m",
                      window="minute") is None  # fmt: skip
        assert any("enforce: false" in line for line in logs.everything)


async def test_every_answer_shows_the_proxys_budget_and_keeps_the_upstreams_headers(
    proxy: Any, upstream: UsageUpstream, upstream_url: str
) -> None:
    upstream.headers = {
        "x-ratelimit-remaining-tokens": "1999000",
        "x-ratelimit-limit-tokens": "2000000",
    }
    cfg = config(upstream_url, requests_per_minute=60, burst=5, tokens_per_minute=10000)
    client = await proxy(cfg, FakeClock())
    upstream.usage = usage(100, 100)
    resp = await post(client, body_costing(1000))
    assert resp.status == 200
    # The upstream's own limits on the proxy's account, untouched ...
    assert resp.headers["x-ratelimit-remaining-tokens"] == "1999000"
    assert resp.headers["x-ratelimit-limit-tokens"] == "2000000"
    # ... and the proxy's budget for this client beside them.
    assert resp.headers["x-oaimux-ratelimit-remaining-requests"] == "4"
    assert resp.headers["x-oaimux-ratelimit-reset-requests"] == "1s"
    assert resp.headers["x-oaimux-ratelimit-remaining-tokens"] == "9000"
    assert resp.headers["x-oaimux-ratelimit-reset-tokens"] == "6s"
    # A request with no tokens to reserve (the model list) shows the request bucket,
    # and so does an error of the proxy's own.
    models = await client.get("/v1/models")
    assert models.headers["x-oaimux-ratelimit-remaining-requests"] == "3"
    unknown = await post(client, body(model="nope"))
    assert unknown.status == 404
    assert unknown.headers["x-oaimux-ratelimit-remaining-requests"] == "2"


async def test_refusals_are_counted_by_key_name_never_by_key(
    proxy: Any, upstream: UsageUpstream, upstream_url: str
) -> None:
    cfg = config(upstream_url, tokens_per_day=1000)
    cfg["auth"] = {"keys": [{"name": "team-a", "key": "sk-proxy-secret-value-42"}]}
    client = await proxy(cfg, FakeClock())
    upstream.usage = None
    auth = {**JSON, "Authorization": "Bearer sk-proxy-secret-value-42"}
    for expected in (200, 429, 429):
        resp = await client.post(CHAT, data=body_costing(600), headers=auth)
        assert resp.status == expected
    assert metric(client, "oaimux_token_limited_total", key="team-a", model="m",
                  window="day") == 2  # fmt: skip
    # A wrong key never makes a series of its own.
    resp = await client.post(
        CHAT, data=body_costing(600), headers={**JSON, "Authorization": "Bearer sk-wrong-key-000"}
    )
    assert resp.status == 401
    text = (await (await client.get("/metrics")).read()).decode()
    assert "sk-proxy-secret-value-42" not in text and "sk-wrong" not in text
    assert 'oaimux_token_limited_total{key="team-a",model="m",window="day"} 2.0' in text


async def test_a_route_budget_replaces_the_global_one(
    proxy: Any, upstream: UsageUpstream, upstream_url: str
) -> None:
    cfg = config(upstream_url, requests_per_minute=600, burst=100, tokens_per_minute=100000)
    cfg["routes"].insert(0, {"model": "pricey", "upstream": "up",
                             "rate_limit": {"tokens_per_minute": 1000}})  # fmt: skip
    client = await proxy(cfg, FakeClock())
    upstream.usage = None
    pricey = body_costing(600).replace(b'"model": "m"', b'"model": "pricey"')
    assert (await post(client, pricey)).status == 200
    resp = await post(client, pricey)
    assert resp.status == 429
    assert (await resp.json())["error"]["message"].startswith(
        "Rate limit reached for tokens per min (TPM) to this model"
    )
    assert (await post(client, body_costing(600))).status == 200  # the global budget


async def test_500_concurrent_requests_admit_exactly_the_reservations_that_fit(
    proxy: Any, upstream: UsageUpstream, upstream_url: str
) -> None:
    upstream.usage = None  # no refunds while the burst runs
    raw = body_costing(120)
    client = await proxy(config(upstream_url, tokens_per_day=100 * 120))
    url = client.make_url(CHAT)
    start = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            await start.wait()
            async with session.post(url, data=raw, headers=JSON) as resp:
                await resp.read()
                return resp.status

        tasks = [asyncio.create_task(one()) for _ in range(500)]
        await asyncio.sleep(0)
        start.set()
        statuses = await asyncio.gather(*tasks)
    assert (statuses.count(200), statuses.count(429)) == (100, 400)
    assert upstream.requests == 100


@contextmanager
def socket_nobody_listens_on() -> Iterator[int]:
    """A loopback port with nothing listening (bound, never listened on)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_the_openai_sdk_raises_rate_limit_error_with_the_headers_readable(
    proxy: Any, upstream: UsageUpstream, upstream_url: str
) -> None:
    client = await proxy(config(upstream_url, tokens_per_minute=1000), FakeClock())
    upstream.usage = None
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
    messages: list[Any] = [{"role": "user", "content": "x" * 2000}]  # ~520 tokens
    async with sdk:
        first = await sdk.chat.completions.with_raw_response.create(
            model="m", messages=messages, max_tokens=10
        )
        assert first.headers["x-oaimux-ratelimit-remaining-tokens"].isdigit()
        with pytest.raises(openai.RateLimitError) as info:
            await sdk.chat.completions.create(model="m", messages=messages, max_tokens=10)
    err = info.value
    assert err.status_code == 429
    assert (err.type, err.code) == ("tokens", "rate_limit_exceeded")
    headers = err.response.headers
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(headers["x-ratelimit-remaining-tokens"]) < 1000
    assert int(headers["retry-after-ms"]) > 0
    assert int(headers["Retry-After"]) >= 1
    assert headers["x-ratelimit-reset-tokens"].endswith("s")
    assert upstream.requests == 1


async def test_a_client_that_leaves_mid_stream_is_charged_its_reservation(
    proxy: Any, aiohttp_server: Any
) -> None:
    fake = FakeUpstream(gated=True, sse_chunks=3)
    server: TestServer = await aiohttp_server(fake.app())
    cfg = config(str(server.make_url("/v1")), tokens_per_minute=1000)
    cfg["metrics"] = {"enabled": True}
    client = await proxy(cfg, FakeClock())
    with capture_logs() as logs:
        resp = await client.post(CHAT, data=body_costing(600, stream=True), headers=JSON)
        fake.gate(0).set()
        assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: ")
        resp.close()  # gone before the usage could come
        fake.gate(1).set()
        (line,) = await logs.wait_for(1)
    fields = parse_text_line(line)
    assert (fields["outcome"], fields["reserved_tokens"], fields["charged_tokens"]) == (
        "client_gone", "600", "600",
    )  # fmt: skip
    assert (await post(client, body_costing(600))).status == 429
    assert metric(client, "oaimux_tokens_unreconciled_total", key="", model="m",
                  reason="cut_short") == 1  # fmt: skip


async def test_an_answer_whose_bucket_another_answer_refunded_keeps_sane_headers(
    aiohttp_server: Any, proxy: Any
) -> None:
    # A reserves 4,000 and drains; B reserves 100; A's upstream fails, so A is
    # refunded in full into the bucket B's answer then reads (it owes less than
    # nothing as stored): B's answer still goes out, with the bucket full.
    arrived = {"A": asyncio.Event(), "B": asyncio.Event()}
    release = {"A": asyncio.Event(), "B": asyncio.Event()}

    async def chat(request: web.Request) -> web.Response:
        who = json.loads(await request.read())["messages"][0]["content"]
        arrived[who].set()
        await release[who].wait()
        if who == "A":
            return web.json_response({"error": {"message": "down"}}, status=500)
        return web.json_response({"usage": {"prompt_tokens": 5, "completion_tokens": 1}})

    gated = web.Application()
    gated.router.add_post("/v1/chat/completions", chat)
    server: TestServer = await aiohttp_server(gated)
    clock = FakeClock()
    client = await proxy(config(str(server.make_url("/v1")), tokens_per_minute=40000), clock)
    first = asyncio.ensure_future(post(client, body(4000, messages=[{"content": "A"}])))
    await arrived["A"].wait()
    clock.advance(61)  # A's reservation has drained
    second = asyncio.ensure_future(post(client, body(100, messages=[{"content": "B"}])))
    await arrived["B"].wait()
    release["A"].set()
    assert (await first).status == 500
    release["B"].set()
    answer = await second
    assert answer.status == 200
    assert answer.headers["x-oaimux-ratelimit-remaining-tokens"] == "40000"
    assert answer.headers["x-oaimux-ratelimit-reset-tokens"] == "1ms"
