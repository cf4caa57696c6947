"""What the hot path remembers between requests must never change an answer.

Header verdicts are memoised per name spelling, the names a ``Connection``
header lists per value, the caller of an open proxy per address, and the rate
limiter is skipped when no limit is configured at all (docs/decisions.md,
"Memoised verdicts on the hot path"). Each test
here would fail if a memo leaked one request's decision into another's.
"""

from __future__ import annotations

from typing import Any

from tests.conftest import basic_config
from tests.fakes.upstream import FakeUpstream

JSON = {"Content-Type": "application/json"}
CHAT = b'{"model": "gpt-4o-mini", "messages": []}'


async def test_a_header_that_passed_is_dropped_once_connection_names_it(
    make_proxy: Any, fake: FakeUpstream
) -> None:
    client = await make_proxy()

    async def forwarded(headers: dict[str, str]) -> dict[str, str]:
        resp = await client.post("/v1/chat/completions", data=CHAT, headers={**JSON, **headers})
        assert resp.status == 200, await resp.text()
        return fake.last.headers

    # The first request teaches the memo that X-Private passes.
    assert (await forwarded({"X-Private": "one"}))["x-private"] == "one"
    named = await forwarded({"Connection": "keep-alive, X-Private", "X-Private": "two"})
    assert "x-private" not in named
    # Another spelling of the same name, listed in another spelling.
    named = await forwarded({"Connection": "x-private", "x-PRIVATE": "three"})
    assert "x-private" not in named
    # And the next request without a Connection header passes it again.
    assert (await forwarded({"X-Private": "four"}))["x-private"] == "four"


async def test_the_upstream_gets_exactly_one_request_id_ours(
    make_proxy: Any, fake: FakeUpstream, upstream_url: str
) -> None:
    config = basic_config(upstream_url)
    config["upstreams"]["fake"]["headers"]["set"]["X-Request-Id"] = "from-the-config"
    client = await make_proxy(config)
    # Not a sane id (a space): the proxy makes its own, and sends only that.
    resp = await client.post(
        "/v1/chat/completions", data=CHAT, headers={**JSON, "X-Request-Id": "not sane"}
    )
    assert resp.status == 200
    ours = resp.headers["x-oaimux-request-id"]
    sent = [v for k, v in fake.last.header_items if k.lower() == "x-request-id"]
    assert sent == [ours]
    # A sane one is kept, still once, and still over the configured value.
    resp = await client.post(
        "/v1/chat/completions", data=CHAT, headers={**JSON, "X-Request-Id": "req-123"}
    )
    sent = [v for k, v in fake.last.header_items if k.lower() == "x-request-id"]
    assert sent == ["req-123"]
    # The rest of the configured headers still go out, once each.
    auth = [v for k, v in fake.last.header_items if k.lower() == "authorization"]
    assert auth == ["Bearer sk-upstream-secret"]


async def test_a_limit_on_a_key_alone_is_enforced(make_proxy: Any, upstream_url: str) -> None:
    # No global limit and no route limit: only the key's own. The limiter must
    # still be asked (it is skipped only when no limit exists anywhere).
    config = basic_config(upstream_url)
    config["auth"] = {
        "keys": [
            {
                "name": "alice",
                "key": "sk-alice-0001",
                "rate_limit": {"requests_per_minute": 1, "burst": 2},
            },
            {"name": "bob", "key": "sk-bob-000001"},
        ]
    }
    client = await make_proxy(config)

    async def status(key: str) -> int:
        resp = await client.post(
            "/v1/chat/completions",
            data=CHAT,
            headers={**JSON, "Authorization": f"Bearer {key}"},
        )
        await resp.read()
        return resp.status

    assert [await status("sk-alice-0001") for _ in range(3)] == [200, 200, 429]
    assert [await status("sk-bob-000001") for _ in range(3)] == [200, 200, 200]
