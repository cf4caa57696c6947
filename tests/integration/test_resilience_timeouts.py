"""Timeouts: connect, response (to headers) and idle (between body chunks).
There is no total timeout: a stream that keeps producing is never cut."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest

from proxy.config import Timeouts
from tests.faults import fixtures
from tests.faults.fixtures import (
    JSON,
    FaultFactory,
    chat_body,
    route_config,
)
from tests.faults.server import chat_json, delayed, respond, sse, sse_event

# The shared fixtures, bound here so pytest finds them.
faults = fixtures.faults


def bounded(seconds: float = 10.0) -> asyncio.Timeout:
    """A regression that hangs fails the test instead of stalling the suite."""
    return asyncio.timeout(seconds)


def test_documented_defaults() -> None:
    assert Timeouts() == Timeouts(connect=10.0, response=600.0, idle=300.0)


async def test_a_stream_longer_than_response_plus_idle_is_not_cut(
    make_proxy: Any, faults: FaultFactory
) -> None:
    upstream = await faults(sse(15, gap=0.1))  # ~1.4 s, more than 0.3 + 0.3
    config = route_config(
        {"a": {"url": upstream.url, "timeouts": {"response": 0.3, "idle": 0.3}}}, "a"
    )
    client = await make_proxy(config)
    resp = await client.post("/v1/chat/completions", data=chat_body(stream=True), headers=JSON)
    assert resp.status == 200
    body = await resp.read()
    assert body == b"".join(sse_event(i) for i in range(15)) + b"data: [DONE]\n\n"


async def test_idle_timer_does_not_outlive_its_response_on_a_pooled_connection(
    make_proxy: Any, faults: FaultFactory
) -> None:
    """A small body arrives whole with its headers. Had the idle timer been
    armed then, it would fire later on the pooled connection and fail the next
    request while that one waits (legitimately) for its headers."""
    upstream = await faults(respond(200, chat_json("one")), delayed(0.8, respond(200, chat_json())))
    config = route_config(
        {"a": {"url": upstream.url, "timeouts": {"response": 5, "idle": 0.3}}}, "a"
    )
    client = await make_proxy(config)
    first = await client.post("/v1/chat/completions", data=chat_body(), headers=JSON)
    assert first.status == 200
    await first.read()
    second = await client.post("/v1/chat/completions", data=chat_body(), headers=JSON)
    assert second.status == 200, await second.text()
    assert len(upstream.connections) == 1  # the same pooled connection carried both


async def test_a_slow_client_is_not_upstream_silence(make_proxy: Any, faults: FaultFactory) -> None:
    """The client stops reading for longer than the idle bound while the
    upstream has sent everything: back-pressure pauses the upstream read, and
    a paused read is not silence, so the body arrives whole."""
    payload = hashlib.sha256(b"x").digest() * (32 * 1024 * 1024 // 32)  # 32 MiB
    upstream = await faults(respond(200, payload, content_type="application/octet-stream"))
    config = route_config(
        {"a": {"url": upstream.url, "timeouts": {"response": 5, "idle": 0.3}}}, "a"
    )
    client = await make_proxy(config)
    resp = await client.post("/v1/chat/completions", data=chat_body(), headers=JSON)
    assert resp.status == 200
    await asyncio.sleep(1.0)  # the slow client under test: not reading at all
    assert await resp.read() == payload


@pytest.mark.parametrize("events", [1, 4])
async def test_silence_after_the_nth_chunk_is_cut_at_idle(
    make_proxy: Any, faults: FaultFactory, events: int
) -> None:
    """The idle bound holds for every gap, not just the one after the headers."""
    import aiohttp

    upstream = await faults(sse(events, gap=0.15, end="hang"))
    config = route_config(
        {"a": {"url": upstream.url, "timeouts": {"response": 5, "idle": 0.4}}}, "a"
    )
    client = await make_proxy(config)
    resp = await client.post("/v1/chat/completions", data=chat_body(stream=True), headers=JSON)
    got = b""
    async with bounded():
        with pytest.raises(aiohttp.ClientPayloadError):
            while chunk := await resp.content.readany():
                got += chunk
    assert got == b"".join(sse_event(i) for i in range(events))
    async with asyncio.timeout(5):
        await upstream.connections[0].peer_closed.wait()
