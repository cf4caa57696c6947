"""Fixtures: a real in-process fake upstream and the proxy in front of it.

``make_proxy(config)`` builds the proxy from a config mapping (as routes.yaml
would hold it); the upstream URL placeholder ``{upstream}`` is replaced by the
fake upstream's base URL (``http://127.0.0.1:PORT/v1``).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.config import Settings, parse_settings
from proxy.server.app import create_app, server_options
from tests.fakes.upstream import FakeUpstream

MakeProxy = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
ServeConfig = Callable[[dict[str, Any]], Awaitable[TestClient[web.Request, web.Application]]]

# redis_server and redis_client fixtures: a real redis-server, and a client of it.
pytest_plugins = ["tests.redis_server"]


async def serve_proxy(
    aiohttp_client: Any, config: dict[str, Any]
) -> TestClient[web.Request, web.Application]:
    """The proxy for ``config`` (a routes.yaml mapping) behind a test client,
    served with the same runner options as ``oaimux serve``."""
    app = create_app(parse_settings(config, environ={}))
    client: TestClient[web.Request, web.Application] = await aiohttp_client(
        app, server_kwargs=server_options()
    )
    return client


@pytest.fixture
def serve_config(aiohttp_client: Any) -> ServeConfig:
    """``await serve_config(config)``: :func:`serve_proxy` for a whole config,
    with no fake upstream of this file started for it."""
    return functools.partial(serve_proxy, aiohttp_client)


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
async def upstream_server(aiohttp_server: Any, fake: FakeUpstream) -> TestServer:
    # The fake records the raw bytes it was sent, compressed or not.
    server: TestServer = await aiohttp_server(fake.app(), auto_decompress=False)
    return server


@pytest.fixture
def upstream_url(upstream_server: TestServer) -> str:
    return str(upstream_server.make_url("/v1"))


def basic_config(upstream_url: str, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "upstreams": {
            "fake": {
                "url": upstream_url,
                "headers": {"set": {"Authorization": "Bearer sk-upstream-secret"}},
            }
        },
        "routes": [
            {"model": "gpt-4o-mini", "upstream": "fake"},
            {"model": "fast", "upstream": "fake", "rewrite_model": "llama3.2:3b"},
            {"model": "meta-llama/*", "upstream": "fake"},
        ],
    }
    config.update(extra)
    return config


@pytest.fixture
def make_settings(upstream_url: str) -> Callable[..., Settings]:
    def make(config: dict[str, Any] | None = None, **extra: Any) -> Settings:
        return parse_settings(
            config if config is not None else basic_config(upstream_url, **extra), environ={}
        )

    return make


@pytest.fixture
def make_proxy_server(
    aiohttp_server: Any, make_settings: Callable[..., Settings]
) -> Callable[..., Awaitable[TestServer]]:
    """The proxy on a real loopback port, with the same server options as ``oaimux serve``.

    (``TestServer`` ignores constructor kwargs; runner options go to ``start_server``,
    which the ``aiohttp_server`` fixture forwards.)
    """

    async def make(config: dict[str, Any] | None = None, **extra: Any) -> TestServer:
        app = create_app(make_settings(config, **extra))
        server: TestServer = await aiohttp_server(app, **server_options())
        return server

    return make


@pytest.fixture
def make_proxy(
    aiohttp_client: Any, make_proxy_server: Callable[..., Awaitable[TestServer]]
) -> MakeProxy:
    async def make(
        config: dict[str, Any] | None = None, **extra: Any
    ) -> TestClient[web.Request, web.Application]:
        server = await make_proxy_server(config, **extra)
        client: TestClient[web.Request, web.Application] = await aiohttp_client(server)
        return client

    return make


@pytest.fixture
def aiohttp_client(aiohttp_client: Any, aiohttp_server: Any) -> Any:
    """pytest-aiohttp's ``aiohttp_client``, but ``server_kwargs`` reach the runner.

    ``TestServer`` drops constructor keyword arguments; runner options such as
    ``auto_decompress=False`` only take effect through ``start_server``, which
    ``aiohttp_server`` forwards. So ``aiohttp_client(app, server_kwargs=server_options())``
    really serves ``app`` as ``oaimux serve`` does.
    """

    async def go(app: Any, *, server_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        if server_kwargs and isinstance(app, web.Application):
            app = await aiohttp_server(app, **server_kwargs)
        return await aiohttp_client(app, **kwargs)

    return go
