"""``upstreams.<name>.query``: parameters added to every request to that
upstream (Azure's ``api-version``), replacing the client's of the same name;
their values are secrets, absent from every log line, error, /about and /metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
from aiohttp.test_utils import TestServer

from proxy.config import ConfigError, load_settings, parse_settings
from tests.conftest import MakeProxy
from tests.fakes.access_lines import capture_logs
from tests.fakes.upstream import FakeUpstream

API_VERSION = "2025-04-01-preview-QUERYSECRET-61c2"
SIGNED = "sig/+= QUERYSECRET&x"  # needs encoding: '/', '+', '=', ' ', '&'
SECRET_MARK = "QUERYSECRET"


@pytest.fixture
async def upstream_server(aiohttp_server: Any, fake: FakeUpstream) -> TestServer:
    """The fake without its own access log: its lines show what the proxy sent,
    query included; only the proxy's lines are searched for the values."""
    server: TestServer = await aiohttp_server(fake.app(), access_log=None)
    return server


def config(upstream_url: str) -> dict[str, Any]:
    return {
        "upstreams": {
            "azure": {
                "url": upstream_url,
                "headers": {"set": {"api-key": "sk-azure-upstream-0001"}},
                "query": {"api-version": API_VERSION, "sig": SIGNED},
            },
            "down": {
                "url": "http://127.0.0.1:9/openai",
                "query": {"api-version": API_VERSION},
            },
            "plain": {"url": upstream_url},
        },
        "routes": [
            {"model": "gpt-4o", "upstream": "azure"},
            {"model": "plain-model", "upstream": "plain"},
            {"model": "dead", "upstream": "down"},
            {"model": "fallback", "upstream": ["down", "azure"]},
            {"path": "*", "upstream": "azure"},
        ],
    }


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def sent_query(fake: FakeUpstream) -> list[tuple[str, str]]:
    return parse_qsl(fake.last.query_string, keep_blank_values=True)


async def test_the_query_reaches_the_upstream_and_replaces_the_clients(
    make_proxy: MakeProxy, fake: FakeUpstream, upstream_url: str
) -> None:
    client = await make_proxy(config(upstream_url))
    added = [("api-version", API_VERSION), ("sig", SIGNED)]

    resp = await client.post("/v1/chat/completions", json=chat("gpt-4o"))
    assert resp.status == 200
    assert sent_query(fake) == added
    assert fake.last.path == "/v1/chat/completions"

    # The client's api-version is replaced, its other parameters kept, in order.
    resp = await client.get("/v1/files?purpose=batch&api-version=2020-01-01&limit=2")
    assert resp.status == 200
    assert sent_query(fake) == [("purpose", "batch"), ("limit", "2"), *added]

    # An encoded name is the same name.
    resp = await client.get("/v1/files?api%2Dversion=old")
    assert resp.status == 200
    assert sent_query(fake) == added

    resp = await client.post("/v1/chat/completions", json=chat("fallback", stream=True))
    assert resp.status == 200
    await resp.read()
    assert sent_query(fake) == added

    # Another upstream gets the client's query as it came.
    resp = await client.post("/v1/chat/completions?a=1&a=2", json=chat("plain-model"))
    assert resp.status == 200
    assert fake.last.query_string == "a=1&a=2"


async def test_a_client_name_in_another_case_is_replaced_not_sent_twice(
    make_proxy: MakeProxy, fake: FakeUpstream, upstream_url: str
) -> None:
    """Names compare as the inbound vetting reads them: percent-decoded and in
    any case, so the upstream never gets two api-versions to choose from."""
    settings = config(upstream_url)
    settings["upstreams"]["azure"]["query"] = {"Api-Version": API_VERSION}
    client = await make_proxy(settings)
    resp = await client.get("/v1/files?API-Version=old&limit=2&api%2dVERSION=older")
    assert resp.status == 200
    assert sent_query(fake) == [("limit", "2"), ("Api-Version", API_VERSION)]


async def test_model_discovery_sends_the_query_too(
    make_proxy: MakeProxy, fake: FakeUpstream, upstream_url: str
) -> None:
    cfg = config(upstream_url)
    cfg["routes"] = [{"models": "discover", "upstream": "azure"}]
    client = await make_proxy(cfg)
    resp = await client.get("/v1/models")
    assert resp.status == 200
    models = [r for r in fake.received if r.path == "/v1/models"]
    assert models and all(
        parse_qsl(r.query_string) == [("api-version", API_VERSION), ("sig", SIGNED)] for r in models
    )


async def test_query_values_are_in_no_log_line_error_about_or_metrics(
    make_proxy: MakeProxy, fake: FakeUpstream, upstream_url: str
) -> None:
    pages: list[str] = []
    with capture_logs() as logs:
        client = await make_proxy(config(upstream_url))
        calls = [
            ("POST", "/v1/chat/completions", chat("gpt-4o")),
            ("POST", "/v1/chat/completions", chat("gpt-4o", stream=True)),
            ("POST", "/v1/chat/completions", chat("dead")),  # 502: the walk's words
            ("POST", "/v1/chat/completions", chat("fallback")),
            ("GET", "/v1/files?api-version=x", None),
            ("GET", "/v1/missing/status/404", None),
        ]
        for method, path, body in calls:
            resp = await client.request(method, path, json=body)
            text = await resp.text()
            if "x-oaimux-error" in resp.headers:  # the proxy's own answer (the fake echoes)
                pages.append(text)
        fake.status_override = 401  # the upstream refuses our key: logged as an error
        resp = await client.post("/v1/chat/completions", json=chat("gpt-4o"))
        assert resp.status == 502
        pages.append(await resp.text())
        await logs.wait_for(len(calls) + 1)
        for page in ("/about", "/metrics"):
            resp = await client.get(page)
            assert resp.status == 200
            pages.append(await resp.text())

    assert API_VERSION in fake.received[0].query_string  # the value was really in play
    assert any("127.0.0.1:9" in page for page in pages)  # the dead upstream's error is there
    for text in logs.everything + pages:
        assert SECRET_MARK not in text, f"a query value leaked: {text[:300]!r}"


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        (["api-version"], "upstreams.azure.query: expected a mapping"),
        ({"api-version": ["QUERYSECRET"]}, "upstreams.azure.query.api-version: expected a string, got a list"),
        ({"": "x"}, "upstreams.azure.query: query parameter names must be non-empty strings"),
    ],
)  # fmt: skip
def test_a_bad_query_names_the_key_path_and_never_the_value(query: object, problem: str) -> None:
    cfg = {
        "upstreams": {"azure": {"url": "http://127.0.0.1:1/v1", "query": query}},
        "routes": [{"default": True, "upstream": "azure"}],
    }
    with pytest.raises(ConfigError) as caught:
        parse_settings(cfg, environ={})
    assert problem in str(caught.value)
    assert SECRET_MARK not in str(caught.value)


def test_an_unquoted_date_or_number_is_taken_as_written(tmp_path: Path) -> None:
    # YAML reads `api-version: 2024-10-21` as a date; it is sent as written.
    path = tmp_path / "routes.yaml"
    path.write_text(
        "upstreams:\n"
        "  azure:\n"
        "    url: http://127.0.0.1:1/v1\n"
        "    query: {api-version: 2024-10-21, n: 2}\n"
        "routes:\n"
        "  - {default: true, upstream: azure}\n"
    )
    upstream = load_settings(str(path), environ={}).upstreams["azure"]
    assert [(k, v.value) for k, v in upstream.query] == [("api-version", "2024-10-21"), ("n", "2")]
    assert "2024-10-21" not in repr(upstream)
