"""The access log: one line per request, written when the response ends.

Each test drives the real proxy in front of a real in-process upstream and
reads the lines the ``oaimux.access`` logger wrote.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import MakeProxy, basic_config
from tests.fakes.access_lines import LogLines, capture_logs, parse_text_line
from tests.fakes.openai_shaped import CHAT_USAGE, STREAM_USAGE, OpenAIShaped
from tests.fakes.upstream import FakeUpstream

CHAT = "/v1/chat/completions"
FIELDS = [
    "time", "request_id", "client", "key", "method", "path", "model", "target", "upstream",
    "tried", "status", "bytes_in", "bytes_out", "ttfb_ms", "duration_ms", "outcome", "error",
    "prompt_tokens", "completion_tokens", "cache_read_tokens", "cache_creation_tokens",
    "reserved_tokens", "charged_tokens",
]  # fmt: skip


@pytest.fixture
def logs() -> Iterator[LogLines]:
    with capture_logs() as lines:
        yield lines


def chat(model: str, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
        **extra,
    }


async def test_normal_request_line(make_proxy: MakeProxy, logs: LogLines) -> None:
    client = await make_proxy()
    body = json.dumps(chat("fast")).encode()
    resp = await client.post(CHAT, data=body, headers={"Content-Type": "application/json"})
    answer = await resp.read()
    assert resp.status == 200
    (line,) = await logs.wait_for(1)
    f = parse_text_line(line)
    assert list(f) == FIELDS
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", f["time"])
    assert f["request_id"] == resp.headers["x-oaimux-request-id"]
    assert f["client"] == "127.0.0.1"
    assert f["key"] == "-"
    assert (f["method"], f["path"]) == ("POST", CHAT)
    assert (f["model"], f["target"], f["upstream"], f["tried"]) == (
        "fast",
        "llama3.2:3b",
        "fake",
        "-",
    )
    assert f["status"] == "200"
    assert int(f["bytes_in"]) == len(body)
    assert int(f["bytes_out"]) == len(answer)
    assert 0 < float(f["ttfb_ms"]) <= float(f["duration_ms"])
    assert (f["outcome"], f["error"]) == ("complete", "-")
    # The fake upstream's JSON reports usage 5 + 1.
    assert (f["prompt_tokens"], f["completion_tokens"]) == ("5", "1")


async def test_streamed_request_is_logged_when_the_stream_ends(
    make_proxy: MakeProxy, fake: FakeUpstream, logs: LogLines
) -> None:
    fake.gated = True
    client = await make_proxy()
    resp = await client.post(CHAT, json=chat("gpt-4o-mini", stream=True))
    fake.gate(0).set()
    received = await resp.content.readany()
    assert received.startswith(b"data: ")
    assert logs.access == []  # mid-stream: nothing logged yet
    for i in range(1, fake.sse_chunks + 1):
        fake.gate(i).set()
    received += await resp.content.read()
    assert received.endswith(b"data: [DONE]\n\n")
    (line,) = await logs.wait_for(1)
    f = parse_text_line(line)
    assert (f["status"], f["outcome"], f["upstream"]) == ("200", "complete", "fake")
    assert int(f["bytes_out"]) == len(received)
    assert float(f["ttfb_ms"]) < float(f["duration_ms"])
    # No include_usage was asked: the stream carries no usage.
    assert (f["prompt_tokens"], f["completion_tokens"]) == ("-", "-")


async def test_client_abort_mid_stream_is_logged_as_client_gone(
    make_proxy: MakeProxy, fake: FakeUpstream, logs: LogLines
) -> None:
    fake.gated = True
    client = await make_proxy()
    resp = await client.post(CHAT, json=chat("gpt-4o-mini", stream=True))
    fake.gate(0).set()
    first = await resp.content.readany()
    assert first
    resp.close()  # the client goes away with the stream half done
    async with asyncio.timeout(10):
        await fake.upstream_closed.wait()
    (line,) = await logs.wait_for(1)
    f = parse_text_line(line)
    assert (f["status"], f["outcome"], f["upstream"]) == ("200", "client_gone", "fake")
    assert int(f["bytes_out"]) >= len(first)
    assert f["ttfb_ms"] != "-"


async def test_client_gone_before_the_response_started(
    make_proxy: MakeProxy, fake: FakeUpstream, upstream_url: str, logs: LogLines
) -> None:
    config = basic_config(upstream_url)
    config["routes"].append({"path": "slow", "upstream": "fake"})
    client = await make_proxy(config)
    task = asyncio.ensure_future(client.get("/v1/slow"))
    async with asyncio.timeout(10):
        await fake.handler_started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (line,) = await logs.wait_for(1)
    f = parse_text_line(line)
    # Nothing was sent: logged with nginx's 499, "client closed request".
    assert (f["status"], f["outcome"], f["upstream"], f["ttfb_ms"]) == (
        "499",
        "client_gone",
        "-",
        "-",
    )
    assert f["tried"] == "fake"


async def test_failed_requests(
    make_proxy: MakeProxy, fake: FakeUpstream, upstream_url: str, logs: LogLines
) -> None:
    config = basic_config(upstream_url)
    config["upstreams"]["down"] = {"url": "http://127.0.0.1:9/v1"}  # discard port: refused
    config["routes"].append({"model": "broken", "upstream": "down"})
    client = await make_proxy(config)

    resp = await client.post(CHAT, json=chat("no-such-model"))
    assert resp.status == 404
    resp = await client.post(CHAT, json=chat("broken"))
    assert resp.status == 502
    fake.status_override = 503
    resp = await client.post(CHAT, json=chat("gpt-4o-mini"))
    assert resp.status == 503
    resp = await client.post(CHAT, data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status == 400

    lines = [parse_text_line(line) for line in await logs.wait_for(4)]
    unknown, unreachable, upstream_503, bad_json = lines
    assert (unknown["status"], unknown["outcome"], unknown["error"]) == (
        "404",
        "error",
        "model_not_found",
    )
    assert (unknown["model"], unknown["upstream"], unknown["target"]) == ("no-such-model", "-", "-")
    assert (unreachable["status"], unreachable["outcome"]) == ("502", "error")
    assert (unreachable["error"], unreachable["tried"], unreachable["upstream"]) == (
        "upstream_unavailable",
        "down",
        "-",
    )
    # The upstream's own error is relayed as it came: the exchange itself completed.
    assert (upstream_503["status"], upstream_503["outcome"], upstream_503["upstream"]) == (
        "503",
        "complete",
        "fake",
    )
    assert (bad_json["status"], bad_json["outcome"], bad_json["model"]) == ("400", "error", "-")
    for f in lines:
        assert int(f["bytes_out"]) > 0 and f["duration_ms"] != "-"


async def _mid_body_failure(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b'data: {"choices":[]}\n\n')
    if request.path.endswith("/reset"):
        assert request.transport is not None
        request.transport.abort()
        return resp
    await asyncio.Event().wait()  # silent until the proxy gives up and closes
    return resp


@pytest.mark.parametrize(
    ("path", "outcome"), [("reset", "upstream_reset"), ("silent", "idle_timeout")]
)
async def test_upstream_failing_mid_body(
    make_proxy: MakeProxy, aiohttp_server: Any, logs: LogLines, path: str, outcome: str
) -> None:
    app = web.Application()
    app.router.add_get("/v1/{tail:.*}", _mid_body_failure)
    upstream: TestServer = await aiohttp_server(app)
    config = {
        "upstreams": {"u": {"url": str(upstream.make_url("/v1")), "timeouts": {"idle": 0.3}}},
        "routes": [{"path": "*", "upstream": "u"}],
    }
    client = await make_proxy(config)
    resp = await client.get(f"/v1/{path}")
    assert resp.status == 200
    with pytest.raises(Exception):  # noqa: B017 - aborted: the client library raises
        await resp.read()
    (line,) = await logs.wait_for(1)
    f = parse_text_line(line)
    assert (f["status"], f["outcome"], f["upstream"]) == ("200", outcome, "u")
    assert int(f["bytes_out"]) == len(b'data: {"choices":[]}\n\n')


async def test_own_endpoints_are_logged_probes_and_scrapes_are_not(
    make_proxy: MakeProxy, logs: LogLines
) -> None:
    client = await make_proxy()
    for path in (
        "/v1/models",
        "/about",
        "/v1/models/gpt-4o-mini",
        "/healthz",
        "/metrics",
        "/v1/models/nope",
    ):
        resp = await client.get(path)
        await resp.read()
    resp = await client.post(CHAT, json=chat("gpt-4o-mini"))
    await resp.read()
    lines = [parse_text_line(line) for line in await logs.wait_for(5)]
    assert [(f["path"], f["status"]) for f in lines] == [
        ("/v1/models", "200"),
        ("/about", "200"),
        ("/v1/models/gpt-4o-mini", "200"),
        ("/v1/models/nope", "404"),
        (CHAT, "200"),
    ]
    assert all(f["client"] == "127.0.0.1" for f in lines)
    assert lines[3]["outcome"] == "error" and lines[3]["error"] == "model_not_found"


async def test_exactly_one_line_per_request(
    make_proxy: MakeProxy, fake: FakeUpstream, logs: LogLines
) -> None:
    client = await make_proxy()
    requests = [
        ("POST", CHAT, chat("gpt-4o-mini")),
        ("POST", CHAT, chat("gpt-4o-mini", stream=True)),
        ("POST", CHAT, chat("meta-llama/Llama-3-8b")),
        ("POST", CHAT, chat("unknown")),
        ("GET", "/v1/models", None),
        ("GET", "/v1/chat/completions", None),
        ("DELETE", "/v1/nothing/here", None),
    ]
    for method, path, body in requests:
        resp = await client.request(method, path, json=body)
        await resp.read()
    lines = await logs.wait_for(len(requests))
    # Mark the end with one more; then no line may be missing or doubled.
    resp = await client.get("/about")
    await resp.read()
    lines = await logs.wait_for(len(requests) + 1)
    assert len(lines) == len(requests) + 1
    ids = [parse_text_line(line)["request_id"] for line in lines]
    assert len(set(ids)) == len(ids)


async def test_json_format(make_proxy: MakeProxy, logs: LogLines) -> None:
    client = await make_proxy(log={"format": "json"})
    resp = await client.post(CHAT, json=chat("fast"))
    await resp.read()
    resp = await client.post(CHAT, json=chat('nope "x=1" \\'))
    await resp.read()
    ok, failed = (json.loads(line) for line in await logs.wait_for(2))
    assert list(ok) == FIELDS
    assert ok["status"] == 200 and ok["bytes_out"] > 0 and isinstance(ok["duration_ms"], float)
    assert (ok["model"], ok["target"], ok["upstream"], ok["tried"]) == (
        "fast",
        "llama3.2:3b",
        "fake",
        [],
    )
    assert (ok["prompt_tokens"], ok["completion_tokens"], ok["key"], ok["error"]) == (
        5,
        1,
        None,
        None,
    )
    assert (failed["status"], failed["model"], failed["upstream"]) == (404, 'nope "x=1" \\', None)


async def test_client_strings_cannot_forge_fields(make_proxy: MakeProxy, logs: LogLines) -> None:
    client = await make_proxy()
    forged = 'x status=200 outcome=complete request_id=forged "quoted" \\ é ' + "y" * 190
    resp = await client.post(CHAT, json=chat(forged))
    assert resp.status == 404
    # A control character: refused as an invalid model (400) or unknown (404);
    # either way the line stays one line.
    resp = await client.post(CHAT, json=chat("two\nlines"))
    assert resp.status in (400, 404)
    forged_line, control_line = await logs.wait_for(2)
    f = parse_text_line(forged_line)  # one line, every pair intact
    assert (f["status"], f["outcome"]) == ("404", "error")
    assert f["request_id"] != "forged"
    assert f["model"] == forged[:200] + "..."
    assert parse_text_line(control_line)["model"] in ("-", "two\nlines")


async def test_proxy_key_name_is_logged_never_the_key(
    make_proxy: MakeProxy, upstream_url: str, logs: LogLines
) -> None:
    config = basic_config(
        upstream_url, auth={"keys": [{"name": "team-a", "key": "sk-proxy-team-a-0123456789"}]}
    )
    client = await make_proxy(config)
    resp = await client.post(
        CHAT,
        json=chat("gpt-4o-mini"),
        headers={"Authorization": "Bearer sk-proxy-team-a-0123456789"},
    )
    assert resp.status == 200
    (line,) = await logs.wait_for(1)
    assert parse_text_line(line)["key"] == "team-a"
    assert "sk-proxy-team-a" not in line


# -- request ids -----------------------------------------------------------------


async def test_sane_client_request_id_is_used_everywhere(
    make_proxy: MakeProxy, fake: FakeUpstream, logs: LogLines
) -> None:
    client = await make_proxy()
    resp = await client.post(
        CHAT, json=chat("gpt-4o-mini"), headers={"X-Request-Id": "client-id.42"}
    )
    await resp.read()
    assert fake.last.headers["x-request-id"] == "client-id.42"
    # The fake upstream sends no id of its own: ours is in both headers.
    assert resp.headers["x-oaimux-request-id"] == "client-id.42"
    assert resp.headers["x-request-id"] == "client-id.42"
    (line,) = await logs.wait_for(1)
    assert parse_text_line(line)["request_id"] == "client-id.42"


@pytest.mark.parametrize("given", ["has space", "x" * 129, "new\\line", "", "ünï"])
async def test_unsafe_client_request_id_is_replaced(
    make_proxy: MakeProxy, fake: FakeUpstream, given: str
) -> None:
    client = await make_proxy()
    resp = await client.post(CHAT, json=chat("gpt-4o-mini"), headers={"X-Request-Id": given})
    await resp.read()
    ours = resp.headers["x-oaimux-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", ours)
    assert fake.last.headers["x-request-id"] == ours


async def test_upstream_request_id_reaches_the_client_unchanged(
    make_proxy: MakeProxy, aiohttp_server: Any, logs: LogLines
) -> None:
    shaped = OpenAIShaped()
    upstream: TestServer = await aiohttp_server(shaped.app())
    client = await make_proxy(
        {
            "upstreams": {"openai": {"url": str(upstream.make_url("/v1"))}},
            "routes": [{"model": "gpt-*", "upstream": "openai"}],
        }
    )
    resp = await client.post(CHAT, json=chat("gpt-4o"), headers={"X-Request-Id": "mine-1"})
    await resp.read()
    assert resp.headers["x-request-id"] == "req_1"  # the upstream's, for its support desk
    assert resp.headers["x-oaimux-request-id"] == "mine-1"  # ours, as in our log
    assert shaped.request_ids == ["mine-1"]
    (line,) = await logs.wait_for(1)
    f = parse_text_line(line)
    assert f["request_id"] == "mine-1"
    assert (f["prompt_tokens"], f["completion_tokens"]) == tuple(map(str, CHAT_USAGE))


async def test_error_answers_carry_our_request_id(make_proxy: MakeProxy) -> None:
    client = await make_proxy()
    resp = await client.post(CHAT, json=chat("unknown"), headers={"X-Request-Id": "err-7"})
    assert resp.status == 404
    assert resp.headers["x-oaimux-request-id"] == resp.headers["x-request-id"] == "err-7"
    resp = await client.get("/v1/models", headers={"X-Request-Id": "list-8"})
    assert resp.headers["x-oaimux-request-id"] == resp.headers["x-request-id"] == "list-8"
    # An error of the proxy's own endpoints (Observer.observed) too.
    resp = await client.get("/v1/models/unknown", headers={"X-Request-Id": "own-9"})
    assert resp.status == 404
    assert resp.headers["x-oaimux-request-id"] == resp.headers["x-request-id"] == "own-9"


async def test_stream_usage_from_the_official_sdk(
    make_proxy: MakeProxy, aiohttp_server: Any, logs: LogLines
) -> None:
    openai = pytest.importorskip("openai")
    shaped = OpenAIShaped()
    upstream: TestServer = await aiohttp_server(shaped.app())
    client = await make_proxy(
        {
            "upstreams": {"openai": {"url": str(upstream.make_url("/v1"))}},
            "routes": [{"model": "gpt-*", "upstream": "openai"}],
        }
    )
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
    try:
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == STREAM_USAGE[0]
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        assert all(chunk.usage is None for chunk in [c async for c in stream])
    finally:
        await sdk.close()
    with_usage, without = (parse_text_line(line) for line in await logs.wait_for(2))
    assert (with_usage["prompt_tokens"], with_usage["completion_tokens"]) == tuple(
        map(str, STREAM_USAGE)
    )
    assert (without["prompt_tokens"], without["completion_tokens"]) == ("-", "-")
    assert with_usage["outcome"] == without["outcome"] == "complete"
