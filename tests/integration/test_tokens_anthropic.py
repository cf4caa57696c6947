"""Token budgets on Anthropic's Messages API, over real sockets (README: Token budgets).

The proxy runs in front of :class:`~tests.fakes.anthropic_messages.AnthropicMessages`,
which reports its usage as Anthropic does: in a JSON answer's ``usage``, or in a
stream split between ``message_start`` (input and cache counts) and the last
``message_delta`` (output). The limiter's clock stands still (a fake one), so
every ``x-oaimux-ratelimit-remaining-tokens`` is exact.
"""

from __future__ import annotations

import json
import math
from typing import Any

import aiohttp
import anthropic
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.admission.buckets_memory import MemoryRateLimiter
from proxy.config import parse_settings
from proxy.server.app import create_app, server_options
from proxy.server.keys import LIMITER, OBSERVER
from tests.fakes.anthropic_messages import AnthropicMessages

Client = TestClient[web.Request, web.Application]
MODEL = "claude-sonnet-5-5"
UPSTREAM_KEY = "sk-ant-upstream-secret"
HEADERS = {"Content-Type": "application/json", "anthropic-version": "2023-06-01"}
REMAINING = "x-oaimux-ratelimit-remaining-tokens"


class StillClock:
    """The limiter's clock: it never moves, so no bucket refills during a test."""

    def __call__(self) -> int:
        return 10**12


def messages_body(max_tokens: int, *, stream: bool = False) -> bytes:
    turn = [{"role": "user", "content": "say hi"}]
    return json.dumps(
        {"model": MODEL, "max_tokens": max_tokens, "messages": turn, "stream": stream}
    ).encode()


def estimate(raw: bytes, output: int) -> int:
    """What the proxy reserves: ceil(bytes / 4) and the output part."""
    return math.ceil(len(raw) / 4) + output


@pytest.fixture
def upstream() -> AnthropicMessages:
    # Cache reads are not charged, cache writes are (README: Token budgets).
    return AnthropicMessages(
        name="sonnet", api_key=UPSTREAM_KEY, cache_read_tokens=100, cache_creation_tokens=7
    )


@pytest.fixture
async def proxy(aiohttp_client: Any, aiohttp_server: Any, upstream: AnthropicMessages) -> Any:
    server: TestServer = await aiohttp_server(upstream.app())

    async def make(**rate: Any) -> Client:
        config = {
            "upstreams": {
                "sonnet": {
                    "url": str(server.make_url("/v1")),
                    "headers": {"set": {"x-api-key": UPSTREAM_KEY}},
                }
            },
            "routes": [{"model": "claude-*", "upstream": "sonnet"}],
            "metrics": {"enabled": True},
            "rate_limit": rate,
        }
        client: Client = await aiohttp_client(
            create_app(parse_settings(config, environ={})), server_kwargs=server_options()
        )
        admission = client.app[LIMITER]
        await admission.storage.close()
        admission.storage = MemoryRateLimiter(StillClock())
        return client

    return make


async def post(client: Client, raw: bytes, path: str = "/v1/messages") -> aiohttp.ClientResponse:
    resp = await client.post(path, data=raw, headers=HEADERS)
    await resp.read()
    return resp


def charged_for(upstream: AnthropicMessages) -> int:
    """What one answer of the fake costs: input, cache writes and output (the
    reply's deltas), not the cache reads."""
    output = len(upstream.reply_deltas(MODEL))
    return upstream.input_tokens + upstream.cache_creation_tokens + output


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_messages_answer_is_reconciled_from_anthropics_usage(
    proxy: Any, upstream: AnthropicMessages, stream: bool
) -> None:
    client = await proxy(tokens_per_minute=10000, max_output_reservation=None)
    raw = messages_body(8900, stream=stream)
    first = await post(client, raw)
    assert first.status == 200
    assert first.headers[REMAINING] == str(10000 - estimate(raw, 8900))
    second = await post(client, raw)
    assert second.status == 200, "the first answer's usage was not reconciled"
    # What the first answer really used, then the second's reservation.
    left = 10000 - charged_for(upstream) - estimate(raw, 8900)
    assert second.headers[REMAINING] == str(left)


async def test_count_tokens_takes_no_tokens(proxy: Any, upstream: AnthropicMessages) -> None:
    client = await proxy(tokens_per_minute=3000, default_output_tokens=1024)
    counted = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    for _ in range(5):  # reserved, 5 x ~1,040 tokens would not fit in 3,000
        resp = await post(client, counted.encode(), "/v1/messages/count_tokens")
        assert resp.status == 200
        assert json.loads(await resp.read()) == {"input_tokens": upstream.input_tokens}
        assert REMAINING not in resp.headers
    raw = messages_body(2900)
    answer = await post(client, raw)
    assert answer.status == 200
    assert answer.headers[REMAINING] == str(3000 - estimate(raw, 2900))
    metrics = client.app[OBSERVER].metrics
    assert metrics is not None
    unreconciled = metrics.registry.get_sample_value(
        "oaimux_tokens_unreconciled_total", {"key": "", "model": MODEL, "reason": "no_usage"}
    )
    assert unreconciled is None


async def test_the_anthropic_sdk_raises_rate_limit_error_for_tokens(
    proxy: Any, upstream: AnthropicMessages
) -> None:
    client = await proxy(tokens_per_minute=1000)
    # A whole budget's reservation passes when the budget is full; its answer
    # is reconciled to the few tokens used, which the next one no longer fits.
    assert (await post(client, messages_body(999))).status == 200
    base_url = str(client.make_url("")).rstrip("/")
    sdk = anthropic.AsyncAnthropic(base_url=base_url, api_key="unused", max_retries=0)
    turn: Any = [{"role": "user", "content": "say hi"}]
    async with sdk:
        with pytest.raises(anthropic.RateLimitError) as refused:
            await sdk.messages.create(model=MODEL, max_tokens=999, messages=turn)
    err = refused.value
    assert err.status_code == 429
    assert isinstance(err.body, dict)
    assert err.body["type"] == "error"
    assert err.body["error"]["type"] == "rate_limit_error"
    assert "tokens per min" in err.body["error"]["message"]
    assert int(err.response.headers["retry-after"]) >= 1
    assert err.response.headers["x-ratelimit-limit-tokens"] == "1000"
    assert len(upstream.messages_received) == 1, "a refused reservation reached the upstream"
