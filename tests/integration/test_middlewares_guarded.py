"""``guarded(view)`` answers exactly as ``error_middleware`` does, for an app
without middleware (aiohttp then skips its middleware chain; issue 8)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from proxy.errors import NotFound, RateLimited
from proxy.middlewares import error_middleware, guarded

View = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def proxy_error(request: web.Request) -> web.StreamResponse:
    raise NotFound("Nothing here.", code="unknown_url")


async def limited(request: web.Request) -> web.StreamResponse:
    raise RateLimited("Slow down.", headers={"Retry-After": "3"})


async def aiohttp_error(request: web.Request) -> web.StreamResponse:
    raise web.HTTPRequestEntityTooLarge(max_size=10, actual_size=20)


async def redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/elsewhere")


async def bug(request: web.Request) -> web.StreamResponse:
    raise RuntimeError("a bug with a secret sk-do-not-show")


async def gone(request: web.Request) -> web.StreamResponse:
    # Not answered by us: aiohttp's own handling (a 500 page, logged) either way.
    raise ConnectionResetError("the client left")


async def fine(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok")


async def answer(aiohttp_client: Any, app: web.Application) -> tuple[int, dict[str, str], bytes]:
    client = await aiohttp_client(app)
    resp = await client.get("/x", allow_redirects=False)
    body = await resp.read()
    kept = ("Content-Type", "x-oaimux-error", "Retry-After", "Location")
    return resp.status, {h: resp.headers[h] for h in kept if h in resp.headers}, body


@pytest.mark.parametrize("view", [proxy_error, limited, aiohttp_error, redirect, bug, gone, fine])
async def test_guarded_answers_as_the_middleware_does(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture, view: View
) -> None:
    with_middleware = web.Application(middlewares=[error_middleware])
    with_middleware.router.add_get("/x", view)
    without = web.Application()
    without.router.add_get("/x", guarded(view))

    with caplog.at_level(logging.ERROR, logger="oaimux"):
        expected = await answer(aiohttp_client, with_middleware)
        logged_by_middleware = [r.getMessage() for r in caplog.records]
        caplog.clear()
        got = await answer(aiohttp_client, without)
        logged_by_guard = [r.getMessage() for r in caplog.records]

    assert got == expected
    assert logged_by_guard == logged_by_middleware
    if view is bug:
        assert expected[0] == 500 and b"sk-do-not-show" not in expected[2]
        assert logged_by_guard == ["unexpected error handling GET /x"]
    if view is redirect:
        assert expected[0] == 302
    if view is gone:
        assert "x-oaimux-error" not in expected[1]
