"""The Vercel AI SDK (npm ``ai`` + ``@ai-sdk/openai``) through oaimux, set up with
``createOpenAI({ baseURL })`` as the README's "Clients" section says.

Node runs tests/node/ai_sdk_smoke.mjs against the proxy on a loopback port, the
proxy forwards to the fake OpenAI upstream: a chat completion, a streamed one
(several text deltas), the Responses API (what a bare ``openai("model")`` uses)
and embeddings. The packages come from tests/node/package-lock.json (``npm ci``,
which .ci/run does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.clients.harness import (
    NODE_DIR,
    PROXY_KEY,
    UPSTREAM_KEY,
    client_env,
    last_json_line,
    node_with,
    proxy_config,
    run_client,
)
from tests.conftest import serve_proxy
from tests.fakes.openai_like import OpenAILike

pytestmark = [pytest.mark.node, pytest.mark.slow]


async def test_vercel_ai_sdk_create_openai_base_url(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    node = node_with("ai")
    upstream = OpenAILike(name="openai")
    upstream_server: TestServer = await aiohttp_server(upstream.app())
    proxy: TestClient[Any, Any] = await serve_proxy(aiohttp_client, proxy_config(upstream_server))

    out, _ = await run_client(
        [node, str(NODE_DIR / "ai_sdk_smoke.mjs"), str(proxy.make_url("/v1")), PROXY_KEY],
        client_env(tmp_path),
        cwd=NODE_DIR,
    )
    seen = last_json_line(out)
    assert seen["chat"] == "hello from openai"
    assert seen["streamError"] is None
    assert seen["stream"] == ["Hel", "lo", " there", "!"]
    assert seen["responses"] == "In a peaceful grove..."
    assert len(seen["embeddings"]) == 2
    for got, want in zip(seen["embeddings"], [[0.0, -0.5, 0.25], [0.001, -0.5, 0.25]], strict=True):
        assert got == pytest.approx(want)

    paths = [r.path for r in upstream.received]
    assert paths == [
        "/v1/chat/completions",
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/embeddings",
    ]
    for r in upstream.received:
        assert r.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert "ai-sdk/" in r.headers["user-agent"], r.headers["user-agent"]
