"""No secret, header value or body ever reaches a log line or /metrics.

Recognisable values are configured (upstream key, a custom header's value,
proxy keys) and sent (client credentials, body canaries); then every record of
every logger, at DEBUG, and the whole /metrics page are searched for them.
"""

from __future__ import annotations

from typing import Any

from tests.conftest import MakeProxy
from tests.fakes.access_lines import capture_logs
from tests.fakes.upstream import FakeUpstream

UPSTREAM_KEY = "sk-upstream-SECRET-4f1c9e"
HEADER_VALUE = "org-header-SECRET-77aa"
PROXY_KEY = "sk-proxy-SECRET-team-b-9182"
CLIENT_KEY = "sk-client-SECRET-not-for-upstream"
AZURE_KEY = "azure-api-key-SECRET-5150"
BODY_CANARY = "BODY-CANARY-8c1d"
SECRETS = [UPSTREAM_KEY, HEADER_VALUE, PROXY_KEY, CLIENT_KEY, AZURE_KEY, BODY_CANARY, "SECRET"]


def config(upstream_url: str) -> dict[str, Any]:
    return {
        "upstreams": {
            "fake": {
                "url": upstream_url,
                "headers": {
                    "set": {
                        "Authorization": f"Bearer {UPSTREAM_KEY}",
                        "OpenAI-Organization": HEADER_VALUE,
                    }
                },
            },
            "down": {"url": "http://127.0.0.1:9/v1", "headers": {"set": {"api-key": UPSTREAM_KEY}}},
        },
        "routes": [
            {"model": "gpt-4o-mini", "upstream": "fake"},
            {"model": "fallback", "upstream": ["down", "fake"]},
            {"model": "dead", "upstream": "down"},
            {"path": "*", "upstream": "fake"},
        ],
        "auth": {"keys": [{"name": "team-b", "key": PROXY_KEY}]},
        "rate_limit": {"requests_per_minute": 60, "burst": 12},
    }


async def test_no_secret_in_any_log_line_or_metric(
    make_proxy: MakeProxy, fake: FakeUpstream, upstream_url: str
) -> None:
    with capture_logs() as logs:
        client = await make_proxy(config(upstream_url))
        auth = {"Authorization": f"Bearer {PROXY_KEY}"}
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": BODY_CANARY}]}
        calls: list[tuple[str, str, dict[str, str], Any]] = [
            ("POST", "/v1/chat/completions", auth, body),
            ("POST", "/v1/chat/completions", auth, {**body, "stream": True}),
            ("POST", "/v1/chat/completions", auth, {**body, "model": "fallback"}),
            ("POST", "/v1/chat/completions", auth, {**body, "model": "dead"}),
            ("POST", "/v1/chat/completions", auth, {**body, "model": "unknown-model"}),
            (
                "POST",
                "/v1/chat/completions",
                {"Authorization": f"Bearer {CLIENT_KEY}"},
                body,
            ),  # 401
            ("POST", "/v1/chat/completions", {"api-key": AZURE_KEY}, body),  # 401
            ("GET", f"/v1/files?api-key={AZURE_KEY}", auth, None),
            ("GET", "/v1/models", {"Authorization": f"Bearer {CLIENT_KEY}"}, None),
            ("GET", f"/v1/models?api-key={AZURE_KEY}", auth, None),
            ("GET", "/about", auth, None),
        ]
        for method, path, headers, json_body in calls:
            resp = await client.request(method, path, headers=headers, json=json_body)
            await resp.read()
        fake.status_override = 401  # the upstream refuses our key: logged as an error
        resp = await client.post("/v1/chat/completions", headers=auth, json=body)
        assert resp.status == 502
        await logs.wait_for(len(calls) + 1)
        metrics_page = await (await client.get("/metrics")).text()

    assert (
        UPSTREAM_KEY in fake.received[0].headers["authorization"]
    )  # the secrets were really in play
    assert any("upstream_auth_failed" in line for line in logs.access)
    assert any("to the proxy's own credential" in line for line in logs.everything)
    assert "team-b" in "".join(logs.access)
    for line in logs.everything + [metrics_page]:
        for secret in SECRETS:
            assert secret not in line, f"{secret!r} leaked: {line[:300]!r}"
