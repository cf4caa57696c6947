"""Realtime: ``GET /v1/realtime?model=...`` WebSocket tunnel through the proxy
(README, "Realtime (WebSocket)").

A real fake upstream WebSocket server (tests/fakes/openai_like.py) and
aiohttp's WebSocket client on the other side; nothing mocked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import serve_proxy
from tests.fakes.access_lines import capture_logs, parse_text_line
from tests.fakes.openai_like import OpenAILike, WsEvent

UPSTREAM_KEY = "sk-upstream-realtime-secret"


@pytest.fixture
def upstream() -> OpenAILike:
    return OpenAILike(name="rt", models=["gpt-4o-realtime-preview"])


@pytest.fixture
async def upstream_server(aiohttp_server: Any, upstream: OpenAILike) -> TestServer:
    server: TestServer = await aiohttp_server(upstream.app())
    return server


def config(upstream_server: TestServer, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "upstreams": {
            "rt": {
                "url": str(upstream_server.make_url("/v1")),
                "headers": {"set": {"Authorization": f"Bearer {UPSTREAM_KEY}"}},
            }
        },
        "routes": [
            {"model": "gpt-4o-realtime-preview", "upstream": "rt"},
            {"model": "voice", "upstream": "rt", "rewrite_model": "gpt-4o-realtime-preview"},
        ],
    }
    cfg.update(extra)
    return cfg


@pytest.fixture
async def proxy(aiohttp_client: Any, upstream_server: TestServer) -> TestClient[Any, Any]:
    return await serve_proxy(aiohttp_client, config(upstream_server))


async def connect(
    proxy: TestClient[Any, Any], query: str = "model=gpt-4o-realtime-preview", **kwargs: Any
) -> aiohttp.ClientWebSocketResponse[bool]:
    kwargs.setdefault("autoping", False)
    kwargs.setdefault("autoclose", False)
    ws: aiohttp.ClientWebSocketResponse[bool] = await proxy.ws_connect(
        f"/v1/realtime?{query}", **kwargs
    )
    return ws


async def handshake(
    proxy: TestClient[Any, Any], url: str, headers: dict[str, str] | None = None
) -> aiohttp.ClientResponse:
    """A WebSocket handshake for ``url`` sent as a plain GET, so that a refusal's
    status and body can be read (aiohttp's ws_connect raises on any but 101)."""
    upgrade = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    return await proxy.get(url, headers={**(headers or {}), **upgrade})


async def test_frames_pass_both_ways_byte_identical_and_in_order(
    proxy: TestClient[Any, Any], upstream: OpenAILike
) -> None:
    ws = await connect(proxy)
    big = bytes(range(256)) * 4096  # 1 MiB binary, every byte value
    audio_delta = json.dumps(
        {"type": "input_audio_buffer.append", "audio": "UklGRg" * 200_000}
    )  # ~1.2 MB text
    sent: list[tuple[str, bytes]] = [
        ("text", 'héllo ☃ {"type":"session.update"}'.encode()),
        ("binary", big),
        ("text", b""),
        ("ping", b"p-1"),
        ("binary", b"\x00\xff\x00"),
        ("text", audio_delta.encode()),
    ]
    for kind, data in sent:
        if kind == "text":
            await ws.send_str(data.decode())
        elif kind == "binary":
            await ws.send_bytes(data)
        else:
            await ws.ping(data)
    events = await upstream.wait_events(len(sent))
    assert [(e.kind, e.data) for e in events] == sent
    # The fake echoes text and binary and answers the ping with a pong.
    expected_back = [("pong" if k == "ping" else k, d) for k, d in sent]
    got: list[tuple[str, bytes]] = []
    async with asyncio.timeout(5):
        while len(got) < len(expected_back):
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                got.append(("text", msg.data.encode()))
            elif msg.type is WSMsgType.BINARY:
                got.append(("binary", msg.data))
            elif msg.type is WSMsgType.PONG:
                got.append(("pong", msg.data))
            else:
                pytest.fail(f"unexpected {msg.type}")
    assert got == expected_back
    await ws.close()


async def test_upstream_ping_reaches_the_client_and_its_pong_goes_back(
    proxy: TestClient[Any, Any], upstream: OpenAILike
) -> None:
    pong_seen = asyncio.Event()

    async def script(ws: web.WebSocketResponse, request: web.Request) -> None:
        await ws.ping(b"are-you-there")
        msg = await ws.receive()
        assert msg.type is WSMsgType.PONG and msg.data == b"are-you-there"
        pong_seen.set()
        await ws.receive()  # the close
        await ws.close()

    upstream.ws_script = script
    ws = await connect(proxy)
    msg = await ws.receive(timeout=5)
    assert msg.type is WSMsgType.PING and msg.data == b"are-you-there"
    await ws.pong(msg.data)
    async with asyncio.timeout(5):
        await pong_seen.wait()
    await ws.close()


async def test_handshake_gets_the_upstream_rewrites_and_subprotocols(
    proxy: TestClient[Any, Any], upstream: OpenAILike, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ws = await connect(
        proxy,
        "model=voice&foo=a%20b&x=1",
        protocols=(
            "realtime",
            "openai-insecure-api-key.sk-client-browser-key",
            "openai-beta.realtime-v1",
        ),
        headers={
            "Authorization": "Bearer sk-client-key",
            "OpenAI-Beta": "realtime=v1",
            "OpenAI-Organization": "org-client",
            "X-Request-Id": "rt-req-1",
        },
    )
    assert ws.protocol == "realtime"
    await ws.close()
    seen = upstream.ws_request
    assert seen is not None
    # The alias is rewritten in the query; everything else passes as it came.
    assert seen.query_string == "model=gpt-4o-realtime-preview&foo=a%20b&x=1"
    assert seen.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert seen.headers["openai-beta"] == "realtime=v1"
    assert "openai-organization" not in seen.headers
    assert seen.headers["x-request-id"] == "rt-req-1"
    offered = [p.strip() for p in seen.headers["sec-websocket-protocol"].split(",")]
    assert offered == ["realtime", "openai-beta.realtime-v1"]
    assert "sk-client" not in json.dumps(seen.headers)
    assert "sk-client" not in caplog.text


async def test_client_close_code_and_reason_reach_the_upstream(
    proxy: TestClient[Any, Any], upstream: OpenAILike
) -> None:
    ws = await connect(proxy)
    await ws.send_str("last words")
    await ws.close(code=4001, message=b"client done")
    events = await upstream.wait_events(2)
    assert events[-1].kind == "close"
    assert events[-1].data == b"4001" and events[-1].extra == "client done"
    assert ws.close_code == 4001  # the reply echoes the code (RFC 6455 5.5.1)
    async with asyncio.timeout(5):
        await upstream.ws_closed.wait()


@pytest.mark.parametrize("code", [1000, 1001, 1008, 1011, 4000, 4999])
async def test_upstream_close_code_and_reason_reach_the_client(
    proxy: TestClient[Any, Any], upstream: OpenAILike, code: int
) -> None:
    reply: list[int] = []

    async def script(ws: web.WebSocketResponse, request: web.Request) -> None:
        await ws.send_str("bye soon")
        await ws.close(code=code, message=b"upstream says bye")
        reply.append(ws.close_code or 0)

    upstream.ws_script = script
    ws = await connect(proxy)
    first = await ws.receive(timeout=5)
    assert first.type is WSMsgType.TEXT and first.data == "bye soon"
    closing = await ws.receive(timeout=5)
    assert closing.type is WSMsgType.CLOSE
    assert closing.data == code and closing.extra == "upstream says bye"
    await ws.close(code=code)
    async with asyncio.timeout(5):
        await upstream.ws_closed.wait()
    assert reply == [code]


# Codes no endpoint may put in a close frame (RFC 6455 §7.4.1, §7.4.2): those of
# Autobahn's cases 7.9.1-7.9.9 and 7.13.1-7.13.2, and 1015. aiohttp's reader
# refuses the ones under 3000 it has no name for; 1006 and those over 4999 it
# passes on as a CLOSE message, so the relay must check them itself.
INVALID_CLOSE_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]
# Autobahn's cases 7.7.x, and 1012-1014 from the IANA registry (RFC 6455 §11.7).
VALID_CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]
VALID_CLOSE_CODES += [3000, 3999, 4000, 4999]
# Close frames that are malformed whatever their code, and the code each must get
# (Autobahn's cases 7.3.2, 7.3.6 and 7.5.1).
MALFORMED_CLOSE_FRAMES = {
    "one-byte payload": (b"\x03", 1002),
    "reason of 124 bytes": (struct.pack("!H", 1000) + b"r" * 124, 1002),
    "reason not UTF-8": (struct.pack("!H", 1000) + b"\xce\xba\xed\xa0\x80", 1007),
}


def close_frame(code: int) -> bytes:
    return struct.pack("!H", code)


def close_cases() -> list[Any]:
    cases = [pytest.param(close_frame(c), 1002, id=str(c)) for c in INVALID_CLOSE_CODES]
    cases += [pytest.param(p, c, id=name) for name, (p, c) in MALFORMED_CLOSE_FRAMES.items()]
    return cases


@pytest.mark.parametrize(("payload", "expected"), close_cases())
async def test_a_client_bad_close_frame_is_answered_and_reported_as_a_protocol_error(
    proxy: TestClient[Any, Any], upstream: OpenAILike, payload: bytes, expected: int
) -> None:
    ws = await connect(proxy)
    await ws.send_str("before")
    await upstream.wait_events(1)
    await ws.send_frame(payload, WSMsgType.CLOSE)
    msg = await ws.receive(timeout=5)
    while msg.type is not WSMsgType.CLOSE:
        msg = await ws.receive(timeout=5)
    assert msg.data == expected
    async with asyncio.timeout(5):
        await upstream.ws_closed.wait()
    assert upstream.ws_events[-1].kind == "close"
    assert upstream.ws_events[-1].data == str(expected).encode()
    await ws.close()


async def test_an_empty_close_frame_is_passed_on_as_1000(
    proxy: TestClient[Any, Any], upstream: OpenAILike
) -> None:
    """A close frame with no code (RFC 6455 §5.5.1: the body is optional) is a
    normal closure, not a protocol error."""
    ws = await connect(proxy)
    await ws.send_str("before")
    await upstream.wait_events(1)
    await ws.send_frame(b"", WSMsgType.CLOSE)
    msg = await ws.receive(timeout=5)
    while msg.type is not WSMsgType.CLOSE:
        msg = await ws.receive(timeout=5)
    assert msg.data == 1000
    async with asyncio.timeout(5):
        await upstream.ws_closed.wait()
    assert upstream.ws_events[-1] == WsEvent("close", b"1000", "")
    await ws.close()


@pytest.mark.parametrize(("payload", "expected"), close_cases())
async def test_an_upstream_bad_close_frame_is_answered_and_reported_as_a_protocol_error(
    proxy: TestClient[Any, Any], upstream: OpenAILike, payload: bytes, expected: int
) -> None:
    answer: list[int] = []

    async def script(ws: web.WebSocketResponse, request: web.Request) -> None:
        await ws.send_str("before")
        await ws.send_frame(payload, WSMsgType.CLOSE)
        msg = await ws.receive(timeout=5)
        answer.append(msg.data if msg.type is WSMsgType.CLOSE else -1)

    upstream.ws_script = script
    ws = await connect(proxy)
    first = await ws.receive(timeout=5)
    assert first.type is WSMsgType.TEXT and first.data == "before"
    msg = await ws.receive(timeout=5)
    assert msg.type is WSMsgType.CLOSE and msg.data == expected
    await ws.close()
    async with asyncio.timeout(5):
        await upstream.ws_closed.wait()
    assert answer == [expected]


@pytest.mark.parametrize("code", VALID_CLOSE_CODES)
async def test_every_valid_close_code_passes_both_ways(
    proxy: TestClient[Any, Any], upstream: OpenAILike, code: int
) -> None:
    ws = await connect(proxy)
    await ws.close(code=code, message=b"from the client")
    assert ws.close_code == code
    async with asyncio.timeout(5):
        await upstream.ws_closed.wait()
    assert upstream.ws_events[-1] == WsEvent("close", str(code).encode(), "from the client")

    upstream.ws_closed.clear()

    async def script(ws: web.WebSocketResponse, request: web.Request) -> None:
        await ws.close(code=code, message=b"from the upstream")

    upstream.ws_script = script
    ws = await connect(proxy)
    msg = await ws.receive(timeout=5)
    assert msg.type is WSMsgType.CLOSE
    assert (msg.data, msg.extra) == (code, "from the upstream")
    await ws.close(code=code)
    async with asyncio.timeout(5):
        await upstream.ws_closed.wait()


async def test_unknown_model_is_refused_before_the_upgrade(
    proxy: TestClient[Any, Any], upstream: OpenAILike
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await connect(proxy, "model=no-such-model")
    assert info.value.status == 404
    # The same handshake read as plain HTTP: OpenAI's error JSON, no 101.
    resp = await handshake(proxy, "/v1/realtime?model=no-such-model")
    assert resp.status == 404
    error = (await resp.json())["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["type"] == "invalid_request_error"
    assert upstream.received == []


async def test_a_long_unknown_model_is_clipped_in_the_message(
    proxy: TestClient[Any, Any], upstream: OpenAILike
) -> None:
    model = "m" * 250  # a valid id (up to 256), longer than what a message quotes
    resp = await handshake(proxy, f"/v1/realtime?model={model}")
    assert resp.status == 404
    assert (await resp.json())["error"]["message"] == (
        f"The model '{model[:200]}...' does not exist or you do not have access to it."
    )
    assert upstream.received == []


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("", 400, "missing_model"),
        ("model=", 400, "missing_model"),
        ("model=a&model=b", 400, "ambiguous_model"),
    ],
)
async def test_bad_model_query_is_refused_before_the_upgrade(
    proxy: TestClient[Any, Any], upstream: OpenAILike, query: str, status: int, code: str
) -> None:
    resp = await handshake(proxy, f"/v1/realtime?{query}")
    assert resp.status == status
    assert (await resp.json())["error"]["code"] == code
    assert upstream.received == []


@pytest.mark.parametrize("model", ["m" * 257, "gpt%1B[2J"], ids=["too-long", "escape"])
async def test_a_model_id_no_route_could_mean_is_refused_as_a_body_model_is(
    proxy: TestClient[Any, Any], upstream: OpenAILike, model: str
) -> None:
    """The same check, and the same words, as for a model in a request body."""
    resp = await handshake(proxy, f"/v1/realtime?model={model}")
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error == {
        "message": "The model id must be 1 to 256 printable characters.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "invalid_model",
    }
    as_body = await proxy.post(
        "/v1/chat/completions", json={"model": unquote(model), "messages": []}
    )
    assert as_body.status == 400
    assert (await as_body.json())["error"] == error
    assert upstream.received == []


async def test_rate_limit_and_proxy_keys_apply_to_the_handshake(
    aiohttp_client: Any, upstream_server: TestServer, upstream: OpenAILike
) -> None:
    proxy = await serve_proxy(
        aiohttp_client,
        config(
            upstream_server,
            rate_limit={"requests_per_minute": 1, "burst": 1},
            auth={"keys": [{"name": "team", "key": "sk-proxy-team-key"}]},
        ),
    )
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await connect(proxy)
    assert info.value.status == 401
    ws = await connect(proxy, headers={"Authorization": "Bearer sk-proxy-team-key"})
    await ws.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await connect(proxy, headers={"Authorization": "Bearer sk-proxy-team-key"})
    assert info.value.status == 429
    assert len([r for r in upstream.received if r.path == "/v1/realtime"]) == 1
    # The proxy key never reaches the upstream.
    assert upstream.ws_request is not None
    assert upstream.ws_request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_a_model_outside_the_keys_list_is_refused_before_the_upgrade_as_in_a_body(
    aiohttp_client: Any, upstream_server: TestServer, upstream: OpenAILike
) -> None:
    """The same judge, the same words and the same metrics label (its route's
    model) as for a model in a request body."""
    proxy = await serve_proxy(
        aiohttp_client,
        config(
            upstream_server,
            auth={"keys": [{"name": "team", "key": "sk-proxy-team-key", "models": ["voice"]}]},
        ),
    )
    auth = {"Authorization": "Bearer sk-proxy-team-key"}
    resp = await handshake(proxy, "/v1/realtime?model=gpt-4o-realtime-preview", headers=auth)
    assert resp.status == 403
    assert resp.headers["x-oaimux-error"] == "model_not_allowed"
    error = (await resp.json())["error"]
    assert error == {
        "message": "Your key may not use the model 'gpt-4o-realtime-preview'.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_allowed",
    }
    as_body = await proxy.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o-realtime-preview", "messages": []},
        headers=auth,
    )
    assert as_body.status == 403
    assert (await as_body.json())["error"] == error
    assert upstream.received == []
    ws = await connect(proxy, "model=voice", headers=auth)  # the one it may use
    await ws.close()
    metrics = await proxy.get("/metrics")
    refused = [
        line
        for line in (await metrics.text()).splitlines()
        if line.startswith("oaimux_requests_total{") and 'status_class="4xx"' in line
    ]
    assert refused == [
        'oaimux_requests_total{model="gpt-4o-realtime-preview",status_class="4xx",upstream=""} 2.0',
    ]


@pytest.mark.parametrize(
    ("refusal", "status", "code"),
    [
        (401, 502, "upstream_auth_failed"),
        (404, 404, "upstream_refused_handshake"),
        (503, 502, "upstream_refused_handshake"),
    ],
)
async def test_upstream_refusing_the_handshake_is_an_http_error_never_a_101(
    proxy: TestClient[Any, Any], upstream: OpenAILike, refusal: int, status: int, code: str
) -> None:
    upstream.ws_refuse = refusal
    resp = await handshake(proxy, "/v1/realtime?model=gpt-4o-realtime-preview")
    assert resp.status == status
    assert (await resp.json())["error"]["code"] == code


async def test_upstream_unreachable_is_502(aiohttp_client: Any, unused_tcp_port: int) -> None:
    cfg = {
        "upstreams": {"gone": {"url": f"http://127.0.0.1:{unused_tcp_port}/v1"}},
        "routes": [{"model": "gpt-4o-realtime-preview", "upstream": "gone"}],
    }
    proxy = await serve_proxy(aiohttp_client, cfg)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await connect(proxy)
    assert info.value.status == 502


async def test_client_vanishing_closes_the_upstream(
    proxy: TestClient[Any, Any], upstream: OpenAILike
) -> None:
    assert proxy.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    writer.write(
        b"GET /v1/realtime?model=gpt-4o-realtime-preview HTTP/1.1\r\n"
        b"Host: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    status_line = await asyncio.wait_for(reader.readline(), 5)
    assert status_line.startswith(b"HTTP/1.1 101")
    async with asyncio.timeout(5):
        await upstream.ws_connected.wait()
    writer.transport.abort()  # RST, no close frame
    async with asyncio.timeout(5):
        await upstream.ws_closed.wait()
    close = upstream.ws_events[-1]
    assert close.kind == "close" and close.data == b"1001"


async def test_upstream_vanishing_closes_the_client_with_1011(
    proxy: TestClient[Any, Any], upstream: OpenAILike
) -> None:
    async def script(ws: web.WebSocketResponse, request: web.Request) -> None:
        await ws.send_str("about to crash")
        assert request.transport is not None
        request.transport.abort()

    upstream.ws_script = script
    ws = await connect(proxy)
    first = await ws.receive(timeout=5)
    assert first.type is WSMsgType.TEXT
    closing = await ws.receive(timeout=5)
    assert closing.type is WSMsgType.CLOSE and closing.data == 1011


async def stalled_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client that takes its 101 and then reads only what it is asked to: a
    tiny receive window, so a large message holds the proxy in its write."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(
        b"GET /v1/realtime?model=gpt-4o-realtime-preview HTTP/1.1\r\n"
        b"Host: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    return reader, writer


@pytest.mark.parametrize(
    ("before", "outcome"),
    [
        (b'{"type":"response.output_text.delta"}', "client_gone"),
        (b'{"type":"response.completed"}', "complete"),
    ],
)
async def test_client_vanishing_under_a_write_closes_the_upstream_and_is_logged(
    aiohttp_client: Any,
    upstream_server: TestServer,
    upstream: OpenAILike,
    before: bytes,
    outcome: str,
) -> None:
    """The proxy is writing a message the client does not read when the client
    resets the connection: the write fails (Tunnel._dst_gone), the upstream leg
    is closed 1001, and the outcome follows the rule of a client gone at any
    other time (after a terminal event: complete)."""
    proxy = await serve_proxy(aiohttp_client, config(upstream_server))
    big = 16 * 1024 * 1024  # far over what the kernel buffers of both ends hold

    async def script(ws: web.WebSocketResponse, request: web.Request) -> None:
        await ws.send_frame(before, WSMsgType.TEXT)
        await ws.send_bytes(b"x" * big)
        await upstream._echo(ws)  # records the close the proxy sends

    upstream.ws_script = script
    assert proxy.server.port is not None
    with capture_logs() as logs:
        reader, writer = await stalled_client(proxy.server.port)
        first = await asyncio.wait_for(reader.readexactly(2 + len(before)), 5)
        assert first[2:] == before
        # The next frame's head: the proxy has written the large message to its
        # socket and waits for the client to take it (nothing yields in between).
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\x82\x7f"
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, unread bytes left behind
        (line,) = await logs.wait_for(1)
        async with asyncio.timeout(5):
            await upstream.ws_closed.wait()
    close = upstream.ws_events[-1]
    assert close.kind == "close" and close.data == b"1001"
    f = parse_text_line(line)
    assert (f["status"], f["outcome"]) == ("101", outcome)


async def test_oversized_message_closes_both_legs_with_1009(
    aiohttp_client: Any, upstream_server: TestServer, upstream: OpenAILike
) -> None:
    proxy = await serve_proxy(
        aiohttp_client, config(upstream_server, server={"max_body_bytes": 64 * 1024})
    )
    ws = await connect(proxy)
    await ws.send_bytes(b"x" * 100)
    await upstream.wait_events(1)
    await ws.send_bytes(b"y" * (65 * 1024))
    msg = await ws.receive(timeout=5)
    while msg.type is not WSMsgType.CLOSE:
        msg = await ws.receive(timeout=5)
    assert msg.data == 1009
    await ws.close(code=1009)
    async with asyncio.timeout(5):
        await upstream.ws_closed.wait()
    assert upstream.ws_events[-1].kind == "close" and upstream.ws_events[-1].data == b"1009"
    # The oversized message never reached the upstream.
    assert [e.kind for e in upstream.ws_events] == ["binary", "close"]


async def test_shutdown_closes_both_legs_with_1001(
    aiohttp_client: Any, upstream_server: TestServer, upstream: OpenAILike
) -> None:
    proxy = await serve_proxy(aiohttp_client, config(upstream_server))
    ws = await connect(proxy)
    await ws.send_str("hi")
    await upstream.wait_events(1)
    echo = await ws.receive(timeout=5)
    assert echo.type is WSMsgType.TEXT
    closing = asyncio.create_task(proxy.server.close())
    msg = await ws.receive(timeout=5)
    assert msg.type is WSMsgType.CLOSE and msg.data == 1001
    await ws.close()
    async with asyncio.timeout(5):
        await upstream.ws_closed.wait()
        await closing
    assert upstream.ws_events[-1].kind == "close" and upstream.ws_events[-1].data == b"1001"


async def test_plain_get_on_realtime_is_not_tunnelled(
    proxy: TestClient[Any, Any], upstream: OpenAILike
) -> None:
    resp = await proxy.get("/v1/realtime?model=gpt-4o-realtime-preview")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "unknown_url"
    assert upstream.received == []


async def test_a_browser_key_subprotocol_is_never_forwarded_nor_logged(
    proxy: TestClient[Any, Any], upstream: OpenAILike, caplog: pytest.LogCaptureFixture
) -> None:
    """Only a credential subprotocol offered: none goes upstream, none is chosen,
    and aiohttp's "protocols don't overlap" warning does not print the key."""
    caplog.set_level(logging.DEBUG)
    ws = await connect(proxy, protocols=("openai-insecure-api-key.sk-browser-secret",))
    assert ws.protocol is None
    await ws.send_str("hello")
    assert (await ws.receive(timeout=5)).data == "hello"
    await ws.close()
    assert upstream.ws_request is not None
    assert "sec-websocket-protocol" not in upstream.ws_request.headers
    assert "sk-browser-secret" not in caplog.text


async def test_a_browser_key_subprotocol_reaches_an_upstream_that_takes_the_clients_key(
    aiohttp_client: Any, upstream_server: TestServer, upstream: OpenAILike
) -> None:
    """With no proxy keys and ``pass_client_auth``, the client's own key is the
    upstream's credential: its subprotocol is offered upstream as it came."""
    cfg = config(upstream_server)
    cfg["upstreams"]["rt"] = {"url": cfg["upstreams"]["rt"]["url"], "pass_client_auth": True}
    proxy = await serve_proxy(aiohttp_client, cfg)
    ws = await connect(proxy, protocols=("realtime", "openai-insecure-api-key.sk-own-key"))
    assert ws.protocol == "realtime"
    await ws.close()
    assert upstream.ws_request is not None
    offered = upstream.ws_request.headers["sec-websocket-protocol"]
    assert [p.strip() for p in offered.split(",")] == [
        "realtime",
        "openai-insecure-api-key.sk-own-key",
    ]
