"""Upstream faults, one per case, against the fault server: what the client
sees, what the access log says, and that nothing leaks (the upstream
connection is closed, not pooled; the proxy's tasks return to their count).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import tracemalloc
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import pytest

from tests.faults import fixtures
from tests.faults.fixtures import (
    JSON,
    AccessLog,
    FaultFactory,
    chat_body,
    route_config,
    task_count,
)
from tests.faults.server import (
    Behaviour,
    closed_port,
    garbage,
    hang,
    reset,
    short_body,
    sse,
    sse_event,
    status,
)

# The shared fixtures, bound here so pytest finds them.
access_log = fixtures.access_log
faults = fixtures.faults


def bounded(seconds: float = 10.0) -> asyncio.Timeout:
    """A regression that hangs fails the test instead of stalling the suite."""
    return asyncio.timeout(seconds)


FAST = {"timeouts": {"connect": 2, "response": 0.5, "idle": 0.5}}


@pytest.fixture(autouse=True)
def no_error_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A fault is the upstream's; the proxy logs a warning at most, never an
    error or a traceback ("Task exception was never retrieved" included)."""
    yield
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def settle_tasks(at_most: int, timeout: float = 5.0) -> None:
    """Wait (bounded) until the loop holds no more than ``at_most`` tasks."""
    async with asyncio.timeout(timeout):
        while task_count() > at_most:
            await asyncio.sleep(0.01)


async def read_stream(resp: aiohttp.ClientResponse) -> bytes:
    got = b""
    while chunk := await resp.content.readany():
        got += chunk
    return got


@pytest.mark.parametrize(
    ("name", "behaviour", "seen_before_error"),
    [
        ("reset after two events", sse(2, end="reset"), sse_event(0) + sse_event(1)),
        ("FIN without the last chunk", sse(2, end="fin"), sse_event(0) + sse_event(1)),
        ("Content-Length not reached", short_body(1000, 100), b"x" * 100),
    ],
)
async def test_body_ending_early_aborts_the_client(
    make_proxy: Any,
    faults: FaultFactory,
    access_log: AccessLog,
    name: str,
    behaviour: Behaviour,
    seen_before_error: bytes,
) -> None:
    upstream = await faults(behaviour)
    client = await make_proxy(route_config({"a": {"url": upstream.url, **FAST}}, "a"))
    before = task_count()
    resp = await client.post(
        "/v1/chat/completions",
        data=chat_body(stream=True),
        headers={**JSON, "X-Request-Id": "early-end"},
    )
    assert resp.status == 200
    got = b""
    async with bounded():
        with pytest.raises(aiohttp.ClientPayloadError):
            while chunk := await resp.content.readany():
                got += chunk
    # Everything the upstream sent was relayed, and nothing else (no error
    # event invented, no terminating chunk).
    assert got == seen_before_error
    record = await access_log.wait_for("early-end")
    assert record["outcome"] == "upstream_reset"
    assert record["bytes_out"] == len(seen_before_error)
    await upstream.wait_open(0)
    resp.release()
    await settle_tasks(before)


async def test_silence_mid_body_past_idle_aborts_and_closes_upstream(
    make_proxy: Any, faults: FaultFactory, access_log: AccessLog
) -> None:
    # Three events 0.2 s apart (each gap under the 0.5 s idle bound, so the
    # timer is re-armed per chunk, not only after the first), then silence.
    upstream = await faults(sse(3, gap=0.2, end="hang"))
    client = await make_proxy(route_config({"a": {"url": upstream.url, **FAST}}, "a"))
    before = task_count()
    resp = await client.post(
        "/v1/chat/completions",
        data=chat_body(stream=True),
        headers={**JSON, "X-Request-Id": "idle"},
    )
    got = b""
    async with bounded():
        with pytest.raises(aiohttp.ClientPayloadError):
            while chunk := await resp.content.readany():
                got += chunk
    assert got == b"".join(sse_event(i) for i in range(3))
    async with asyncio.timeout(5):
        await upstream.connections[0].peer_closed.wait()
    record = await access_log.wait_for("idle")
    assert record["outcome"] == "idle_timeout"
    await upstream.wait_open(0)
    resp.release()
    await settle_tasks(before)


@pytest.mark.parametrize(
    ("behaviour", "code"),
    [
        (garbage(), "upstream_unavailable"),
        (garbage(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n"), "upstream_unavailable"),
        (garbage(b"HTTP/1.1 200 OK\r\nX-Bad\x00: 1\r\nContent-Length: 0\r\n\r\n"), None),
        (reset(), "upstream_unavailable"),
        (hang(), "upstream_timeout"),
    ],
    ids=["not-http", "bad-content-length", "nul-in-header", "reset", "no-headers"],
)
async def test_failure_before_headers_is_a_clean_json_error(
    make_proxy: Any, faults: FaultFactory, behaviour: Behaviour, code: str | None
) -> None:
    upstream = await faults(behaviour)
    client = await make_proxy(route_config({"a": {"url": upstream.url, **FAST}}, "a"))
    await (await client.get("/healthz")).read()  # the keep-alive connection is open
    before = task_count()
    resp = await client.post("/v1/chat/completions", data=chat_body(), headers=JSON)
    if code is None:
        # aiohttp's parser may accept or refuse this one; either way the client
        # gets a complete HTTP answer, never a hang or a traceback.
        assert resp.status in (200, 502)
        await resp.read()
    else:
        assert resp.status == (504 if code == "upstream_timeout" else 502)
        body = await resp.json()
        assert body["error"]["code"] == code
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert resp.headers["x-oaimux-error"] == code
    await upstream.wait_open(0)
    await settle_tasks(before)


async def test_refused_connection_is_502(make_proxy: Any) -> None:
    client = await make_proxy(
        route_config({"a": {"url": f"http://127.0.0.1:{closed_port()}/v1", **FAST}}, "a")
    )
    resp = await client.post("/v1/chat/completions", data=chat_body(), headers=JSON)
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_unavailable"


@pytest.mark.parametrize("code", [429, 500, 502, 503])
async def test_error_status_passes_through_verbatim_when_nothing_else(
    make_proxy: Any, faults: FaultFactory, code: int
) -> None:
    upstream = await faults(status(code, extra=[("Retry-After", "7")]))
    client = await make_proxy(route_config({"a": upstream.url}, "a"))
    resp = await client.post("/v1/chat/completions", data=chat_body(), headers=JSON)
    assert resp.status == code
    assert (await resp.json())["error"]["message"] == f"fault {code}"
    assert resp.headers["Retry-After"] == "7"
    assert "x-oaimux-error" not in resp.headers  # the upstream's answer, not ours


async def test_client_gone_before_headers_closes_upstream(
    make_proxy: Any, faults: FaultFactory, access_log: AccessLog
) -> None:
    upstream = await faults(hang())
    client = await make_proxy(route_config({"a": upstream.url}, "a"))
    before = task_count()
    request = asyncio.ensure_future(
        client.post(
            "/v1/chat/completions",
            data=chat_body(),
            headers={**JSON, "X-Request-Id": "gone-early"},
        )
    )
    async with asyncio.timeout(5):
        await upstream.request_seen.wait()
    request.cancel()  # closes the client's connection to the proxy
    with pytest.raises(asyncio.CancelledError):
        await request
    async with asyncio.timeout(5):
        await upstream.connections[0].peer_closed.wait()
    record = await access_log.wait_for("gone-early")
    assert record["outcome"] == "client_gone"
    await upstream.wait_open(0)
    await settle_tasks(before)


async def test_client_gone_mid_stream_closes_upstream(
    make_proxy: Any, faults: FaultFactory, access_log: AccessLog
) -> None:
    upstream = await faults(sse(1, end="hang"))
    client = await make_proxy(route_config({"a": upstream.url}, "a"))
    before = task_count()
    resp = await client.post(
        "/v1/chat/completions",
        data=chat_body(stream=True),
        headers={**JSON, "X-Request-Id": "gone-mid"},
    )
    assert await resp.content.readuntil(b"\n\n") == sse_event(0)
    resp.close()  # the client goes away mid-stream
    async with asyncio.timeout(5):
        await upstream.connections[0].peer_closed.wait()
    record = await access_log.wait_for("gone-mid")
    assert record["outcome"] == "client_gone"
    await upstream.wait_open(0)
    await settle_tasks(before)


async def test_repeated_faults_leak_nothing(make_proxy: Any, faults: FaultFactory) -> None:
    """Fifty rounds of every mid-body fault: tasks and upstream connections
    return to where they were."""
    upstream = await faults()
    client = await make_proxy(route_config({"a": {"url": upstream.url, **FAST}}, "a"))
    resp = await client.post("/v1/chat/completions", data=chat_body(), headers=JSON)
    await resp.read()
    await upstream.wait_open(1)
    before = task_count()
    for _ in range(50):
        upstream.then(sse(1, end="reset"), sse(1, end="fin"), short_body(10, 5))
        for _ in range(3):
            resp = await client.post(
                "/v1/chat/completions", data=chat_body(stream=True), headers=JSON
            )
            async with bounded():
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
            resp.release()
    await upstream.wait_open(1)
    await settle_tasks(before)


@pytest.mark.parametrize("end", ["reset", "fin"])
async def test_openai_sdk_raises_on_a_broken_stream(
    make_proxy: Any, faults: FaultFactory, end: str
) -> None:
    upstream = await faults(sse(3, end="done"), sse(3, end=end))
    client = await make_proxy(route_config({"a": upstream.url}, "a"))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="sk-test", max_retries=0)
    try:
        # The control: a whole stream reads as whole.
        stream = await sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        assert text == "tok0 tok1 tok2 "
        # The fault: the SDK must raise, not hand back a truncated answer.
        stream = await sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        parts: list[str] = []
        with pytest.raises(openai.APIConnectionError):
            async for c in stream:
                parts.append(c.choices[0].delta.content or "")
        assert parts == ["tok0 ", "tok1 ", "tok2 "]
    finally:
        await sdk.close()


async def test_openai_sdk_raises_on_a_short_json_body(
    make_proxy: Any, faults: FaultFactory
) -> None:
    body = json.dumps({"id": "x", "object": "chat.completion", "choices": []}).encode()
    upstream = await faults(short_body(len(body) + 50, len(body)))
    client = await make_proxy(route_config({"a": upstream.url}, "a"))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="sk-test", max_retries=0)
    try:
        with pytest.raises(openai.APIConnectionError):
            await sdk.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        await sdk.close()


async def test_memory_stays_flat_over_repeated_faults(
    make_proxy: Any, faults: FaultFactory
) -> None:
    """Two hundred broken streams and client departures after a warm-up: the
    memory Python holds grows by far less than a stream's worth each time."""
    upstream = await faults()
    proxy = await make_proxy(route_config({"a": {"url": upstream.url, **FAST}}, "a"))
    url = str(proxy.make_url("/v1/chat/completions"))
    body = chat_body(stream=True)

    # A plain session: aiohttp's TestClient keeps every response it made.
    async with aiohttp.ClientSession() as session:

        async def round_() -> None:
            upstream.then(sse(3, end="reset"), sse(1, end="hang"))
            async with session.post(url, data=body, headers=JSON) as resp:
                async with bounded():
                    with pytest.raises(aiohttp.ClientPayloadError):
                        await resp.read()
            async with session.post(url, data=body, headers=JSON) as resp:
                await resp.content.readuntil(b"\n\n")
                resp.close()  # the client leaves mid-stream
            await upstream.wait_open(0)
            upstream.connections.clear()  # the fault server's own records
            upstream.requests.clear()

        for _ in range(30):
            await round_()
        gc.collect()
        # pytest keeps every log record it captures; that is not ours to count.
        logging.disable(logging.CRITICAL)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(200):
                await round_()
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            logging.disable(logging.NOTSET)
    assert grown < 100 * 1024, f"{grown} bytes kept after 200 rounds"
