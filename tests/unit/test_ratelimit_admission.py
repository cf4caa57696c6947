"""Which bucket a request is charged to, the 429 it gets, and the storage policy."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from proxy.admission.admission import Admission, Caller, choose_limit
from proxy.admission.buckets import Decision, StorageUnavailable
from proxy.admission.budget import openai_duration
from proxy.admission.refusals import rate_limited
from proxy.config import RateLimitSettings, parse_settings
from proxy.errors import RateLimited, ServiceUnavailable, error_response
from proxy.runtime.runtime import Runtime, build_runtime

GLOBAL = {"requests_per_minute": 60, "burst": 10}


def runtime(**rate_limit: Any) -> Runtime:
    config: dict[str, Any] = {
        "upstreams": {"u": {"url": "http://127.0.0.1:9/v1"}},
        "routes": [
            {"model": "cheap", "upstream": "u"},
            {
                "model": "pricey-*",
                "upstream": "u",
                "rate_limit": {"requests_per_minute": 2, "burst": 1},
            },
            {
                "path": "files*",
                "upstream": "u",
                "rate_limit": {"requests_per_minute": 5, "burst": 2},
            },
        ],
        "auth": {
            "keys": [
                {
                    "name": "alice",
                    "key": "alice-key-123",
                    "rate_limit": {"requests_per_minute": 600, "burst": 50},
                },
                {"name": "bob", "key": "bob-key-12345"},
            ]
        },
    }
    if rate_limit:
        config["rate_limit"] = rate_limit
    return build_runtime(parse_settings(config, environ={}))


def test_which_bucket_pays() -> None:
    rt = runtime(**GLOBAL)
    cheap, pricey, files = rt.settings.routes
    alice, bob = rt.settings.auth_keys
    anon = Caller("203.0.113.7", None, True)
    v6 = Caller("2001:db8::9", None, True)

    def pick(caller: Caller, route: Any) -> tuple[RateLimitSettings, str] | None:
        return choose_limit(rt.settings, caller, route)

    assert pick(anon, cheap) == (rt.settings.rate_limit, "ip:203.0.113.7|global")
    assert pick(anon, None) == (rt.settings.rate_limit, "ip:203.0.113.7|global")
    assert pick(v6, None) == (rt.settings.rate_limit, "ip:2001:db8::/64|global")
    # A route's own limit: its own bucket per client.
    assert pick(anon, pricey) == (pricey.rate_limit, "ip:203.0.113.7|route:model pricey-*")
    assert pick(anon, files) == (files.rate_limit, "ip:203.0.113.7|route:path files*")
    # A key is the client; its own limit replaces the global one ...
    assert pick(Caller("203.0.113.7", alice, True), cheap) == (alice.rate_limit, "key:alice|key")
    # ... a key without one is held to the global limit, per key ...
    assert pick(Caller("203.0.113.7", bob, True), cheap) == (
        rt.settings.rate_limit,
        "key:bob|global",
    )
    # ... and a route's own limit still wins, per key.
    assert pick(Caller("198.51.100.1", alice, True), pricey) == (
        pricey.rate_limit,
        "key:alice|route:model pricey-*",
    )
    # A failed key check is charged to the address.
    assert pick(Caller("203.0.113.7", None, False), None) == (
        rt.settings.rate_limit,
        "ip:203.0.113.7|global",
    )


def test_no_global_limit_leaves_unlimited_routes_unlimited() -> None:
    rt = runtime()
    cheap, pricey, _ = rt.settings.routes
    anon = Caller("203.0.113.7", None, True)
    assert choose_limit(rt.settings, anon, cheap) is None
    assert choose_limit(rt.settings, anon, pricey) is not None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0001, "1ms"),
        (0.25, "250ms"),
        (0.9991, "1000ms"),
        (1.0, "1s"),
        (1.2, "2s"),
        (59.5, "1m0s"),
        (360.0, "6m0s"),
        (361.0, "6m1s"),
        (3600.0, "1h0m0s"),
        (3723.0, "1h2m3s"),
    ],
)
def test_openai_duration(seconds: float, text: str) -> None:
    assert openai_duration(seconds) == text


async def test_the_429_carries_what_the_sdks_read() -> None:
    limit = RateLimitSettings(requests_per_minute=1, burst=100)
    err = rate_limited(Decision(False, 0, 2.5, 130.2), limit, None)
    assert isinstance(err, RateLimited)
    resp = error_response(err)
    assert resp.status == 429
    assert resp.headers["x-oaimux-error"] == "rate_limit_exceeded"
    assert resp.headers["Retry-After"] == "3"
    assert resp.headers["retry-after-ms"] == "2500"
    assert resp.headers["x-ratelimit-limit-requests"] == "100"
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"
    assert resp.headers["x-ratelimit-reset-requests"] == "2m11s"
    assert isinstance(resp.body, bytes)
    body = json.loads(resp.body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "requests"
    assert error["code"] == "rate_limit_exceeded"
    assert error["param"] is None
    assert error["message"].startswith("Rate limit reached for requests")
    assert error["message"].endswith("try again in 3s.")


def test_retry_after_is_at_least_one_second() -> None:
    limit = RateLimitSettings(requests_per_minute=600000, burst=1)
    err = rate_limited(Decision(False, 0, 0.0001, 0.0001), limit, None)
    assert err.headers["Retry-After"] == "1"
    assert err.headers["retry-after-ms"] == "1"
    assert err.headers["x-ratelimit-reset-requests"] == "1ms"
    assert "try again in 1s" in err.message


class SwitchableStorage:
    """A bucket storage whose backend can be made unreachable (a test double of
    the storage interface, not of the code under test)."""

    def __init__(self) -> None:
        self.down = False
        self.calls = 0

    async def acquire(self, key: str, limit: RateLimitSettings) -> Decision:
        self.calls += 1
        if self.down:
            raise StorageUnavailable("redis: ConnectionError: refused")
        return Decision(True, limit.burst - 1, 0.0, 1.0)

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_fail_open_lets_requests_through_and_warns_once_per_ten_minutes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rt = runtime(**GLOBAL)  # on_storage_error defaults to open
    storage, clock = SwitchableStorage(), Clock()
    admission = Admission(storage, clock=clock)
    caller = Caller("203.0.113.7", None, True)
    caplog.set_level(logging.INFO, logger="oaimux.ratelimit")
    storage.down = True
    for _ in range(50):
        await admission.charge(rt.settings, caller, None)  # no exception: open
        clock.now += 10  # 50 requests over 8m20s
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "failing open" in warnings[0].getMessage()
    clock.now += 100  # ten minutes after the first warning
    await admission.charge(rt.settings, caller, None)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "still failing: 50 more times in 10m00s" in warnings[1].getMessage()
    storage.down = False
    await admission.charge(rt.settings, caller, None)
    await admission.charge(rt.settings, caller, None)
    recoveries = [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]
    assert recoveries == ["rate-limit storage: recovered after 10m00s (51 failures)"]
    # The next outage warns at once.
    storage.down = True
    await admission.charge(rt.settings, caller, None)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 3


async def test_fail_closed_refuses_with_503() -> None:
    rt = runtime(**GLOBAL, on_storage_error="closed")
    storage = SwitchableStorage()
    admission = Admission(storage)
    caller = Caller("203.0.113.7", None, True)
    await admission.charge(rt.settings, caller, None)
    storage.down = True
    with pytest.raises(ServiceUnavailable) as info:
        await admission.charge(rt.settings, caller, None)
    assert info.value.code == "rate_limiter_unavailable"
    assert info.value.status == 503
    assert "redis" not in info.value.message  # no internals in the client's error


async def test_no_applicable_limit_never_touches_the_storage() -> None:
    rt = runtime()
    storage = SwitchableStorage()
    admission = Admission(storage)
    await admission.charge(rt.settings, Caller("203.0.113.7", None, True), rt.settings.routes[0])
    assert storage.calls == 0
