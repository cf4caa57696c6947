"""The official ``openai`` npm package, pointed at the proxy (README, "Clients").

The proxy and the fake upstream listen on real loopback ports; Node runs
tests/node/sdk_smoke.mjs against the proxy's base URL (chat stream, models
list, error classes) and prints what it saw as JSON. The package comes from
tests/node/package-lock.json (``npm ci``, which .ci/run does).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.config import parse_settings
from proxy.server.app import create_app, server_options
from tests.fakes.openai_like import OpenAILike

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
PROXY_KEY = "sk-oaimux-node-0001"
UPSTREAM_KEY = "sk-upstream-node-secret"

pytestmark = pytest.mark.node


def node_or_skip() -> str:
    node = shutil.which("node")
    installed = (NODE_DIR / "node_modules" / "openai" / "package.json").is_file()
    if node is not None and installed:
        return node
    missing = "node is not on PATH" if node is None else "the openai npm package is not installed"
    if os.environ.get("CI"):
        pytest.fail(
            f"{missing}; CI must run the Node SDK test (.ci/run does `npm ci` in tests/node)"
        )
    pytest.skip(f"{missing}: run `npm ci` in tests/node (needs node and npm) to run this test")


async def test_node_sdk_chat_stream_and_models_list(
    aiohttp_client: Any, aiohttp_server: Any
) -> None:
    node = node_or_skip()
    upstream = OpenAILike(name="openai")
    upstream_server: TestServer = await aiohttp_server(upstream.app())
    cfg = {
        "upstreams": {
            "openai": {
                "url": str(upstream_server.make_url("/v1")),
                "headers": {"set": {"Authorization": f"Bearer {UPSTREAM_KEY}"}},
            }
        },
        "routes": [
            {"model": "gpt-4o-mini", "upstream": "openai"},
            {"model": "gpt-4o", "upstream": "openai"},
        ],
        "auth": {"keys": [{"name": "node", "key": PROXY_KEY}]},
    }
    proxy: TestClient[web.Request, web.Application] = await aiohttp_client(
        create_app(parse_settings(cfg, environ={})), server_kwargs=server_options()
    )
    proc = await asyncio.create_subprocess_exec(
        node, str(NODE_DIR / "sdk_smoke.mjs"), str(proxy.make_url("/v1")), PROXY_KEY,
        cwd=NODE_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    seen = json.loads(out.decode().strip().splitlines()[-1])
    assert "".join(seen["deltas"]) == "Hello there!"
    assert seen["models"] == ["gpt-4o-mini", "gpt-4o"]
    assert seen["notFound"] == {"isNotFoundError": True, "status": 404, "code": "model_not_found"}
    assert seen["unauthorized"] == {"isAuthenticationError": True, "status": 401}
    chat = [r for r in upstream.received if r.path == "/v1/chat/completions"]
    assert len(chat) == 1  # the unknown model never left the proxy
    assert chat[0].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert chat[0].headers["user-agent"].startswith("OpenAI/JS")
