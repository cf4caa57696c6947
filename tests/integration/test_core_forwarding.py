"""Core pass-through: routing by model, bytes unchanged both ways, streaming,
header rules, and the client's disconnect closing the upstream request."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import basic_config
from tests.fakes.upstream import FakeUpstream, binary_payload

JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize("prefix", ["/v1", ""])
@pytest.mark.parametrize(
    "path",
    [
        "chat/completions",
        "completions",
        "embeddings",
        "audio/speech",
        "images/generations",
        "moderations",
        "responses",
    ],
)
async def test_json_endpoints_route_by_model_and_keep_bytes(
    make_proxy: Any, fake: FakeUpstream, prefix: str, path: str
) -> None:
    client = await make_proxy()
    body = b'{ "input" : "h\xc3\xa9",\t"model":"gpt-4o-mini" , "n": 1.0e0 }'
    resp = await client.post(
        f"{prefix}/{path}?api-version=2024-01-01&q=a%26b&dup=1&dup=2&e=", data=body, headers=JSON
    )
    assert resp.status == 200, await resp.text()
    got = fake.last
    assert got.path == f"/v1/{path}"
    assert got.query_string == "api-version=2024-01-01&q=a%26b&dup=1&dup=2&e="
    assert got.body == body


async def test_nested_model_is_not_picked_up(make_proxy: Any, fake: FakeUpstream) -> None:
    client = await make_proxy()
    body = json.dumps(
        {
            "tools": [{"model": "gpt-4o-mini"}],
            "response_format": {"model": "gpt-4o-mini"},
            "messages": [],
        }
    )
    resp = await client.post("/v1/chat/completions", data=body, headers=JSON)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "missing_model"
    assert fake.received == []


async def test_alias_rewrite_changes_only_the_model_value(
    make_proxy: Any, fake: FakeUpstream
) -> None:
    client = await make_proxy()
    body = b'{"messages": [{"role": "user", "content": "fast \\"model\\""}],\n  "model":   "fast", "stream": false}'
    resp = await client.post("/v1/chat/completions", data=body, headers=JSON)
    assert resp.status == 200
    assert fake.last.body == body.replace(b'"fast",', b'"llama3.2:3b",')
    assert fake.last.headers["content-length"] == str(len(fake.last.body))


async def test_glob_route_with_namespaced_model(make_proxy: Any, fake: FakeUpstream) -> None:
    client = await make_proxy()
    body = b'{"model": "meta-llama/Meta-Llama-3-70B-Instruct", "prompt": "x"}'
    resp = await client.post("/v1/completions", data=body, headers=JSON)
    assert resp.status == 200
    assert fake.last.body == body


async def test_multipart_routes_by_form_field_and_rewrites(
    make_proxy: Any, fake: FakeUpstream
) -> None:
    client = await make_proxy()
    audio = binary_payload(300_000)
    form = aiohttp.FormData()
    form.add_field("file", audio, filename="a.mp3", content_type="audio/mpeg")
    form.add_field("model", "fast")
    payload = form()
    sent = b"".join([chunk async for chunk in _payload_bytes(payload)])
    resp = await client.post(
        "/v1/audio/transcriptions", data=sent, headers={"Content-Type": payload.content_type}
    )
    assert resp.status == 200, await resp.text()
    assert fake.last.body == sent.replace(b"\r\n\r\nfast\r\n", b"\r\n\r\nllama3.2:3b\r\n")
    assert fake.last.headers["content-type"] == payload.content_type


async def _payload_bytes(payload: Any) -> Any:
    chunks: list[bytes] = []

    class Sink:
        async def write(self, data: bytes) -> None:
            chunks.append(bytes(data))

    await payload.write(Sink())
    yield b"".join(chunks)


async def test_sse_chunks_arrive_before_the_next_is_sent(
    make_proxy: Any, fake: FakeUpstream
) -> None:
    fake.gated = True
    client = await make_proxy()
    resp = await client.post(
        "/v1/chat/completions", data=b'{"model": "gpt-4o-mini", "stream": true}', headers=JSON
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["X-Accel-Buffering"] == "no"
    received = b""
    for i in range(fake.sse_chunks):
        fake.gate(i).set()
        # Chunk i must reach us while chunk i+1 is still held back upstream.
        chunk = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
        assert f"tok{i}".encode() in chunk
        assert not fake.gate(i + 1).is_set()
        received += chunk
    fake.gate(fake.sse_chunks).set()
    rest = await asyncio.wait_for(resp.content.read(), 10)
    assert rest == b"data: [DONE]\n\n"


async def test_binary_body_arrives_identical(make_proxy: Any, fake: FakeUpstream) -> None:
    client = await make_proxy(
        routes=[
            {"path": "binary", "upstream": "fake"},
            {"model": "gpt-4o-mini", "upstream": "fake"},
        ]
    )
    size = 5 * 1024 * 1024 + 17
    resp = await client.get(f"/v1/binary?size={size}")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "audio/mpeg"
    assert resp.headers["Content-Length"] == str(size)
    data = await resp.read()
    assert hashlib.sha256(data).digest() == hashlib.sha256(binary_payload(size)).digest()


async def test_compressed_response_passes_untouched(aiohttp_server: Any, make_proxy: Any) -> None:
    packed = gzip.compress(b'{"ok": true}' * 100)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            body=packed, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    app = web.Application()
    app.router.add_post("/v1/embeddings", handler)
    server = await aiohttp_server(app)
    client = await make_proxy(basic_config(str(server.make_url("/v1"))))
    resp = await client.post(
        "/v1/embeddings",
        data=b'{"model": "gpt-4o-mini"}',
        headers={**JSON, "Accept-Encoding": "gzip"},
        auto_decompress=False,
    )
    assert resp.headers["Content-Encoding"] == "gzip"
    assert await resp.read() == packed


async def test_gzip_request_body_is_forwarded_compressed(
    make_proxy: Any, fake: FakeUpstream
) -> None:
    client = await make_proxy()
    packed = gzip.compress(b'{"model": "gpt-4o-mini", "input": "x"}')
    resp = await client.post(
        "/v1/embeddings", data=packed, headers={**JSON, "Content-Encoding": "gzip"}
    )
    assert resp.status == 200, await resp.text()
    assert fake.last.body == packed
    assert fake.last.headers["content-encoding"] == "gzip"


async def test_hop_by_hop_and_client_auth_not_forwarded(
    make_proxy: Any, fake: FakeUpstream
) -> None:
    client = await make_proxy()
    resp = await client.post(
        "/v1/chat/completions",
        data=b'{"model": "gpt-4o-mini"}',
        headers={
            **JSON,
            "Connection": "keep-alive, X-Private",
            "X-Private": "drop me",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic abc",
            "Authorization": "Bearer client-key",
            "X-Custom": "kept",
            "OpenAI-Beta": "assistants=v2",
        },
    )
    assert resp.status == 200
    got = fake.last.headers
    for name in ("x-private", "keep-alive", "te", "proxy-authorization", "trailer", "upgrade"):
        assert name not in got
    assert got["authorization"] == "Bearer sk-upstream-secret"
    assert got["x-custom"] == "kept"
    assert got["openai-beta"] == "assistants=v2"


async def test_proxy_adds_no_client_library_headers(make_proxy: Any, fake: FakeUpstream) -> None:
    client = await make_proxy()
    # skip_auto_headers on the test client, so the request carries only what we set.
    resp = await client.post(
        "/v1/chat/completions",
        data=b'{"model": "gpt-4o-mini"}',
        headers=JSON,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
    )
    assert resp.status == 200
    got = fake.last.headers
    assert "user-agent" not in got
    assert "accept-encoding" not in got
    assert "accept" not in got


async def test_upstream_headers_set_and_remove(
    make_proxy: Any, fake: FakeUpstream, upstream_url: str
) -> None:
    config = basic_config(upstream_url)
    config["upstreams"]["fake"]["headers"] = {
        "set": {"Authorization": "Bearer up", "X-Team": "a"},
        "remove": ["X-Debug"],
    }
    client = await make_proxy(config)
    await client.post(
        "/v1/chat/completions",
        data=b'{"model": "gpt-4o-mini"}',
        headers={**JSON, "X-Debug": "1", "X-Team": "evil"},
    )
    got = fake.last.headers
    assert got["x-team"] == "a"
    assert "x-debug" not in got
    assert [v for k, v in fake.last.header_items if k.lower() == "x-team"] == ["a"]


async def test_redirect_is_relayed_not_followed(aiohttp_server: Any, make_proxy: Any) -> None:
    hits: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        hits.append(request.path)
        raise web.HTTPFound("/v1/elsewhere")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app)
    client = await make_proxy(basic_config(str(server.make_url("/v1"))))
    resp = await client.post(
        "/v1/chat/completions",
        data=b'{"model": "gpt-4o-mini"}',
        headers=JSON,
        allow_redirects=False,
    )
    assert resp.status == 302
    assert hits == ["/v1/chat/completions"]


async def test_upstream_set_cookie_not_stored_between_clients(
    aiohttp_server: Any, make_proxy: Any
) -> None:
    seen_cookies: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen_cookies.append(request.headers.get("Cookie"))
        resp = web.json_response({})
        resp.set_cookie("session", "upstream-secret")
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app)
    client = await make_proxy(basic_config(str(server.make_url("/v1"))))
    for _ in range(2):
        resp = await client.post("/v1/embeddings", data=b'{"model": "gpt-4o-mini"}', headers=JSON)
        assert "Set-Cookie" not in resp.headers
    assert seen_cookies == [None, None]


async def test_client_disconnect_while_upstream_thinks_closes_upstream(
    make_proxy: Any, fake: FakeUpstream
) -> None:
    client = await make_proxy(
        routes=[{"path": "slow", "upstream": "fake"}, {"model": "gpt-4o-mini", "upstream": "fake"}]
    )
    task = asyncio.ensure_future(client.post("/v1/slow", data=b"{}"))
    await asyncio.wait_for(fake.handler_started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await client.close()  # the client's connection goes away
    await asyncio.wait_for(fake.upstream_closed.wait(), 10)


async def test_client_disconnect_mid_stream_closes_upstream(
    make_proxy: Any, fake: FakeUpstream
) -> None:
    fake.gated = True
    fake.sse_chunks = 5
    client = await make_proxy()
    resp = await client.post(
        "/v1/chat/completions", data=b'{"model": "gpt-4o-mini", "stream": true}', headers=JSON
    )
    fake.gate(0).set()
    await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
    resp.close()  # hang up mid-stream
    fake.gate(1).set()
    await asyncio.wait_for(fake.upstream_closed.wait(), 10)
