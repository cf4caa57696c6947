"""Credentials never cross the proxy, and nothing a client sends picks the upstream host.

Every assertion is on what the upstream really received, as Go's ReverseProxy tests
do with a real backend (README, "What is trusted", "What is never forwarded", "What
never comes back"). Each case is an entry of (docs/faults.md, "Headers and credentials").
"""

from __future__ import annotations

import json
import logging
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestServer

from proxy.config import parse_settings
from tests.fakes.security import (
    HostileUpstream,
    error_of,
    exchange,
    running_proxy,
    split_response,
)

UPSTREAM_KEY = "sk-upstream-Zq8vPmWxTtRrKkJjHh"
CHAT = b'{"model": "gpt-4o-mini", "messages": []}'
JSON = {"Content-Type": "application/json"}

CLIENT_CREDENTIALS = {
    "Authorization": "Bearer sk-client-own-key-0001",
    "api-key": "client-azure-key-0002",
    "x-api-key": "client-anthropic-key-0003",
    "x-goog-api-key": "client-google-key-0004",
    "Cookie": "session=client-cookie-0005",
    "Proxy-Authorization": "Basic Y2xpZW50OjAwMDY=",
    "OpenAI-Organization": "org-client-0007",
    "OpenAI-Project": "proj_client_0008",
}


@pytest.fixture
def hostile() -> HostileUpstream:
    return HostileUpstream()


@pytest.fixture
def evil() -> HostileUpstream:
    """A second server no request may ever reach."""
    return HostileUpstream()


@pytest.fixture
async def hostile_url(aiohttp_server: Any, hostile: HostileUpstream) -> str:
    server: TestServer = await aiohttp_server(hostile.app())
    return str(server.make_url("/v1"))


@pytest.fixture
async def evil_server(aiohttp_server: Any, evil: HostileUpstream) -> TestServer:
    server: TestServer = await aiohttp_server(evil.app())
    return server


def config(url: str, **upstream: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "url": url,
        "headers": {"set": {"Authorization": f"Bearer {UPSTREAM_KEY}"}},
    }
    entry.update(upstream)
    return {
        "upstreams": {"up": entry},
        "routes": [
            {"model": "gpt-4o-mini", "upstream": "up"},
            {"path": "*", "upstream": "up"},
        ],
    }


@pytest.mark.parametrize(
    "injected",
    [
        {"Authorization": f"Bearer {UPSTREAM_KEY}"},
        {"api-key": UPSTREAM_KEY},  # Azure
        {"x-goog-api-key": UPSTREAM_KEY},  # Gemini's OpenAI-compatible endpoint
        {"x-api-key": UPSTREAM_KEY},  # Anthropic
    ],
    ids=["bearer", "azure", "google", "anthropic"],
)
async def test_client_credentials_never_reach_an_upstream_with_its_own(
    make_proxy: Any, hostile: HostileUpstream, hostile_url: str, injected: dict[str, str]
) -> None:
    client = await make_proxy(config(hostile_url, headers={"set": injected}))
    resp = await client.post(
        "/v1/chat/completions", data=CHAT, headers={**JSON, **CLIENT_CREDENTIALS}
    )
    assert resp.status == 200, await resp.text()
    got = hostile.received[-1]
    # The configured credential, exactly once; nothing of the client's.
    ((name, value),) = injected.items()
    assert [v for k, v in got.header_items if k.lower() == name.lower()] == [value]
    for carrier, secret in CLIENT_CREDENTIALS.items():
        if carrier.lower() != name.lower():
            assert carrier.lower() not in got.headers
        assert all(secret not in v for _, v in got.header_items)


async def test_key_bearing_query_parameters_are_dropped(
    hostile: HostileUpstream, hostile_url: str
) -> None:
    settings = parse_settings(config(hostile_url), environ={})
    query = (
        "api-version=2024-10-21&key=AIzaClientKey&API-KEY=azure-client&api_key=x"
        "&apikey=y&access_token=z&token=t&%6Bey=encoded-name&limit=20&after=file%2Dabc"
    )
    async with running_proxy(settings) as proxy:
        raw = await exchange(
            proxy.port,
            f"GET /v1/files?{query} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode(),
        )
    status, _, body = split_response(raw)
    assert status == 200
    # What is left is forwarded byte for byte, in order.
    assert json.loads(body)["raw_query"] == "api-version=2024-10-21&limit=20&after=file%2Dabc"
    for secret in ("AIzaClientKey", "azure-client", "encoded-name"):
        assert secret not in hostile.received[-1].query_string


# What pass_client_auth passes: the client's own key and the account scoping of it.
PASSED_WITH_CLIENT_AUTH = ("Authorization", "OpenAI-Organization", "OpenAI-Project")


async def test_pass_client_auth_passes_authorization_and_its_scope_only(
    make_proxy: Any, hostile: HostileUpstream, hostile_url: str
) -> None:
    client = await make_proxy(config(hostile_url, headers=None, pass_client_auth=True))
    resp = await client.post(
        "/v1/chat/completions", data=CHAT, headers={**JSON, **CLIENT_CREDENTIALS}
    )
    assert resp.status == 200
    got = hostile.received[-1]
    for carrier in CLIENT_CREDENTIALS:
        passed = [v for k, v in got.header_items if k.lower() == carrier.lower()]
        assert passed == (
            [CLIENT_CREDENTIALS[carrier]] if carrier in PASSED_WITH_CLIENT_AUTH else []
        )
    # The client's own key refused: that 401 is the client's to see, verbatim.
    resp = await client.post("/v1/refuse/401", data=b"{}", headers=CLIENT_CREDENTIALS)
    assert resp.status == 401
    assert "sk-client-own-key-0001" in (await resp.text())


async def test_configured_authorization_wins_over_pass_client_auth(
    make_proxy: Any, hostile: HostileUpstream, hostile_url: str
) -> None:
    client = await make_proxy(config(hostile_url, pass_client_auth=True))
    await client.post("/v1/chat/completions", data=CHAT, headers={**JSON, **CLIENT_CREDENTIALS})
    got = hostile.received[-1]
    assert [v for k, v in got.header_items if k.lower() == "authorization"] == [
        f"Bearer {UPSTREAM_KEY}"
    ]
    # The client's scoping never goes with the upstream's own key.
    assert "openai-organization" not in got.headers and "openai-project" not in got.headers


async def test_openai_sdk_organization_and_project_reach_a_pass_client_auth_upstream(
    make_proxy: Any, hostile: HostileUpstream, hostile_url: str
) -> None:
    upstream = {
        "headers": {"set": {"OpenAI-Project": "proj_operator"}},  # the operator's wins
        "pass_client_auth": True,
    }
    client = await make_proxy(config(hostile_url, **upstream))
    async with openai.AsyncOpenAI(
        base_url=str(client.make_url("/v1")),
        api_key="sk-client-own-key-0001",
        organization="org-client-0007",
        project="proj_client_0008",
        max_retries=0,
    ) as sdk:
        resp = await sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert resp.status_code == 200
    got = hostile.received[-1]
    sent = {
        name: [v for k, v in got.header_items if k.lower() == name]
        for name in ("authorization", "openai-organization", "openai-project")
    }
    assert sent == {
        "authorization": ["Bearer sk-client-own-key-0001"],
        "openai-organization": ["org-client-0007"],
        "openai-project": ["proj_operator"],
    }


async def test_upstream_identity_is_stripped_from_responses(
    make_proxy: Any, hostile_url: str
) -> None:
    client = await make_proxy(config(hostile_url))
    resp = await client.get("/v1/identity")
    assert resp.status == 200
    for name in (
        "Set-Cookie",
        "openai-organization",
        "openai-project",
        "Access-Control-Allow-Origin",
        "Access-Control-Allow-Credentials",
        "X-Hop-Secret",  # named in the upstream's Connection header
    ):
        assert name not in resp.headers, name
    assert resp.headers["x-request-id"] == "req_upstream_1"  # OpenAI support asks for it
    assert resp.headers["X-Plain"] == "kept"


async def test_keep_response_headers_opts_out_per_upstream(
    make_proxy: Any, hostile: HostileUpstream, hostile_url: str
) -> None:
    client = await make_proxy(
        config(hostile_url, keep_response_headers=["Set-Cookie", "OpenAI-Organization"])
    )
    resp = await client.get("/v1/identity")
    assert resp.headers.getall("Set-Cookie") == [
        "__cf_bm=upstream-session; Path=/; HttpOnly",
        "other=1; Path=/",
    ]
    assert resp.headers["openai-organization"] == "org-upstream-secret"
    assert "openai-project" not in resp.headers
    # The pooled session kept no cookie for the next client.
    client.session.cookie_jar.clear()
    await client.get("/v1/identity")
    await client.get("/v1/echo")
    assert [r.headers.get("cookie") for r in hostile.received] == [None, None, None]


@pytest.mark.parametrize("status", [401, 403])
async def test_upstream_refusing_the_injected_key_is_502_and_never_relayed(
    make_proxy: Any,
    hostile: HostileUpstream,
    hostile_url: str,
    status: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await make_proxy(config(hostile_url))
    resp = await client.post(f"/v1/refuse/{status}", data=b"{}")
    assert resp.status == 502
    assert resp.headers["x-oaimux-error"] == "upstream_auth_failed"
    body = await resp.read()
    error = error_of(body)
    assert error["type"] == "api_error" and error["code"] == "upstream_auth_failed"
    assert len(hostile.received) == 1  # reached, and not retried
    for fragment in (UPSTREAM_KEY, UPSTREAM_KEY[:8], UPSTREAM_KEY[-4:], "Incorrect API key"):
        assert fragment.encode() not in body
        assert fragment not in caplog.text
    assert any("refused" in r.getMessage() or str(status) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("api_base", "EVIL"),
        ("base_url", "EVIL"),
        ("user_config", {"api_base": "EVIL"}),
        ("extra_body", {"base_url": "EVIL"}),
    ],
)
async def test_no_body_field_changes_the_upstream(
    make_proxy: Any,
    hostile: HostileUpstream,
    hostile_url: str,
    evil: HostileUpstream,
    evil_server: TestServer,
    field: str,
    value: Any,
) -> None:
    evil_url = str(evil_server.make_url("/v1"))
    value = json.loads(json.dumps(value).replace("EVIL", evil_url))
    client = await make_proxy(config(hostile_url))
    body = json.dumps({"model": "gpt-4o-mini", field: value}).encode()
    resp = await client.post("/v1/chat/completions", data=body, headers=JSON)
    assert resp.status == 200
    assert hostile.received[-1].body == body  # forwarded untouched, to the configured host
    assert evil.received == []


async def test_no_header_changes_the_upstream(
    make_proxy: Any,
    hostile: HostileUpstream,
    hostile_url: str,
    evil: HostileUpstream,
    evil_server: TestServer,
) -> None:
    evil_host = f"127.0.0.1:{evil_server.port}"
    client = await make_proxy(config(hostile_url))
    for headers in (
        {"Host": evil_host},
        {"Host": "evil.example/?"},
        {"Host": "evil.example/#"},
        {"X-Forwarded-Host": evil_host, "X-Forwarded-Proto": "https"},
        {"Forwarded": f"host={evil_host};proto=http", "X-Forwarded-For": "6.6.6.6"},
        {"X-Real-IP": "6.6.6.6", "X-Forwarded-Port": "1", "X-Forwarded-Prefix": "/evil"},
    ):
        resp = await client.post("/v1/chat/completions", data=CHAT, headers={**JSON, **headers})
        assert resp.status == 200, headers
        got = hostile.received[-1]
        upstream_host = hostile_url.split("/")[2]
        assert got.headers["host"] == upstream_host
        for name in (
            "forwarded",
            "x-forwarded-for",
            "x-forwarded-host",
            "x-forwarded-proto",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "x-real-ip",
        ):
            assert name not in got.headers
    assert evil.received == []


@pytest.mark.parametrize(
    "path",
    [
        "/v1/../admin",
        "/v1/%2e%2e/admin",
        "/v1/%2E%2e/%2e%2E/admin",
        "/v1/files/..%2fadmin",
        "/v1/files%2F..%2F..%2Fadmin",
        "/v1/files%5c..%5cadmin",
        "/v1/files/%252e%252e/admin",
        "/v1/files/..;/admin",
        "/v1/./files",
        "/v1/files/.",
        "/v1/chat/completions/../../x",
        "/v1/files\\..\\admin",
    ],
)
async def test_paths_that_could_climb_are_refused(
    hostile: HostileUpstream, hostile_url: str, path: str
) -> None:
    settings = parse_settings(config(hostile_url + "/openai/deployments/x"), environ={})
    async with running_proxy(settings) as proxy:
        raw = await exchange(
            proxy.port,
            f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode(),
        )
    status, _, body = split_response(raw)
    assert status == 400, raw[:200]
    assert error_of(body)["code"] == "invalid_path"
    assert hostile.received == []


@pytest.mark.parametrize(
    "path",
    [
        "//127.0.0.1:9/v1/files",
        "/v1/@127.0.0.1:9/files",
        "/v1/files/a..b/%2E%2Ehidden",
        "/v1/files/file-abc%20x",
        "/v1/files/a#frag",
    ],
)
async def test_accepted_paths_stay_under_the_base_path(
    hostile: HostileUpstream, hostile_url: str, path: str
) -> None:
    base = "/v1/openai/deployments/x"
    settings = parse_settings(config(hostile_url + "/openai/deployments/x"), environ={})
    async with running_proxy(settings) as proxy:
        raw = await exchange(
            proxy.port,
            f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode(),
        )
    assert split_response(raw)[0] == 200, raw[:300]
    (got,) = hostile.received
    assert got.path.startswith(base + "/"), got.path
    assert ".." not in got.path.split("/")


async def test_absolute_form_target_is_not_a_forward_proxy_request(
    hostile: HostileUpstream, hostile_url: str, evil: HostileUpstream, evil_server: TestServer
) -> None:
    settings = parse_settings(config(hostile_url), environ={})
    evil_host = f"127.0.0.1:{evil_server.port}"
    async with running_proxy(settings) as proxy:
        for target in (f"http://{evil_host}/v1/chat/completions", f"{evil_host}:80"):
            raw = await exchange(
                proxy.port,
                f"POST {target} HTTP/1.1\r\nHost: {evil_host}\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(CHAT)}\r\nConnection: close\r\n\r\n".encode()
                + CHAT,
            )
            assert split_response(raw)[0] == 400, raw[:200]
        raw = await exchange(
            proxy.port, f"CONNECT {evil_host} HTTP/1.1\r\nHost: {evil_host}\r\n\r\n".encode()
        )
        assert split_response(raw)[0] >= 400
    assert evil.received == [] and hostile.received == []


async def test_redirects_are_relayed_never_followed(
    aiohttp_server: Any, evil: HostileUpstream, evil_server: TestServer
) -> None:
    hostile = HostileUpstream(redirect_to=str(evil_server.make_url("/v1/steal")))
    server: TestServer = await aiohttp_server(hostile.app())
    settings = parse_settings(config(str(server.make_url("/v1"))), environ={})
    async with running_proxy(settings) as proxy:
        raw = await exchange(
            proxy.port, b"GET /v1/redirect HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
    status, headers, body = split_response(raw)
    assert status == 302
    assert headers["location"] == str(evil_server.make_url("/v1/steal"))
    assert body == b"moved"
    assert len(hostile.received) == 1 and evil.received == []


async def test_hop_by_hop_headers_are_stripped_with_several_connection_headers(
    hostile: HostileUpstream, hostile_url: str
) -> None:
    """Go's TestReverseProxyStripEmptyConnection (CVE-2021-33197) and golang/go#50580."""
    settings = parse_settings(config(hostile_url), environ={})
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\n"
        "Connection: \r\n"
        "Connection: keep-alive, X-Api-Key, Authorization, X-Named\r\n"
        "X-Named: hop\r\nX-Api-Key: client-key\r\nAuthorization: Bearer client\r\n"
        "Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: gzip\r\n"
        "Trailer: X-Sum\r\nProxy-Authorization: Basic eDp5\r\n"
        "Content-Type: application/json\r\nX-Kept: yes\r\n"
        f"Content-Length: {len(CHAT)}\r\n\r\n"
    )
    async with running_proxy(settings) as proxy:
        raw = await exchange(proxy.port, head.encode() + CHAT, timeout=2)
    assert split_response(raw)[0] == 200, raw[:300]
    got = hostile.received[-1]
    for name in (
        "x-named",
        "x-api-key",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "proxy-authorization",
    ):
        assert name not in got.headers, name
    # Stripping came first: the proxy's own credential survived "Connection: Authorization".
    assert got.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert got.headers["x-kept"] == "yes"
