"""CORS for browser apps: off by default; when on, preflights are the proxy's to answer
and every response to an allowed origin carries the headers, errors and streams included."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import basic_config
from tests.fakes.security import HostileUpstream, error_of
from tests.fakes.upstream import FakeUpstream

APP = "https://app.example"
OTHER = "https://evil.example"
PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
}
CHAT = {"model": "gpt-4o-mini", "messages": []}


def cors_config(upstream_url: str, origins: Any, **extra: Any) -> dict[str, Any]:
    return basic_config(
        upstream_url, server={"cors": {"allow_origins": origins, "max_age": 300}}, **extra
    )


async def test_off_by_default_even_when_the_upstream_allows_every_origin(
    make_proxy: Any, fake: FakeUpstream, aiohttp_server: Any
) -> None:
    hostile = HostileUpstream()
    server: TestServer = await aiohttp_server(hostile.app())
    client = await make_proxy(
        basic_config(str(server.make_url("/v1")), routes=[{"path": "*", "upstream": "fake"}])
    )
    resp = await client.options("/v1/identity", headers={"Origin": APP, **PREFLIGHT})
    assert "Access-Control-Allow-Origin" not in resp.headers
    resp = await client.get("/v1/identity", headers={"Origin": APP})
    assert resp.status == 200
    assert not [h for h in resp.headers if h.lower().startswith("access-control-")]


@pytest.mark.parametrize("origins", [[APP, "http://localhost:5173"], "*"])
async def test_preflight_is_answered_without_a_key_and_never_forwarded(
    make_proxy: Any, fake: FakeUpstream, upstream_url: str, origins: Any
) -> None:
    client = await make_proxy(
        cors_config(
            upstream_url, origins, auth={"keys": [{"name": "web", "key": "pk-web-0123456"}]}
        )
    )
    resp = await client.options("/v1/chat/completions", headers={"Origin": APP, **PREFLIGHT})
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == ("*" if origins == "*" else APP)
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert (
        resp.headers["Access-Control-Allow-Headers"] == PREFLIGHT["Access-Control-Request-Headers"]
    )
    assert resp.headers["Access-Control-Max-Age"] == "300"
    if origins != "*":
        assert "Origin" in resp.headers.getall("Vary")
    assert fake.received == []


async def test_preflight_from_another_origin_is_refused(
    make_proxy: Any, fake: FakeUpstream, upstream_url: str
) -> None:
    client = await make_proxy(cors_config(upstream_url, [APP]))
    resp = await client.options("/v1/chat/completions", headers={"Origin": OTHER, **PREFLIGHT})
    assert resp.status == 403
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert error_of(await resp.read())["code"] == "origin_not_allowed"
    assert fake.received == []


async def test_headers_on_success_errors_and_streams(
    make_proxy: Any, fake: FakeUpstream, upstream_url: str
) -> None:
    client = await make_proxy(
        cors_config(
            upstream_url,
            [APP],
            auth={"keys": [{"name": "web", "key": "pk-web-0123456"}]},
            rate_limit={"requests_per_minute": 0.001, "burst": 7},
        )
    )
    key = {"Authorization": "Bearer pk-web-0123456", "Origin": APP}
    cases = [
        ("POST", "/v1/chat/completions", CHAT, key, 200),
        ("POST", "/v1/chat/completions", {**CHAT, "stream": True}, key, 200),
        ("POST", "/v1/chat/completions", CHAT, {"Origin": APP}, 401),
        ("POST", "/v1/chat/completions", {"model": "nope"}, key, 404),
        ("POST", "/v1/chat/completions", {"messages": []}, key, 400),
        ("POST", "/v1/models", None, key, 405),
        ("GET", "/v1/chat/completions", None, key, 405),
        ("GET", "/v1/models", None, key, 200),
        ("POST", "/v1/chat/completions", CHAT, key, 429),
    ]
    for method, path, body, headers, status in cases:
        resp = await client.request(method, path, json=body, headers=headers)
        raw = await resp.read()
        assert resp.status == status, (path, body, raw)
        assert resp.headers.get("Access-Control-Allow-Origin") == APP, (path, status)
        assert resp.headers["Access-Control-Expose-Headers"] == "*"
        assert "Origin" in resp.headers.getall("Vary")
        if body and body.get("stream"):
            assert raw.endswith(b"data: [DONE]\n\n")
            assert resp.headers["Content-Type"].startswith("text/event-stream")
        if status >= 400:
            json.loads(raw)


async def test_other_origins_get_no_cors_headers(
    make_proxy: Any, fake: FakeUpstream, upstream_url: str
) -> None:
    client = await make_proxy(cors_config(upstream_url, [APP]))
    for origin in (OTHER, "null", APP.upper(), APP + "/"):
        resp = await client.post("/v1/chat/completions", json=CHAT, headers={"Origin": origin})
        assert resp.status == 200
        assert "Access-Control-Allow-Origin" not in resp.headers
        assert "Origin" in resp.headers.getall("Vary")
