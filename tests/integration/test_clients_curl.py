"""curl through oaimux, as the README's "Clients" section and Quickstart show it:
a chat completion, a streamed one and embeddings, each relayed byte for byte."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from tests.clients.harness import (
    PROXY_KEY,
    UPSTREAM_KEY,
    client_env,
    proxy_config,
    run_client,
    skip_or_fail,
)
from tests.conftest import serve_proxy
from tests.fakes.openai_like import OpenAILike


async def test_curl_chat_stream_and_embeddings(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    curl = shutil.which("curl")
    if curl is None:
        skip_or_fail("curl is not on PATH")
    assert curl is not None
    upstream = OpenAILike(name="openai")
    upstream_server: TestServer = await aiohttp_server(upstream.app())
    proxy: TestClient[Any, Any] = await serve_proxy(aiohttp_client, proxy_config(upstream_server))
    env = client_env(tmp_path)

    async def post(path: str, body: dict[str, Any]) -> str:
        out, _ = await run_client(
            [curl, "-sS", "--fail-with-body", "--no-buffer", str(proxy.make_url(f"/v1/{path}")),
             "-H", f"Authorization: Bearer {PROXY_KEY}", "-H", "Content-Type: application/json",
             "-d", json.dumps(body)],
            env,
            timeout=30,
        )  # fmt: skip
        assert out.encode() == upstream.sent[f"/v1/{path}"]  # relayed byte for byte
        return out

    messages = [{"role": "user", "content": "Hello"}]
    chat = json.loads(
        await post("chat/completions", {"model": "gpt-4o-mini", "messages": messages})
    )
    assert chat["choices"][0]["message"]["content"] == "hello from openai"

    streamed = await post(
        "chat/completions", {"model": "gpt-4o-mini", "messages": messages, "stream": True}
    )
    events = [e.removeprefix("data: ") for e in streamed.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert deltas == ["Hel", "lo", " there", "!", None]

    embedded = json.loads(
        await post("embeddings", {"model": "text-embedding-3-small", "input": ["one", "two"]})
    )
    assert [e["embedding"] for e in embedded["data"]] == [[0.0, -0.5, 0.25], [0.001, -0.5, 0.25]]

    assert len(upstream.received) == 3
    for r in upstream.received:
        assert r.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert r.headers["user-agent"].startswith("curl/")
