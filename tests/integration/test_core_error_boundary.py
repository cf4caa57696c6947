"""The error boundary around every view (server/middlewares.py::error_boundary).

A view that fails in a way nobody planned for still answers in the client's
dialect, never with aiohttp's plain-text 500 or a traceback; and every route
of the proxy's application is behind it, now that it is no middleware.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from aiohttp import web

from proxy import SERVER
from proxy.config import parse_settings
from proxy.server.app import create_app, server_options
from proxy.server.middlewares import error_boundary


async def _broken(request: web.Request) -> web.StreamResponse:
    raise RuntimeError("a bug with a secret sk-never-shown")


async def _too_large(request: web.Request) -> web.StreamResponse:
    raise web.HTTPRequestEntityTooLarge(max_size=10, actual_size=20)


async def _plain(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok")


async def test_a_bug_in_a_view_is_an_openai_error_logged_once(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", error_boundary(_broken))
    client = await aiohttp_client(app, server_kwargs=server_options())
    caplog.set_level(logging.ERROR, logger="oaimux")
    resp = await client.post("/v1/chat/completions", data=b"{}")
    body = await resp.json()
    assert resp.status == 500
    assert resp.headers["Server"] == SERVER
    assert body["error"]["message"] == "The proxy failed to handle the request."
    assert "sk-never-shown" not in await resp.text()
    assert [r.getMessage() for r in caplog.records] == [
        "unexpected error handling POST /v1/chat/completions"
    ]
    # Anthropic's paths get Anthropic's error shape.
    resp = await client.post("/v1/messages", data=b"{}")
    assert (await resp.json())["type"] == "error"


async def test_an_http_exception_and_a_plain_answer(aiohttp_client: Any) -> None:
    app = web.Application()
    app.router.add_post("/big", error_boundary(_too_large))
    app.router.add_get("/plain", error_boundary(_plain))
    client = await aiohttp_client(app, server_kwargs=server_options())
    resp = await client.post("/big", data=b"x")
    assert resp.status == 413
    assert "error" in await resp.json()
    resp = await client.get("/plain")
    assert resp.headers["Server"] == SERVER
    assert await resp.text() == "ok"


def test_every_route_of_the_proxy_is_behind_the_boundary() -> None:
    settings = parse_settings(
        {
            "upstreams": {"u": {"url": "http://127.0.0.1:9/v1"}},
            "routes": [{"model": "*", "upstream": "u"}],
            "metrics": {"enabled": True},
        },
        environ={},
    )
    app = create_app(settings)
    routes = list(app.router.routes())
    assert len(routes) >= 8
    for route in routes:
        assert route.handler.__qualname__ == "error_boundary.<locals>.bounded", route
