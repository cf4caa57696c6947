"""The proxy's own endpoints: /v1/models, /v1/models/{id}, /about, /healthz."""

from __future__ import annotations

from typing import Any

from tests.conftest import basic_config


async def test_models_lists_exact_ids_and_aliases(make_proxy: Any, upstream_url: str) -> None:
    config = basic_config(upstream_url)
    config["routes"].append({"model": "gpt-4o-mini", "upstream": "fake"})  # listed once
    client = await make_proxy(config)
    for path in ("/v1/models", "/models"):
        resp = await client.get(path)
        assert resp.status == 200
        body = await resp.json()
        assert body["object"] == "list"
        assert [m["id"] for m in body["data"]] == ["gpt-4o-mini", "fast"]
        assert all(m["object"] == "model" and isinstance(m["created"], int) for m in body["data"])


async def test_model_by_id_including_slashes(make_proxy: Any) -> None:
    client = await make_proxy()
    resp = await client.get("/v1/models/fast")
    assert resp.status == 200
    assert (await resp.json())["id"] == "fast"
    resp = await client.get("/v1/models/meta-llama/Meta-Llama-3-70B-Instruct")
    assert resp.status == 200
    assert (await resp.json())["id"] == "meta-llama/Meta-Llama-3-70B-Instruct"
    resp = await client.get("/v1/models/nope")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "model_not_found"


async def test_about_has_counts_and_no_secrets(make_proxy: Any, upstream_url: str) -> None:
    client = await make_proxy()
    resp = await client.get("/about")
    assert resp.status == 200
    text = await resp.text()
    body = await resp.json()
    assert body["name"] == "oaimux"
    assert body["upstreams"] == 1 and body["routes"] == 3
    assert body["uptime_seconds"] >= 0
    assert "sk-upstream-secret" not in text
    assert upstream_url not in text and "127.0.0.1" not in text


async def test_healthz(make_proxy: Any) -> None:
    client = await make_proxy()
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert (await resp.json()) == {"status": "ok"}
