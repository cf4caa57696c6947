"""Fixtures: a real in-process fake upstream and the proxy in front of it.

``make_proxy(config)`` builds the proxy from a config mapping (as routes.yaml
would hold it); the upstream URL placeholder ``{upstream}`` is replaced by the
fake upstream's base URL (``http://127.0.0.1:PORT/v1``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import create_app, server_options
from proxy.config import Settings, parse_settings
from tests.fakes.upstream import FakeUpstream

MakeProxy = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
async def upstream_server(aiohttp_server: Any, fake: FakeUpstream) -> TestServer:
    server: TestServer = await aiohttp_server(fake.app())
    return server


@pytest.fixture
def upstream_url(upstream_server: TestServer) -> str:
    return str(upstream_server.make_url("/v1"))


def basic_config(upstream_url: str, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "upstreams": {"fake": {"url": upstream_url, "headers": {"set": {"Authorization": "Bearer sk-upstream-secret"}}}},
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
        return parse_settings(config if config is not None else basic_config(upstream_url, **extra), environ={})

    return make


@pytest.fixture
def make_proxy(aiohttp_client: Any, make_settings: Callable[..., Settings]) -> MakeProxy:
    async def make(config: dict[str, Any] | None = None, **extra: Any) -> TestClient[web.Request, web.Application]:
        app = create_app(make_settings(config, **extra))
        client: TestClient[web.Request, web.Application] = await aiohttp_client(
            app, server_kwargs=server_options()
        )
        return client

    return make
