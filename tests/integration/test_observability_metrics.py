"""Prometheus metrics at /metrics: values after known sequences of requests.

Every value is read the way Prometheus reads it: by scraping /metrics and
parsing the exposition with prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from proxy.observe.metrics import serve_metrics
from proxy.server.keys import OBSERVER
from tests.conftest import MakeProxy, basic_config
from tests.fakes.access_lines import LogLines, capture_logs, parse_text_line
from tests.fakes.openai_shaped import CHAT_USAGE, RESPONSES_USAGE, STREAM_USAGE, OpenAIShaped
from tests.fakes.upstream import FakeUpstream

CHAT = "/v1/chat/completions"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


async def scrape(
    client: TestClient[web.Request, web.Application], path: str = "/metrics"
) -> Samples:
    resp = await client.get(path)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain")
    return parse(await resp.text())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(labels)[label] for (n, labels) in samples if n == name}


def chat(model: str, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
        **extra,
    }


@pytest.fixture
def logs() -> Iterator[LogLines]:
    with capture_logs() as lines:
        yield lines


async def post(client: TestClient[web.Request, web.Application], model: str, **kw: Any) -> int:
    resp = await client.post(CHAT, json=chat(model, **kw))
    await resp.read()
    return resp.status


async def test_values_after_a_known_sequence(make_proxy: MakeProxy, fake: FakeUpstream) -> None:
    client = await make_proxy()
    assert [await post(client, m) for m in ("gpt-4o-mini", "gpt-4o-mini", "fast")] == [200] * 3
    assert [await post(client, m) for m in ("meta-llama/A-8b", "meta-llama/B-70b")] == [200] * 2
    assert [await post(client, f"unknown-{i}") for i in range(5)] == [404] * 5
    fake.status_override = 503
    assert await post(client, "gpt-4o-mini") == 503  # the only upstream: relayed as it came
    fake.status_override = None
    assert (await client.get("/v1/models")).status == 200

    s = await scrape(client)
    requests = "oaimux_requests_total"
    assert value(s, requests, model="gpt-4o-mini", upstream="fake", status_class="2xx") == 2
    assert value(s, requests, model="fast", upstream="fake", status_class="2xx") == 1
    assert value(s, requests, model="meta-llama/*", upstream="fake", status_class="2xx") == 2
    assert value(s, requests, model="", upstream="", status_class="4xx") == 5
    assert value(s, requests, model="gpt-4o-mini", upstream="fake", status_class="5xx") == 1
    assert value(s, requests, model="", upstream="", status_class="2xx") == 1  # /v1/models
    assert sum(v for (n, _), v in s.items() if n == requests) == 12
    # Only routing-table entries ever become label values.
    assert label_values(s, requests, "model") == {"gpt-4o-mini", "fast", "meta-llama/*", ""}

    assert value(s, "oaimux_request_duration_seconds_count", upstream="fake") == 6
    assert value(s, "oaimux_request_duration_seconds_count", upstream="") == 6
    assert value(s, "oaimux_time_to_first_byte_seconds_count", upstream="fake") == 6
    assert value(s, "oaimux_time_to_first_byte_seconds_count", upstream="") == 0
    assert value(s, "oaimux_request_duration_seconds_bucket", upstream="fake", le="+Inf") == 6

    # The fake's JSON reports 5 prompt + 1 completion tokens; the 503 carries none.
    tokens = "oaimux_tokens_total"
    assert value(s, tokens, model="gpt-4o-mini", upstream="fake", type="prompt") == 10
    assert value(s, tokens, model="gpt-4o-mini", upstream="fake", type="completion") == 2
    assert value(s, tokens, model="fast", upstream="fake", type="prompt") == 5
    assert value(s, tokens, model="meta-llama/*", upstream="fake", type="completion") == 2

    assert value(s, "oaimux_requests_in_flight") == 0
    assert value(s, "oaimux_open_streams") == 0
    assert value(s, "oaimux_circuit_breaker_state", upstream="fake") == 0
    # Scrapes are not requests: counting them would skew every rate.
    s = await scrape(client)
    assert sum(v for (n, _), v in s.items() if n == requests) == 12


async def test_in_flight_and_open_streams(make_proxy: MakeProxy, fake: FakeUpstream) -> None:
    fake.gated = True
    client = await make_proxy()
    resp = await client.post(CHAT, json=chat("gpt-4o-mini", stream=True))
    fake.gate(0).set()
    assert await resp.content.readany()
    s = await scrape(client)
    assert value(s, "oaimux_requests_in_flight") == 1
    assert value(s, "oaimux_open_streams") == 1
    for i in range(1, fake.sse_chunks + 1):
        fake.gate(i).set()
    await resp.read()
    s = await scrape(client)
    assert value(s, "oaimux_requests_in_flight") == 0
    assert value(s, "oaimux_open_streams") == 0
    assert (
        value(s, "oaimux_requests_total", model="gpt-4o-mini", upstream="fake", status_class="2xx")
        == 1
    )


async def test_client_gone_mid_stream_closes_the_gauges(
    make_proxy: MakeProxy, fake: FakeUpstream, logs: LogLines
) -> None:
    fake.gated = True
    client = await make_proxy()
    resp = await client.post(CHAT, json=chat("gpt-4o-mini", stream=True))
    fake.gate(0).set()
    assert await resp.content.readany()
    resp.close()
    await logs.wait_for(1)
    s = await scrape(client)
    assert value(s, "oaimux_requests_in_flight") == 0
    assert value(s, "oaimux_open_streams") == 0


async def test_fallbacks_failures_and_breaker_state(
    make_proxy: MakeProxy, upstream_url: str, logs: LogLines
) -> None:
    config = basic_config(upstream_url)
    config["upstreams"]["down"] = {
        "url": "http://127.0.0.1:9/v1",  # discard port: connection refused
        "circuit_breaker": {"failures": 2, "cooldown": 600},
    }
    config["routes"] = [{"model": "gpt-4o-mini", "upstream": ["down", "fake"]}]
    client = await make_proxy(config)
    s = await scrape(client)
    assert (
        value(s, "oaimux_circuit_breaker_state", upstream="down") == 0
    )  # known before any request
    assert [await post(client, "gpt-4o-mini") for _ in range(3)] == [200] * 3

    s = await scrape(client)
    # Two tries at "down" failed and moved on; then its breaker opened and it was skipped.
    assert value(s, "oaimux_upstream_failures_total", upstream="down", kind="connect") == 2
    assert value(s, "oaimux_fallbacks_total", from_upstream="down", to_upstream="fake") == 2
    assert value(s, "oaimux_circuit_breaker_state", upstream="down") == 2
    assert value(s, "oaimux_circuit_breaker_state", upstream="fake") == 0
    assert (
        value(s, "oaimux_requests_total", model="gpt-4o-mini", upstream="fake", status_class="2xx")
        == 3
    )
    tried = [parse_text_line(line)["tried"] for line in await logs.wait_for(3)]
    assert tried == ["down", "down", "-"]


async def test_rate_limit_rejections_and_metrics_not_limited(
    make_proxy: MakeProxy, upstream_url: str
) -> None:
    client = await make_proxy(
        basic_config(upstream_url, rate_limit={"requests_per_minute": 1, "burst": 2})
    )
    assert [await post(client, "gpt-4o-mini") for _ in range(3)] == [200, 200, 429]
    assert await post(client, "unknown") == 429
    for _ in range(5):  # the bucket is empty, yet every scrape gets through
        s = await scrape(client)
    # No route has a limit of its own, so the token is taken before the body is
    # read (and the model known): these refusals carry no model.
    assert value(s, "oaimux_rate_limited_total", model="") == 2
    assert value(s, "oaimux_requests_total", model="", upstream="", status_class="4xx") == 2


async def test_rate_limit_rejections_of_a_limited_route_carry_its_model(
    make_proxy: MakeProxy, upstream_url: str
) -> None:
    config = basic_config(upstream_url)
    config["routes"][0]["rate_limit"] = {"requests_per_minute": 1, "burst": 2}
    client = await make_proxy(config)
    assert [await post(client, "gpt-4o-mini") for _ in range(3)] == [200, 200, 429]
    s = await scrape(client)
    assert value(s, "oaimux_rate_limited_total", model="gpt-4o-mini") == 1
    assert (
        value(s, "oaimux_requests_total", model="gpt-4o-mini", upstream="", status_class="4xx") == 1
    )


async def _fail_mid_body(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b"data: {}\n\n")
    assert request.transport is not None
    request.transport.abort()
    return resp


async def test_mid_body_reset_counts_as_upstream_failure(
    make_proxy: MakeProxy, aiohttp_server: Any
) -> None:
    app = web.Application()
    app.router.add_get("/v1/{tail:.*}", _fail_mid_body)
    upstream: TestServer = await aiohttp_server(app)
    client = await make_proxy(
        {
            "upstreams": {"u": {"url": str(upstream.make_url("/v1"))}},
            "routes": [{"path": "*", "upstream": "u"}],
        }
    )
    resp = await client.get("/v1/anything")
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    s = await scrape(client)
    assert value(s, "oaimux_upstream_failures_total", upstream="u", kind="upstream_reset") == 1
    assert value(s, "oaimux_requests_total", model="", upstream="u", status_class="2xx") == 1


async def test_token_counters_from_openai_shaped_answers(
    make_proxy: MakeProxy, aiohttp_server: Any
) -> None:
    shaped = OpenAIShaped()
    upstream: TestServer = await aiohttp_server(shaped.app())
    client = await make_proxy(
        {
            "upstreams": {"openai": {"url": str(upstream.make_url("/v1"))}},
            "routes": [
                {"model": "gpt-4o", "upstream": "openai"},
                {"model": "gpt-4.1*", "upstream": "openai"},
            ],
        }
    )
    assert await post(client, "gpt-4o") == 200
    assert await post(client, "gpt-4o", stream=True, stream_options={"include_usage": True}) == 200
    assert await post(client, "gpt-4o", stream=True) == 200  # no usage asked: none counted
    resp = await client.post("/v1/responses", json={"model": "gpt-4.1-mini", "input": "hi"})
    await resp.read()
    s = await scrape(client)
    tokens = "oaimux_tokens_total"
    assert (
        value(s, tokens, model="gpt-4o", upstream="openai", type="prompt")
        == CHAT_USAGE[0] + STREAM_USAGE[0]
    )
    assert (
        value(s, tokens, model="gpt-4o", upstream="openai", type="completion")
        == CHAT_USAGE[1] + STREAM_USAGE[1]
    )
    assert (
        value(s, tokens, model="gpt-4.1*", upstream="openai", type="prompt") == RESPONSES_USAGE[0]
    )
    assert (
        value(s, tokens, model="gpt-4.1*", upstream="openai", type="completion")
        == RESPONSES_USAGE[1]
    )


async def test_openmetrics_on_request(make_proxy: MakeProxy) -> None:
    client = await make_proxy()
    resp = await client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await resp.text()).endswith("# EOF\n")


async def test_metrics_disabled(make_proxy: MakeProxy, upstream_url: str, logs: LogLines) -> None:
    client = await make_proxy(basic_config(upstream_url, metrics={"enabled": False}))
    assert client.app is not None and client.app[OBSERVER].metrics is None
    resp = await client.get("/metrics")
    assert resp.status == 404  # no such endpoint: an unknown URL like any other
    assert await post(client, "gpt-4o-mini") == 200
    assert len(await logs.wait_for(2)) == 2  # the access log does not depend on metrics


async def test_metrics_path_setting(make_proxy: MakeProxy, upstream_url: str) -> None:
    client = await make_proxy(basic_config(upstream_url, metrics={"path": "/internal/prom"}))
    s = await scrape(client, "/internal/prom")
    assert ("oaimux_requests_in_flight", frozenset()) in s
    assert (await client.get("/metrics")).status == 404


async def test_metrics_on_their_own_listener(make_proxy: MakeProxy, upstream_url: str) -> None:
    client = await make_proxy(basic_config(upstream_url, metrics={"listen": "127.0.0.1:0"}))
    assert (await client.get("/metrics")).status == 404  # not on the port facing clients
    assert await post(client, "gpt-4o-mini") == 200
    assert client.app is not None
    metrics = client.app[OBSERVER].metrics
    assert metrics is not None
    runner = await serve_metrics(metrics, "/metrics", "127.0.0.1", 0)
    try:
        host, port = runner.addresses[0][:2]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{host}:{port}/metrics") as resp,
        ):
            s = parse(await resp.text())
        assert (
            value(
                s, "oaimux_requests_total", model="gpt-4o-mini", upstream="fake", status_class="2xx"
            )
            == 1
        )
    finally:
        await runner.cleanup()


async def test_each_app_has_its_own_registry(make_proxy: MakeProxy) -> None:
    first = await make_proxy()
    second = await make_proxy()
    assert await post(first, "gpt-4o-mini") == 200
    await asyncio.gather(post(second, "gpt-4o-mini"), post(second, "gpt-4o-mini"))
    one, two = await scrape(first), await scrape(second)
    labels = {"model": "gpt-4o-mini", "upstream": "fake", "status_class": "2xx"}
    assert value(one, "oaimux_requests_total", **labels) == 1
    assert value(two, "oaimux_requests_total", **labels) == 2
