"""The Responses API over a WebSocket (``GET /v1/responses``), through the proxy
(README, "Codex CLI").

aiohttp's WebSocket client on one side, the Responses fake
(tests/fakes/openai_responses.py) on the other: real sockets, nothing mocked.
The session is routed by the model of its first message; every later message
goes to the same upstream connection.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient, TestServer

from proxy.config import ConfigError, parse_settings
from proxy.outbound.tunnel import CLOSE_TIMEOUT
from tests.conftest import serve_proxy
from tests.fakes.access_lines import capture_logs, parse_text_line
from tests.fakes.openai_responses import OpenAIResponses

KEY_A = "sk-upstream-a-0001"
KEY_B = "sk-upstream-b-0001"
PROXY_KEY = "sk-proxy-ws-0001"
GPT_ONLY_KEY = "sk-proxy-gpt-only-0001"
BETA = "responses_websockets=2026-02-06"


@pytest.fixture
def a() -> OpenAIResponses:
    return OpenAIResponses(name="a", api_key=KEY_A)


@pytest.fixture
def b() -> OpenAIResponses:
    return OpenAIResponses(name="b", api_key=KEY_B)


@pytest.fixture
async def a_url(aiohttp_server: Any, a: OpenAIResponses) -> str:
    server: TestServer = await aiohttp_server(a.app())
    return str(server.make_url("/v1"))


@pytest.fixture
async def b_url(aiohttp_server: Any, b: OpenAIResponses) -> str:
    server: TestServer = await aiohttp_server(b.app())
    return str(server.make_url("/v1"))


def config(a_url: str, b_url: str, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "upstreams": {
            "a": {
                "url": a_url,
                "headers": {"set": {"Authorization": f"Bearer {KEY_A}"}},
                "responses_websocket": True,
            },
            "b": {
                "url": b_url,
                "headers": {"set": {"Authorization": f"Bearer {KEY_B}"}},
                "responses_websocket": True,
                "query": {"api-version": "2025-04-01-preview"},
            },
            "http-only": {"url": b_url},
            "down": {"url": "http://127.0.0.1:9/v1", "responses_websocket": True},
            "wrong-key": {
                "url": b_url,
                "headers": {"set": {"Authorization": "Bearer sk-wrong"}},
                "responses_websocket": True,
            },
        },
        "routes": [
            {"model": "gpt-a", "upstream": "a"},
            {"model": "gpt-b", "upstream": "b"},
            {"model": "fast", "upstream": "b", "rewrite_model": "gpt-b-large"},
            {"model": "gpt-local", "upstream": "http-only"},
            {"model": "gpt-mixed", "upstream": ["http-only", "b"]},
            {"model": "gpt-down", "upstream": "down"},
            {"model": "gpt-fallback", "upstream": ["down", "a"]},
            {"model": "gpt-refused", "upstream": "wrong-key"},
            {"model": "claude-x", "upstream": "a"},
            {"model": "codex-*", "upstream": "b"},
        ],
        "auth": {
            "keys": [
                {"name": "ws", "key": PROXY_KEY},
                {"name": "gpt-only", "key": GPT_ONLY_KEY, "models": ["gpt-*"]},
            ]
        },
    }
    cfg.update(extra)
    return cfg


@pytest.fixture
async def proxy(aiohttp_client: Any, a_url: str, b_url: str) -> TestClient[Any, Any]:
    return await serve_proxy(aiohttp_client, config(a_url, b_url))


async def connect(
    proxy: TestClient[Any, Any], key: str = PROXY_KEY, path: str = "/v1/responses", **kwargs: Any
) -> aiohttp.ClientWebSocketResponse[bool]:
    ws: aiohttp.ClientWebSocketResponse[bool] = await proxy.ws_connect(
        path, headers={"Authorization": f"Bearer {key}", "OpenAI-Beta": BETA}, **kwargs
    )
    return ws


def create(model: str | None, **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "response.create", "input": "say hi", "store": False}
    if model is not None:
        event["model"] = model
    return {**event, **fields}


async def turn(ws: aiohttp.ClientWebSocketResponse[bool], text: str) -> list[dict[str, Any]]:
    """Send one message; the events back, up to response.completed (or an error)."""
    await ws.send_str(text)
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while True:
            msg = await ws.receive()
            assert msg.type is WSMsgType.TEXT, msg
            events.append(json.loads(msg.data))
            if events[-1]["type"] in ("response.completed", "error"):
                return events


async def refused(
    ws: aiohttp.ClientWebSocketResponse[bool], text: str | bytes
) -> tuple[dict[str, Any], int]:
    """Send a first message that cannot be routed: the error event and the close code."""
    if isinstance(text, bytes):
        await ws.send_bytes(text)
    else:
        await ws.send_str(text)
    async with asyncio.timeout(10):
        msg = await ws.receive()
        assert msg.type is WSMsgType.TEXT, msg
        event = json.loads(msg.data)
        closing = await ws.receive()
    assert closing.type is WSMsgType.CLOSE, closing
    assert ws.close_code is not None
    return event, ws.close_code


# -- 426 ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/responses", "/responses"])
async def test_426_at_once_when_no_upstream_takes_the_websocket(
    aiohttp_client: Any, a_url: str, b: OpenAIResponses, b_url: str, path: str
) -> None:
    cfg = config(a_url, b_url)
    for upstream in cfg["upstreams"].values():
        upstream.pop("responses_websocket", None)
    proxy = await serve_proxy(aiohttp_client, cfg)
    with capture_logs() as logs:
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await connect(proxy, path=path)
        (line,) = await logs.wait_for(1)
    assert caught.value.status == 426
    assert caught.value.headers is not None
    assert caught.value.headers["x-oaimux-error"] == "websocket_not_supported"
    assert b.received == []
    assert "status=426" in line and "error=websocket_not_supported" in line
    # POST /v1/responses still works over HTTP.
    resp = await proxy.post(
        "/v1/responses",
        json={"model": "gpt-b", "input": "hi", "stream": False},
        headers={"Authorization": f"Bearer {PROXY_KEY}"},
    )
    assert resp.status == 200


async def test_a_plain_get_on_responses_is_not_an_upgrade(proxy: TestClient[Any, Any]) -> None:
    resp = await proxy.get("/v1/responses", headers={"Authorization": f"Bearer {PROXY_KEY}"})
    assert resp.status == 405


# -- routed by the first message ---------------------------------------------


async def test_routed_by_the_first_message_and_every_frame_to_one_upstream_connection(
    proxy: TestClient[Any, Any], a: OpenAIResponses, b: OpenAIResponses
) -> None:
    with capture_logs() as logs:
        ws = await connect(proxy)
        prewarm = await turn(ws, json.dumps(create("gpt-b", generate=False)))
        assert [e["type"] for e in prewarm] == [
            "response.created",
            "response.in_progress",
            "response.completed",
        ]
        first_id = prewarm[0]["response"]["id"]
        events = await turn(ws, json.dumps(create("gpt-b", previous_response_id=first_id)))
        text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert text == b.reply_text("gpt-b")
        await ws.close()
        (line,) = await logs.wait_for(1)
    assert a.received == [] and a.connections == []
    [conn] = b.connections  # one upstream connection: the chained turn found its prewarm
    assert [e["model"] for e in conn.events()] == ["gpt-b", "gpt-b"]
    headers = conn.handshake.headers
    assert headers["authorization"] == f"Bearer {KEY_B}"  # the upstream's key, never ours
    assert PROXY_KEY not in json.dumps(headers)
    assert headers["openai-beta"] == BETA
    assert conn.handshake.path == "/v1/responses"
    assert conn.handshake.query_string == "api-version=2025-04-01-preview"  # the upstream's query
    f = parse_text_line(line)
    assert (f["method"], f["path"], f["status"], f["model"], f["upstream"]) == (
        "GET", "/v1/responses", "101", "gpt-b", "b"
    )  # fmt: skip
    assert f["key"] == "ws" and f["outcome"] == "complete"


async def test_the_model_under_response_routes_too(
    proxy: TestClient[Any, Any], a: OpenAIResponses, b: OpenAIResponses
) -> None:
    ws = await connect(proxy)
    message = {"type": "response.create", "response": {"model": "gpt-a", "input": "hi"}}
    events = await turn(ws, json.dumps(message))
    assert events[-1]["type"] == "response.completed"
    await ws.close()
    assert b.connections == [] and len(a.connections) == 1


async def test_rewrite_model_changes_only_the_value_in_every_message(
    proxy: TestClient[Any, Any], b: OpenAIResponses
) -> None:
    """Codex repeats the model on every turn: an alias is rewritten in each."""
    ws = await connect(proxy)
    first = '{"type":"response.create",  "model" : "fast","input":"hi",\n"generate":false}'
    await turn(ws, first)
    later = r'{"type": "response.create", "input": "\u00e9 again", "model":"fast"}'
    await turn(ws, later)
    await ws.close()
    [conn] = b.connections
    rewritten = [m.replace('"fast"', '"gpt-b-large"') for m in (first, later)]
    assert conn.frames == rewritten


async def test_a_fallback_list_walks_to_an_upstream_that_answers(
    proxy: TestClient[Any, Any], a: OpenAIResponses
) -> None:
    ws = await connect(proxy)
    events = await turn(ws, json.dumps(create("gpt-fallback")))
    assert events[-1]["type"] == "response.completed"
    await ws.close()
    assert len(a.connections) == 1


async def test_only_the_routes_upstreams_that_take_the_websocket_are_tried(
    proxy: TestClient[Any, Any], b: OpenAIResponses
) -> None:
    ws = await connect(proxy)
    events = await turn(ws, json.dumps(create("gpt-mixed")))
    assert events[-1]["type"] == "response.completed"
    await ws.close()
    assert [r.method for r in b.received] == ["GET"]  # one handshake, to b as "b"
    assert b.connections[0].handshake.headers["authorization"] == f"Bearer {KEY_B}"


@pytest.mark.parametrize(
    ("last", "outcome"), [("a turn", "complete"), ("an error event", "client_gone")]
)
async def test_a_client_vanishing_after_a_finished_turn_is_complete(
    proxy: TestClient[Any, Any], b: OpenAIResponses, last: str, outcome: str
) -> None:
    """Codex drops the connection, no close frame, once it has response.completed."""
    with capture_logs() as logs:
        ws = await connect(proxy)
        events = await turn(ws, json.dumps(create("gpt-b")))
        assert events[-1]["type"] == "response.completed"
        if last == "an error event":
            events = await turn(ws, json.dumps({"type": "response.cancel"}))
            assert events[-1]["type"] == "error"
        sock = ws.get_extra_info("socket")
        sock.shutdown(socket.SHUT_RDWR)  # gone, without a close frame
        (line,) = await logs.wait_for(1)
        async with asyncio.timeout(10):
            await b.connections[0].closed.wait()  # the upstream leg was closed
        await ws.close()
    f = parse_text_line(line)
    assert (f["status"], f["outcome"]) == ("101", outcome)


# -- later messages ------------------------------------------------------------


async def test_later_messages_on_the_same_route_pass_byte_for_byte(
    proxy: TestClient[Any, Any], b: OpenAIResponses
) -> None:
    """Another model of the first one's route, no model, another event type:
    each reaches the same upstream connection exactly as sent."""
    ws = await connect(proxy, key=GPT_ONLY_KEY)
    await turn(ws, json.dumps(create("gpt-b", generate=False)))
    sent = [
        '{"model": "gpt-b",  "type":"response.create", "input": [ {"role":"user"} ]}',
        json.dumps(create(None, input="no model: the connection's")),
        json.dumps({"type": "response.cancel", "model": "claude-x"}),  # not a create
    ]
    for message in sent:
        await turn(ws, message)
    await ws.close()
    [conn] = b.connections
    assert conn.frames[1:] == sent


async def test_another_model_of_a_glob_route_passes(
    proxy: TestClient[Any, Any], b: OpenAIResponses
) -> None:
    ws = await connect(proxy)
    await turn(ws, json.dumps(create("codex-1")))
    events = await turn(ws, json.dumps(create("codex-2")))
    assert events[-1]["type"] == "response.completed"
    await ws.close()
    [conn] = b.connections
    assert [e["model"] for e in conn.events()] == ["codex-1", "codex-2"]


LATER = {
    "a model the key may not use": (GPT_ONLY_KEY, json.dumps(create("claude-x")), "model_not_allowed"),
    "the same behind an escaped type": (
        GPT_ONLY_KEY, r'{"type":"response\u002ecreate","model":"claude-x"}', "model_not_allowed"
    ),
    "the same under response": (
        GPT_ONLY_KEY, json.dumps({"type": "response.create", "response": {"model": "claude-x"}}),
        "model_not_allowed",
    ),
    "a model of another route": (PROXY_KEY, json.dumps(create("gpt-a")), "model_changes_route"),
    "an alias to the same upstream": (PROXY_KEY, json.dumps(create("fast")), "model_changes_route"),
    "an unknown model": (PROXY_KEY, json.dumps(create("gpt-unknown")), "model_not_found"),
    "not JSON": (PROXY_KEY, "response.create please", "invalid_json"),
    "a binary message": (GPT_ONLY_KEY, json.dumps(create("claude-x")).encode(), "model_not_allowed"),
}  # fmt: skip


@pytest.mark.parametrize("case", LATER)
async def test_a_later_message_that_may_not_go_there_ends_the_session_with_1008(
    proxy: TestClient[Any, Any], a: OpenAIResponses, b: OpenAIResponses, case: str
) -> None:
    key, message, code = LATER[case]
    with capture_logs() as logs:
        ws = await connect(proxy, key=key, autoclose=False)
        await turn(ws, json.dumps(create("gpt-b")))
        event, close_code = await refused(ws, message)
        [conn] = b.connections
        # The upstream leg is closed at once, not when the client has answered
        # the close frame (it has not yet) or the proxy gave up waiting for it.
        async with asyncio.timeout(CLOSE_TIMEOUT / 2):
            await conn.closed.wait()
        await ws.close()
        (line,) = await logs.wait_for(1)
    assert close_code == 1008
    assert event["type"] == "error" and event["error"]["code"] == code
    assert set(event) == {"type", "status", "error"}
    assert set(event["error"]) == {"type", "code", "message", "param"}
    assert len(conn.frames) == 1  # the refused message never reached the upstream
    assert a.received == []
    f = parse_text_line(line)
    assert (f["status"], f["outcome"], f["error"]) == ("101", "error", code)


# -- rate limits ----------------------------------------------------------------


def limited_config(a_url: str, b_url: str, **extra: Any) -> dict[str, Any]:
    """``gpt-limited`` (to b) has a bucket of its own: 2 requests, refilled slowly."""
    cfg = config(a_url, b_url, **extra)
    route = {"model": "gpt-limited", "upstream": "b", "rate_limit": {"requests_per_minute": 0.01, "burst": 2}}  # fmt: skip
    cfg["routes"].insert(0, route)
    return cfg


async def rate_limited(ws: aiohttp.ClientWebSocketResponse[bool], message: str) -> None:
    event, close_code = await refused(ws, message)
    assert close_code == 1008
    assert event["status"] == 429
    assert (event["error"]["type"], event["error"]["code"]) == ("requests", "rate_limit_exceeded")
    assert "Rate limit reached for requests to this model" in event["error"]["message"]


async def test_each_turn_is_charged_to_the_routes_own_bucket(
    aiohttp_client: Any, a_url: str, b_url: str, b: OpenAIResponses
) -> None:
    """The global bucket (1) pays the handshake; the route's (2) the turns."""
    cfg = limited_config(a_url, b_url, rate_limit={"requests_per_minute": 0.01, "burst": 1})
    proxy = await serve_proxy(aiohttp_client, cfg)
    ws = await connect(proxy)
    for _ in range(2):
        events = await turn(ws, json.dumps(create("gpt-limited")))
        assert events[-1]["type"] == "response.completed"
    await rate_limited(ws, json.dumps(create("gpt-limited")))
    [conn] = b.connections
    async with asyncio.timeout(10):
        await conn.closed.wait()
    assert len(conn.frames) == 2
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await connect(proxy)  # the global bucket is empty: refused before the upgrade
    assert caught.value.status == 429


async def test_a_first_message_to_a_route_with_an_empty_bucket_opens_nothing(
    aiohttp_client: Any, a_url: str, b_url: str, b: OpenAIResponses
) -> None:
    proxy = await serve_proxy(aiohttp_client, limited_config(a_url, b_url))
    for _ in range(2):
        ws = await connect(proxy)
        await turn(ws, json.dumps(create("gpt-limited")))
        await ws.close()
    ws = await connect(proxy)
    await rate_limited(ws, json.dumps(create("gpt-limited")))
    assert len(b.connections) == 2  # none opened for the refused one


async def test_each_turn_counts_against_the_keys_bucket_when_the_route_has_none(
    aiohttp_client: Any, a_url: str, b_url: str, b: OpenAIResponses
) -> None:
    """Key ``ws`` may make 3 requests: the handshake with its first message, then 2 turns."""
    cfg = config(a_url, b_url)
    cfg["auth"]["keys"][0]["rate_limit"] = {"requests_per_minute": 0.01, "burst": 3}
    proxy = await serve_proxy(aiohttp_client, cfg)
    ws = await connect(proxy)
    for _ in range(3):
        events = await turn(ws, json.dumps(create("gpt-b")))
        assert events[-1]["type"] == "response.completed"
    event, close_code = await refused(ws, json.dumps(create("gpt-b")))
    assert (event["status"], close_code) == (429, 1008)
    assert "Rate limit reached for requests:" in event["error"]["message"]
    assert len(b.connections[0].frames) == 3


# -- sessions that cannot go anywhere ----------------------------------------

POLICY = {
    "no model": (PROXY_KEY, json.dumps(create(None)), "missing_model"),
    "not JSON": (PROXY_KEY, "response.create please", "invalid_json"),
    "unknown model": (PROXY_KEY, json.dumps(create("gpt-unknown")), "model_not_found"),
    "a model the key may not use": (GPT_ONLY_KEY, json.dumps(create("claude-x")), "model_not_allowed"),
    "no upstream of the route takes it": (PROXY_KEY, json.dumps(create("gpt-local")), "websocket_not_supported"),
}  # fmt: skip
UPSTREAM = {
    "the upstream cannot be reached": ("gpt-down", "upstream_unavailable"),
    "the upstream refuses the proxy's key": ("gpt-refused", "upstream_auth_failed"),
}


@pytest.mark.parametrize("case", POLICY)
async def test_a_first_message_that_cannot_be_routed_gets_an_error_event_and_1008(
    proxy: TestClient[Any, Any], a: OpenAIResponses, b: OpenAIResponses, case: str
) -> None:
    key, message, code = POLICY[case]
    ws = await connect(proxy, key=key)
    event, close_code = await refused(ws, message)
    assert close_code == 1008
    assert event["type"] == "error" and event["error"]["code"] == code
    assert set(event["error"]) == {"type", "code", "message", "param"}
    assert a.received == [] and b.received == []  # no upstream connection was opened


@pytest.mark.parametrize("case", UPSTREAM)
async def test_an_upstream_that_refuses_or_fails_gets_an_error_event_and_1011(
    proxy: TestClient[Any, Any], b: OpenAIResponses, case: str
) -> None:
    model, code = UPSTREAM[case]
    ws = await connect(proxy)
    event, close_code = await refused(ws, json.dumps(create(model)))
    assert close_code == 1011
    assert event["type"] == "error" and event["error"]["code"] == code
    assert b.connections == []  # nothing was left open


@pytest.mark.parametrize("status", [404, 500])
async def test_an_upstream_refusing_the_handshake_gets_1011(
    proxy: TestClient[Any, Any], b: OpenAIResponses, status: int
) -> None:
    b.ws_refuse = status
    ws = await connect(proxy)
    event, close_code = await refused(ws, json.dumps(create("gpt-b")))
    assert close_code == 1011
    assert event["status"] == (404 if status == 404 else 502)
    assert b.connections == []


async def test_a_binary_first_message_gets_1008(proxy: TestClient[Any, Any]) -> None:
    ws = await connect(proxy)
    event, close_code = await refused(ws, json.dumps(create("gpt-b")).encode())
    assert close_code == 1008 and event["error"]["code"] == "invalid_first_message"


async def test_no_first_message_in_time_gets_1008(
    aiohttp_client: Any, a_url: str, b_url: str, b: OpenAIResponses
) -> None:
    proxy = await serve_proxy(
        aiohttp_client, config(a_url, b_url, server={"body_idle_timeout": 0.2})
    )
    ws = await connect(proxy, autoping=False)
    await ws.ping(b"still here")  # answered by the proxy while it waits
    async with asyncio.timeout(10):
        pong = await ws.receive()
        assert pong.type is WSMsgType.PONG and pong.data == b"still here"
        msg = await ws.receive()
        closing = await ws.receive()
    assert json.loads(msg.data)["error"]["code"] == "first_message_timeout"
    assert closing.type is WSMsgType.CLOSE and ws.close_code == 1008
    assert b.received == []


async def test_an_oversized_first_message_closes_with_1009(
    aiohttp_client: Any, a_url: str, b_url: str, b: OpenAIResponses
) -> None:
    proxy = await serve_proxy(aiohttp_client, config(a_url, b_url, server={"max_body_bytes": 4096}))
    ws = await connect(proxy)
    await ws.send_str(json.dumps(create("gpt-b", input="x" * 8192)))
    async with asyncio.timeout(10):
        closing = await ws.receive()
    assert closing.type is WSMsgType.CLOSE and ws.close_code == 1009
    assert b.received == []


async def test_a_client_closing_before_its_first_message_opens_nothing(
    proxy: TestClient[Any, Any], b: OpenAIResponses
) -> None:
    with capture_logs() as logs:
        ws = await connect(proxy)
        await ws.close()
        (line,) = await logs.wait_for(1)
    assert ws.close_code == 1000
    assert b.received == []
    assert "outcome=client_gone" in line


def test_responses_websocket_must_be_true_or_false() -> None:
    cfg = {
        "upstreams": {"a": {"url": "http://127.0.0.1:1/v1", "responses_websocket": "yes"}},
        "routes": [{"default": True, "upstream": "a"}],
    }
    with pytest.raises(
        ConfigError, match=r"upstreams\.a\.responses_websocket: expected true or false, got 'yes'"
    ):
        parse_settings(cfg, environ={})


async def test_shutdown_closes_a_session_waiting_for_its_first_message_with_1001(
    proxy: TestClient[Any, Any],
) -> None:
    """A session with no upstream leg yet is closed at shutdown like an open
    one, not left to its first-message wait (server.body_idle_timeout)."""
    with capture_logs() as logs:
        ws = await connect(proxy)
        closing = asyncio.create_task(proxy.server.close())
        msg = await ws.receive(timeout=5)
        assert msg.type is WSMsgType.CLOSE and msg.data == 1001
        await ws.close()
        async with asyncio.timeout(5):
            await closing
        (line,) = await logs.wait_for(1)
    assert parse_text_line(line)["status"] == "101"
    assert not any("Traceback" in entry for entry in logs.everything)


async def test_shutdown_closes_a_session_waiting_for_its_upstream_handshake_with_1001(
    aiohttp_client: Any, a_url: str, b_url: str
) -> None:
    """The upstream takes the connection and never answers the upgrade: the
    client still gets 1001 at shutdown, and the handshake is given up."""
    arrived = asyncio.Event()
    gone = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        arrived.set()
        try:
            async with asyncio.timeout(30):
                while await reader.read(65536):
                    pass
        finally:
            gone.set()
            writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = config(a_url, b_url)
    cfg["upstreams"]["silent"] = {"url": f"http://127.0.0.1:{port}/v1", "responses_websocket": True}
    cfg["routes"].insert(0, {"model": "gpt-silent", "upstream": "silent"})
    try:
        proxy = await serve_proxy(aiohttp_client, cfg)
        ws = await connect(proxy)
        await ws.send_str(json.dumps(create("gpt-silent")))
        async with asyncio.timeout(5):
            await arrived.wait()
        closing = asyncio.create_task(proxy.server.close())
        msg = await ws.receive(timeout=5)
        assert msg.type is WSMsgType.CLOSE and msg.data == 1001
        await ws.close()
        async with asyncio.timeout(5):
            await closing
            await gone.wait()  # the upstream connection was dropped
    finally:
        server.close()
        await server.wait_closed()
