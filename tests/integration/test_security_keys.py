"""Proxy keys over HTTP: who gets in, which models, what is logged, what is charged."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import aiohttp
import anthropic
import pytest
from aiohttp.test_utils import TestServer

from proxy.config import parse_settings
from proxy.server.app import create_app, server_options
from tests.conftest import basic_config
from tests.fakes.openai_like import OpenAILike
from tests.fakes.security import error_of
from tests.fakes.upstream import FakeUpstream

TEAM_A = "pk-team-a-4f1d9c2e"  # may use gpt-4o* only
TEAM_B = "pk-team-b-77aa0b31"  # stored as a digest; every model
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def keyed_config(upstream_url: str, **extra: Any) -> dict[str, Any]:
    return basic_config(
        upstream_url,
        auth={
            "keys": [
                {"name": "team-a", "key": TEAM_A, "models": ["gpt-4o*"]},
                {"name": "team-b", "sha256": hashlib.sha256(TEAM_B.encode()).hexdigest()},
            ]
        },
        **extra,
    )


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer pk-team-a-4f1d9c2f"},  # one character off
        {"Authorization": f"Basic {TEAM_A}"},
        {"Authorization": "Bearer sk-upstream-secret"},  # the upstream's key is not a proxy key
        {"api-key": "pk-wrong-azure-key"},
        {"Authorization": "Bearer", "api-key": TEAM_A},  # a broken bearer is not rescued
    ],
    ids=["none", "near-miss", "basic", "upstream-key", "azure-wrong", "broken-bearer"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/gpt-4o-mini"),
        ("GET", "/about"),
        ("GET", "/v1/files"),
    ],
)
async def test_missing_or_wrong_key_is_401(
    make_proxy: Any,
    fake: FakeUpstream,
    upstream_url: str,
    headers: dict[str, str],
    method: str,
    path: str,
) -> None:
    client = await make_proxy(keyed_config(upstream_url))
    resp = await client.request(
        method, path, json=CHAT if method == "POST" else None, headers=headers
    )
    assert resp.status == 401
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["x-oaimux-error"] == "invalid_api_key"
    error = error_of(await resp.read())
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert fake.received == []


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": f"Bearer {TEAM_B}"}, {"api-key": TEAM_B}, {"x-api-key": TEAM_B}],
    ids=["bearer", "azure-api-key", "anthropic-x-api-key"],
)
async def test_valid_key_gets_in_and_never_reaches_the_upstream(
    make_proxy: Any, fake: FakeUpstream, upstream_url: str, headers: dict[str, str]
) -> None:
    client = await make_proxy(keyed_config(upstream_url))
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert resp.status == 200, await resp.text()
    (got,) = fake.received
    assert got.headers["authorization"] == "Bearer sk-upstream-secret"
    assert "api-key" not in got.headers and "x-api-key" not in got.headers
    assert all(TEAM_B not in value for _, value in got.header_items)


async def test_anthropic_sdk_key_in_x_api_key(
    make_proxy: Any, fake: FakeUpstream, upstream_url: str
) -> None:
    """Anthropic's SDK (as Claude Code) presents its key as ``x-api-key``."""
    config = keyed_config(upstream_url)
    config["routes"].append({"model": "claude-*", "upstream": "fake"})
    client = await make_proxy(config)
    base_url = str(client.make_url(""))
    async with anthropic.AsyncAnthropic(base_url=base_url, api_key=TEAM_B, max_retries=0) as sdk:
        assert sdk.auth_headers == {"X-Api-Key": TEAM_B}  # the carrier under test
        resp = await sdk.messages.with_raw_response.create(
            model="claude-test",
            max_tokens=16,
            messages=[{"role": "user", "content": "hi"}],
        )
        assert resp.status_code == 200
        # The proxy's own endpoint reads the same key.
        models = await sdk.models.list()
        assert "gpt-4o-mini" in [m.id for m in models.data]
    async with anthropic.AsyncAnthropic(
        base_url=base_url, api_key="pk-not-a-key-123456", max_retries=0
    ) as stranger:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await stranger.messages.create(
                model="claude-test",
                max_tokens=16,
                messages=[{"role": "user", "content": "hi"}],
            )
    assert refused.value.status_code == 401
    (got,) = fake.received  # the refused one never left the proxy
    assert got.path == "/v1/messages"
    assert "x-api-key" not in got.headers
    assert got.headers["authorization"] == "Bearer sk-upstream-secret"
    assert got.headers["anthropic-version"]  # the client's own protocol headers pass
    assert all(TEAM_B not in value for _, value in got.header_items)


async def test_model_outside_the_keys_list_is_403_before_any_upstream(
    make_proxy: Any, fake: FakeUpstream, upstream_url: str
) -> None:
    client = await make_proxy(keyed_config(upstream_url))
    auth = {"Authorization": f"Bearer {TEAM_A}"}
    for model in ("meta-llama/Llama-3", "fast"):  # an alias is judged by the name asked for
        resp = await client.post(
            "/v1/chat/completions", json={**CHAT, "model": model}, headers=auth
        )
        assert resp.status == 403
        assert resp.headers["x-oaimux-error"] == "model_not_allowed"
        error = error_of(await resp.read())
        assert error["code"] == "model_not_allowed" and error["param"] == "model"
        assert error["message"] == f"Your key may not use the model '{model}'."
    assert fake.received == []
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=auth)
    assert resp.status == 200
    assert len(fake.received) == 1


async def test_models_list_shows_only_what_the_key_may_use(
    make_proxy: Any, upstream_url: str
) -> None:
    client = await make_proxy(keyed_config(upstream_url))
    listed: dict[str, set[str]] = {}
    for name, key in (("a", TEAM_A), ("b", TEAM_B)):
        resp = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert resp.status == 200
        listed[name] = {m["id"] for m in (await resp.json())["data"]}
    assert listed["a"] == {"gpt-4o-mini"}
    assert {"gpt-4o-mini", "fast"} <= listed["b"]
    # Asking for one it may not use by id says "does not exist", as OpenAI does.
    resp = await client.get("/v1/models/fast", headers={"Authorization": f"Bearer {TEAM_A}"})
    assert resp.status == 404
    resp = await client.get("/v1/models/fast", headers={"Authorization": f"Bearer {TEAM_B}"})
    assert resp.status == 200


async def test_failed_attempts_are_charged_to_the_caller(
    make_proxy: Any, fake: FakeUpstream, upstream_url: str
) -> None:
    client = await make_proxy(
        keyed_config(upstream_url, rate_limit={"requests_per_minute": 0.001, "burst": 3})
    )
    statuses = []
    for i in range(5):
        resp = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer guess-{i:08d}"}
        )
        statuses.append(resp.status)
    assert statuses == [401, 401, 401, 429, 429]
    assert fake.received == []
    # A caller with a valid key has its own bucket: the guesser did not spend it.
    resp = await client.post(
        "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {TEAM_B}"}
    )
    assert resp.status == 200


async def test_logs_name_the_key_never_the_key(
    make_proxy: Any,
    upstream_url: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await make_proxy(keyed_config(upstream_url))
    for key in (TEAM_A, TEAM_B, "pk-not-a-key-123456"):
        await client.post(
            "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
        )
        await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    access = [r.getMessage() for r in caplog.records if r.name == "oaimux.access"]
    assert any("team-a" in line for line in access)
    assert any("team-b" in line for line in access)
    captured = capsys.readouterr()
    everything = caplog.text + "".join(access) + captured.out + captured.err
    for secret in (TEAM_A, TEAM_B, "pk-not-a-key-123456", "sk-upstream-secret"):
        assert secret not in everything


async def test_pass_client_auth_never_passes_a_proxy_key(
    make_proxy: Any, fake: FakeUpstream, upstream_url: str
) -> None:
    config = keyed_config(upstream_url)
    config["upstreams"]["fake"] = {"url": upstream_url, "pass_client_auth": True}
    client = await make_proxy(config)
    resp = await client.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={
            "Authorization": f"Bearer {TEAM_B}",
            "OpenAI-Organization": "org-client-0007",
            "OpenAI-Project": "proj_client_0008",
        },
    )
    assert resp.status == 200
    # No client key goes upstream, so neither does the scoping of one.
    for name in ("authorization", "openai-organization", "openai-project"):
        assert name not in fake.last.headers


async def test_browser_realtime_key_is_taken_from_the_subprotocol(
    aiohttp_client: Any, aiohttp_server: Any
) -> None:
    """Browsers cannot set headers on a WebSocket: the SDKs offer the key as the
    ``openai-insecure-api-key.<key>`` subprotocol. It is checked like any proxy
    key, and neither it nor the upstream's key crosses over
    (docs/faults.md, "A key in a WebSocket subprotocol")."""
    upstream = OpenAILike(name="rt", models=["gpt-4o-realtime-preview"])
    server: TestServer = await aiohttp_server(upstream.app())
    config = {
        "upstreams": {
            "rt": {
                "url": str(server.make_url("/v1")),
                "headers": {"set": {"Authorization": "Bearer sk-upstream-rt"}},
            }
        },
        "routes": [{"model": "gpt-4o-realtime-preview", "upstream": "rt"}],
        "auth": {"keys": [{"name": "web", "key": TEAM_B}]},
    }
    client = await aiohttp_client(
        create_app(parse_settings(config, environ={})), server_kwargs=server_options()
    )
    url = "/v1/realtime?model=gpt-4o-realtime-preview"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(
            url, protocols=("realtime", "openai-insecure-api-key.pk-wrong-0001")
        )
    assert refused.value.status == 401
    assert upstream.ws_request is None
    ws = await client.ws_connect(url, protocols=("realtime", f"openai-insecure-api-key.{TEAM_B}"))
    assert ws.protocol == "realtime"
    await ws.close()
    seen = upstream.ws_request
    assert seen is not None
    assert seen.headers["authorization"] == "Bearer sk-upstream-rt"
    assert TEAM_B not in json.dumps(seen.headers)
