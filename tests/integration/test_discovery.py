"""``models: discover``: two real fake upstreams list their models.

Upstream ``local`` (an Ollama-like server, ids under the ``local/`` prefix)
and upstream ``cloud`` (ids as they are, with the proxy's key injected).
The behaviour: (README, "Model discovery (`models: discover`)").
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.config import parse_settings
from proxy.server.app import create_app, server_options
from proxy.server.keys import DISCOVERY, RUNTIME
from tests.fakes.openai_like import OpenAILike

ROOT = Path(__file__).resolve().parents[2]
CLOUD_KEY = "sk-cloud-discovery-secret"


@pytest.fixture
def local() -> OpenAILike:
    return OpenAILike(name="local", models=["llama3.2:3b", "qwen2.5:7b"])


@pytest.fixture
def cloud() -> OpenAILike:
    return OpenAILike(name="cloud", models=["mistral-small", "gpt-4o-mini", "llama3.2:3b"])


@pytest.fixture
async def servers(
    aiohttp_server: Any, local: OpenAILike, cloud: OpenAILike
) -> tuple[TestServer, TestServer]:
    return await aiohttp_server(local.app()), await aiohttp_server(cloud.app())


def config(servers: tuple[TestServer, TestServer], **extra: Any) -> dict[str, Any]:
    local_server, cloud_server = servers
    cfg: dict[str, Any] = {
        "upstreams": {
            "local": {"url": str(local_server.make_url("/v1"))},
            "cloud": {
                "url": str(cloud_server.make_url("/v1")),
                "headers": {"set": {"Authorization": f"Bearer {CLOUD_KEY}"}},
            },
        },
        "routes": [
            {"model": "gpt-4o", "upstream": "cloud"},
            {"models": "discover", "upstream": "local", "prefix": "local/"},
            {"models": "discover", "upstream": "cloud"},
        ],
    }
    cfg.update(extra)
    return cfg


async def start(
    aiohttp_client: Any, cfg: dict[str, Any], *, retry_every: float = 60.0, timeout: float = 10.0
) -> TestClient[web.Request, web.Application]:
    app = create_app(parse_settings(cfg, environ={}))
    app[DISCOVERY].retry_every = retry_every
    app[DISCOVERY].timeout = timeout
    client: TestClient[web.Request, web.Application] = await aiohttp_client(
        app, server_kwargs=server_options()
    )
    return client


async def discovered(proxy: TestClient[Any, Any], wait: float = 5.0) -> None:
    async with asyncio.timeout(wait):
        await proxy.app[DISCOVERY].complete.wait()


async def model_ids(proxy: TestClient[Any, Any]) -> list[str]:
    resp = await proxy.get("/v1/models")
    assert resp.status == 200
    return [m["id"] for m in (await resp.json())["data"]]


async def chat(proxy: TestClient[Any, Any], model: str) -> aiohttp.ClientResponse:
    return await proxy.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
    )


async def test_discovered_ids_are_listed_and_routed_with_the_prefix_stripped(
    aiohttp_client: Any,
    servers: tuple[TestServer, TestServer],
    local: OpenAILike,
    cloud: OpenAILike,
) -> None:
    proxy = await start(aiohttp_client, config(servers))
    await discovered(proxy)
    assert await model_ids(proxy) == [
        "gpt-4o",
        "local/llama3.2:3b",
        "local/qwen2.5:7b",
        "mistral-small",
        "gpt-4o-mini",
        "llama3.2:3b",
    ]
    # The discovery request carried the upstream's own credential.
    asked = [r for r in cloud.received if r.path == "/v1/models"]
    assert asked and asked[0].headers["authorization"] == f"Bearer {CLOUD_KEY}"

    resp = await chat(proxy, "local/qwen2.5:7b")
    assert resp.status == 200, await resp.text()
    assert local.last.path == "/v1/chat/completions"
    assert b'"model": "qwen2.5:7b"' in local.last.body  # prefix stripped before forwarding
    assert (await resp.json())["model"] == "qwen2.5:7b"

    # The same upstream id without the prefix is the other upstream's.
    resp = await chat(proxy, "llama3.2:3b")
    assert resp.status == 200
    assert cloud.last.path == "/v1/chat/completions"
    assert cloud.last.headers["authorization"] == f"Bearer {CLOUD_KEY}"

    resp = await proxy.get("/v1/models/local/llama3.2:3b")
    assert resp.status == 200
    assert (await resp.json())["id"] == "local/llama3.2:3b"

    resp = await chat(proxy, "local/not-there")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "model_not_found"


async def test_a_failing_upstream_does_not_block_start_up_and_is_asked_again(
    aiohttp_client: Any,
    servers: tuple[TestServer, TestServer],
    local: OpenAILike,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="oaimux.discovery")
    local.models_status = 503
    proxy = await start(aiohttp_client, config(servers), retry_every=0.05)
    # Serving at once; the healthy upstream's ids arrive, the failing one's do not.
    assert (await proxy.get("/healthz")).status == 200
    async with asyncio.timeout(5):
        while "mistral-small" not in await model_ids(proxy):
            await asyncio.sleep(0.01)  # bounded polling of a background task
        while local.models_asked < 5:
            await asyncio.sleep(0.01)
    assert not proxy.app[DISCOVERY].complete.is_set()
    assert not any(m.startswith("local/") for m in await model_ids(proxy))
    assert (await chat(proxy, "local/llama3.2:3b")).status == 404
    # Five failed attempts, one warning: the same failure is not repeated.
    about_local = [r for r in caplog.records if "upstream local" in r.getMessage()]
    assert [r.levelno for r in about_local] == [logging.WARNING]
    assert "upstream local: failed: GET /models answered HTTP 503" in about_local[0].getMessage()

    local.models_status = 200
    await discovered(proxy)
    assert "local/llama3.2:3b" in await model_ids(proxy)
    assert (await chat(proxy, "local/llama3.2:3b")).status == 200
    about_local = [r.getMessage() for r in caplog.records if "upstream local" in r.getMessage()]
    assert len(about_local) == 3, about_local
    assert "upstream local: recovered after" in about_local[1]
    assert "upstream local lists 2 models" in about_local[2]


async def test_an_unreachable_or_silent_upstream_times_out_without_blocking(
    aiohttp_client: Any,
    aiohttp_server: Any,
    servers: tuple[TestServer, TestServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    never = asyncio.Event()

    async def silent_models(request: web.Request) -> web.Response:
        await never.wait()
        raise AssertionError("unreachable")

    silent_app = web.Application()
    silent_app.router.add_get("/v1/models", silent_models)
    silent = await aiohttp_server(silent_app)
    cfg = config(servers)
    cfg["upstreams"]["local"]["url"] = str(silent.make_url("/v1"))
    proxy = await start(aiohttp_client, cfg, timeout=0.2)
    async with asyncio.timeout(5):
        while "upstream local: failed: no complete answer within 0.2 seconds" not in caplog.text:
            await asyncio.sleep(0.01)
    assert "mistral-small" in await model_ids(proxy)
    never.set()


async def test_refresh_keeps_known_ids_and_asks_again(
    aiohttp_client: Any,
    servers: tuple[TestServer, TestServer],
    local: OpenAILike,
) -> None:
    cfg = config(servers)
    proxy = await start(aiohttp_client, cfg)
    await discovered(proxy)
    asked = local.models_asked
    # What SIGHUP does (serve.py): swap the new config, then refresh discovery.
    local.models = ["llama3.2:3b", "phi4:14b"]
    cfg["routes"][1]["prefix"] = "ollama/"
    new = parse_settings(cfg, environ={})
    holder = proxy.app[RUNTIME]
    discovery = proxy.app[DISCOVERY]
    discovery.refresh(new)
    # At once, before any answer: the ids known for the same upstream, new prefix.
    ids = await model_ids(proxy)
    assert "ollama/qwen2.5:7b" in ids and "local/qwen2.5:7b" not in ids
    assert holder.current.settings is new
    await discovered(proxy)
    assert local.models_asked == asked + 1
    ids = await model_ids(proxy)
    assert "ollama/phi4:14b" in ids and "ollama/qwen2.5:7b" not in ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_sighup_reload_discovers_again(
    servers: tuple[TestServer, TestServer], local: OpenAILike, tmp_path: Path
) -> None:
    """The real process: start with a failing upstream, fix it, SIGHUP, see its ids."""
    local_server, cloud_server = servers
    port = free_port()
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        "server: {host: 127.0.0.1}\n"
        f"upstreams:\n  local: {{url: '{local_server.make_url('/v1')}'}}\n"
        f"  cloud: {{url: '{cloud_server.make_url('/v1')}'}}\n"
        "routes:\n"
        "  - {models: discover, upstream: local, prefix: 'local/'}\n"
    )
    local.models = ["first-model"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OAIMUX_", "PORT"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(routes), "--port", str(port),
        cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    stderr = asyncio.ensure_future(proc.stderr.read())
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def ids() -> list[str]:
                async with session.get(f"{base}/v1/models") as resp:
                    return [m["id"] for m in (await resp.json())["data"]]

            async with asyncio.timeout(20):
                while True:  # bounded polling of a starting process
                    if proc.returncode is not None:
                        pytest.fail((await stderr).decode())
                    try:
                        if await ids() == ["local/first-model"]:
                            break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.05)
            local.models = ["second-model"]
            routes.write_text(
                routes.read_text() + "  - {models: discover, upstream: cloud, prefix: 'c/'}\n"
            )
            proc.send_signal(signal.SIGHUP)
            want = ["local/second-model", "c/mistral-small", "c/gpt-4o-mini", "c/llama3.2:3b"]
            async with asyncio.timeout(20):
                while await ids() != want:
                    await asyncio.sleep(0.05)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            code = await proc.wait()
            log = (await stderr).decode()
    assert code == 0, log
    assert "model discovery: upstream cloud lists 3 models" in log


async def test_no_discover_route_means_no_discovery(
    aiohttp_client: Any, servers: tuple[TestServer, TestServer], local: OpenAILike
) -> None:
    cfg = config(servers)
    cfg["routes"] = [{"model": "gpt-4o", "upstream": "local"}]
    proxy = await start(aiohttp_client, cfg)
    await discovered(proxy, wait=1)
    assert local.models_asked == 0
    assert await model_ids(proxy) == ["gpt-4o"]


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"object": "list"}',
        b'{"data": "nope"}',
        b"[1, 2]",
    ],
)
async def test_a_malformed_model_list_is_a_warning_not_a_crash(
    aiohttp_client: Any,
    aiohttp_server: Any,
    servers: tuple[TestServer, TestServer],
    caplog: pytest.LogCaptureFixture,
    body: bytes,
) -> None:
    async def models(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    odd = web.Application()
    odd.router.add_get("/v1/models", models)
    odd_server = await aiohttp_server(odd)
    cfg = config(servers)
    cfg["upstreams"]["local"]["url"] = str(odd_server.make_url("/v1"))
    caplog.set_level(logging.INFO)
    proxy = await start(aiohttp_client, cfg)
    async with asyncio.timeout(5):
        while "model discovery: upstream local: failed" not in caplog.text:
            await asyncio.sleep(0.01)
    assert "mistral-small" in await model_ids(proxy)
