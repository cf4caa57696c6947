"""Choosing an upstream: fallback lists, weighted balance, circuit breakers and
retries, each against real fault servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import aiohttp
import pytest

from proxy.server.keys import HEALTH
from tests.faults import fixtures
from tests.faults.fixtures import (
    JSON,
    AccessLog,
    FaultFactory,
    chat_body,
    route_config,
)
from tests.faults.server import (
    Behaviour,
    blackhole,
    chat_json,
    closed_port,
    garbage,
    gated,
    hang,
    reset,
    respond,
    sse,
    status,
)

# The shared fixtures, bound here so pytest finds them.
access_log = fixtures.access_log
faults = fixtures.faults


def bounded(seconds: float = 10.0) -> asyncio.Timeout:
    """A regression that hangs fails the test instead of stalling the suite."""
    return asyncio.timeout(seconds)


FAST = {"connect": 0.5, "response": 0.5, "idle": 0.5}


def ok(text: str) -> Behaviour:
    return respond(200, chat_json(text))


async def answer(resp: aiohttp.ClientResponse) -> str:
    data = await resp.json()
    return str(data["choices"][0]["message"]["content"])


async def post(client: Any, rid: str = "r", body: bytes | None = None) -> aiohttp.ClientResponse:
    resp: aiohttp.ClientResponse = await client.post(
        "/v1/chat/completions",
        data=body if body is not None else chat_body(),
        headers={**JSON, "X-Request-Id": rid},
    )
    return resp


@pytest.mark.parametrize(
    "failure",
    [status(429), status(500), status(502), status(503), garbage(), reset()],
    ids=["429", "500", "502", "503", "garbage", "reset"],
)
async def test_fallback_list_moves_on_before_any_byte(
    make_proxy: Any, faults: FaultFactory, access_log: AccessLog, failure: Behaviour
) -> None:
    a = await faults(failure)
    b = await faults(ok("from b"))
    c = await faults(ok("from c"))
    client = await make_proxy(route_config({"a": a.url, "b": b.url, "c": c.url}, ["a", "b", "c"]))
    resp = await post(client, "fb")
    assert resp.status == 200
    assert await answer(resp) == "from b"
    assert (len(a.requests), len(b.requests), len(c.requests)) == (1, 1, 0)
    record = await access_log.wait_for("fb")
    assert record["upstream"] == "b" and record["tried"] == ["a"]


async def test_fallback_on_refused_connection(make_proxy: Any, faults: FaultFactory) -> None:
    b = await faults(ok("from b"))
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    client = await make_proxy(route_config({"a": dead, "b": b.url}, ["a", "b"]))
    resp = await post(client)
    assert await answer(resp) == "from b"


async def test_connect_timeout_moves_on(make_proxy: Any, faults: FaultFactory) -> None:
    """A connect timeout is not a response timeout: the request never got
    there, so moving on is safe even without fallback_on_timeout."""
    b = await faults(ok("from b"))
    with blackhole() as port:
        upstreams: dict[str, str | dict[str, Any]] = {
            "a": {
                "url": f"http://127.0.0.1:{port}/v1",
                "timeouts": {"connect": 0.3, "response": 5},
            },
            "b": b.url,
        }
        client = await make_proxy(route_config(upstreams, ["a", "b"]))
        resp = await post(client)
        assert resp.status == 200
        assert await answer(resp) == "from b"


async def test_connect_timeout_alone_is_502(make_proxy: Any) -> None:
    with blackhole() as port:
        upstreams: dict[str, str | dict[str, Any]] = {
            "a": {"url": f"http://127.0.0.1:{port}/v1", "timeouts": {"connect": 0.3}}
        }
        client = await make_proxy(route_config(upstreams, "a"))
        resp = await post(client)
        assert resp.status == 502
        assert (await resp.json())["error"]["code"] == "upstream_unavailable"


async def test_no_fallback_once_the_response_started(make_proxy: Any, faults: FaultFactory) -> None:
    a = await faults(sse(2, end="reset"))
    b = await faults(ok("from b"))
    client = await make_proxy(route_config({"a": a.url, "b": b.url}, ["a", "b"]))
    resp = await post(client, body=chat_body(stream=True))
    assert resp.status == 200
    async with bounded():
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert b.requests == []


async def test_response_timeout_does_not_move_on_by_default(
    make_proxy: Any, faults: FaultFactory
) -> None:
    a = await faults(hang())
    b = await faults(ok("from b"))
    config = route_config({"a": {"url": a.url, "timeouts": FAST}, "b": b.url}, ["a", "b"])
    client = await make_proxy(config)
    resp = await post(client)
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "upstream_timeout"
    assert b.requests == []  # it may be generating at a: never run it twice unasked
    async with asyncio.timeout(5):
        await a.connections[0].peer_closed.wait()  # and a's request was closed


async def test_response_timeout_moves_on_when_the_route_opts_in(
    make_proxy: Any, faults: FaultFactory
) -> None:
    a = await faults(hang())
    b = await faults(ok("from b"))
    upstreams: dict[str, str | dict[str, Any]] = {
        "a": {"url": a.url, "timeouts": FAST, "retries": {"attempts": 3, "backoff": 0}},
        "b": b.url,
    }
    client = await make_proxy(route_config(upstreams, ["a", "b"], fallback_on_timeout=True))
    resp = await post(client)
    assert await answer(resp) == "from b"
    assert len(a.requests) == 1  # a timeout is never retried on the same upstream


async def test_last_upstream_error_is_relayed(make_proxy: Any, faults: FaultFactory) -> None:
    a = await faults(status(503))
    b = await faults(status(500))
    client = await make_proxy(route_config({"a": a.url, "b": b.url}, ["a", "b"]))
    resp = await post(client)
    assert resp.status == 500
    assert (await resp.json())["error"]["message"] == "fault 500"


async def test_every_upstream_unreachable_is_502(make_proxy: Any) -> None:
    ports = {n: closed_port() for n in "ab"}
    dead = {n: f"http://127.0.0.1:{port}/v1" for n, port in ports.items()}
    client = await make_proxy(route_config(dict(dead), ["a", "b"]))
    resp = await post(client)
    assert resp.status == 502
    body = await resp.json()
    assert body["error"]["code"] == "upstream_unavailable"
    assert body["error"]["message"] == (
        f"No upstream could answer: a: connection refused at 127.0.0.1:{ports['a']}; "
        f"b: connection refused at 127.0.0.1:{ports['b']}."
    )


async def test_balance_spreads_by_weight(make_proxy: Any, faults: FaultFactory) -> None:
    a = await faults(default=ok("a"))
    b = await faults(default=ok("b"))
    config = route_config(
        {"a": a.url, "b": b.url},
        {"balance": [{"name": "a", "weight": 3}, {"name": "b", "weight": 1}]},
    )
    client = await make_proxy(config)
    random.seed(20261122)  # the draw uses the module's generator: make the count repeatable
    n = 400
    served: Counter[str] = Counter()
    for _ in range(n):
        served[await answer(await post(client))] += 1
    # Binomial(400, 0.75): sd ~ 8.7; 5 sd either side.
    assert abs(served["a"] - 300) < 44, served
    assert served["a"] + served["b"] == n


async def test_balance_falls_back_to_the_others(make_proxy: Any, faults: FaultFactory) -> None:
    b = await faults(default=ok("b"))
    config = route_config(
        {"a": f"http://127.0.0.1:{closed_port()}/v1", "b": b.url},
        {"balance": [{"name": "a", "weight": 99}, {"name": "b", "weight": 1}]},
    )
    client = await make_proxy(config)
    for _ in range(20):
        assert await answer(await post(client)) == "b"


async def test_breaker_skips_an_open_upstream_then_probes_once(
    make_proxy: Any, faults: FaultFactory, access_log: AccessLog
) -> None:
    a = await faults(default=status(500))
    b = await faults(default=ok("b"))
    upstreams: dict[str, str | dict[str, Any]] = {
        "a": {"url": a.url, "circuit_breaker": {"failures": 2, "cooldown": 30}},
        "b": b.url,
    }
    client = await make_proxy(route_config(upstreams, ["a", "b"]))
    health = client.app[HEALTH]
    now = [1000.0]
    health.clock = lambda: now[0]
    for _ in range(2):
        assert await answer(await post(client)) == "b"
    assert len(a.requests) == 2
    for i in range(5):  # open: a is not even tried
        resp = await post(client, f"open{i}")
        assert await answer(resp) == "b"
    assert len(a.requests) == 2
    assert (await access_log.wait_for("open4"))["tried"] == []
    now[0] += 30  # cool-down over: one probe, which fails and re-opens
    assert await answer(await post(client)) == "b"
    assert len(a.requests) == 3
    assert await answer(await post(client)) == "b"
    assert len(a.requests) == 3
    now[0] += 30  # next probe succeeds: a is back in service
    a.default = ok("a")
    assert await answer(await post(client)) == "a"
    assert await answer(await post(client)) == "a"
    assert len(a.requests) == 5


async def test_half_open_admits_one_probe_under_concurrency(
    make_proxy: Any, faults: FaultFactory
) -> None:
    a = await faults(status(500))
    upstreams: dict[str, str | dict[str, Any]] = {
        "a": {"url": a.url, "circuit_breaker": {"failures": 1, "cooldown": 30}},
    }
    client = await make_proxy(route_config(upstreams, "a"))
    health = client.app[HEALTH]
    now = [1000.0]
    health.clock = lambda: now[0]
    assert (await post(client)).status == 500  # the last upstream's answer, relayed
    resp = await post(client)
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "upstream_circuit_open"
    assert resp.headers["Retry-After"] == "30"
    now[0] += 30
    release = asyncio.Event()
    a.then(gated(release, ok("probe")))  # the probe: the upstream thinks
    probe = asyncio.ensure_future(post(client, "probe"))
    await a.wait_requests(2)
    others = await asyncio.gather(*(post(client, f"c{i}") for i in range(10)))
    assert [r.status for r in others] == [503] * 10  # the probe is out; nobody else
    assert len(a.requests) == 2
    release.set()
    assert await answer(await probe) == "probe"
    a.default = ok("a")
    assert (await post(client)).status == 200  # the probe's success closed it


async def test_retries_resend_identical_bytes(make_proxy: Any, faults: FaultFactory) -> None:
    a = await faults(status(503), reset(), garbage(), ok("third time"))
    upstreams: dict[str, str | dict[str, Any]] = {
        "a": {"url": a.url, "retries": {"attempts": 3, "backoff": 0.01}},
    }
    client = await make_proxy(route_config(upstreams, "a"))
    body = chat_body(filler="é" * 5000)
    resp = await post(client, body=body)
    assert await answer(resp) == "third time"
    assert len(a.requests) == 4
    assert all(r.body == body for r in a.requests)
    heads = {r.head for r in a.requests}
    assert len(heads) == 1  # same head each time too (same request id, same headers)


async def test_retries_are_bounded_then_fall_back(make_proxy: Any, faults: FaultFactory) -> None:
    a = await faults(default=status(502))
    b = await faults(default=ok("b"))
    upstreams: dict[str, str | dict[str, Any]] = {
        "a": {"url": a.url, "retries": {"attempts": 2, "backoff": 0.01}},
        "b": b.url,
    }
    client = await make_proxy(route_config(upstreams, ["a", "b"]))
    assert await answer(await post(client)) == "b"
    assert len(a.requests) == 3


async def test_429_is_not_retried_on_the_same_upstream(
    make_proxy: Any, faults: FaultFactory
) -> None:
    a = await faults(status(429, extra=[("Retry-After", "20")]), default=ok("a"))
    upstreams: dict[str, str | dict[str, Any]] = {
        "a": {"url": a.url, "retries": {"attempts": 3, "backoff": 0.01}},
    }
    client = await make_proxy(route_config(upstreams, "a"))
    resp = await post(client)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "20"
    assert len(a.requests) == 1


async def test_probe_is_claimed_only_for_the_upstream_tried(
    make_proxy: Any, faults: FaultFactory
) -> None:
    """Two half-open upstreams; the first answers. The second's probe must
    stay free, so it is tried the moment the first fails again."""
    a = await faults(status(500), ok("a"), status(500))
    b = await faults(status(500), ok("b"))
    breaker = {"failures": 1, "cooldown": 30}
    upstreams: dict[str, str | dict[str, Any]] = {
        "a": {"url": a.url, "circuit_breaker": breaker},
        "b": {"url": b.url, "circuit_breaker": breaker},
    }
    client = await make_proxy(route_config(upstreams, ["a", "b"]))
    health = client.app[HEALTH]
    now = [1000.0]
    health.clock = lambda: now[0]
    assert (await post(client)).status == 500  # both fail: both open
    now[0] += 30
    assert await answer(await post(client)) == "a"  # a's probe succeeds
    assert await answer(await post(client)) == "b"  # a fails again; b probes
    assert (len(a.requests), len(b.requests)) == (3, 2)
