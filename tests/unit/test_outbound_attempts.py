"""The one upstream walk (proxy/outbound/attempts.py), driven as its callers
drive it: real settings, runtime, breakers and observer, no network.

The HTTP behaviour built on it is tested over the wire in
tests/integration/test_resilience_*.py; these pin what the walk itself
promises to every caller: the tries it gives, the backoff before a retry,
the order of fallbacks, and what ``tried`` records.
"""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import parse_settings
from proxy.errors import UpstreamUnavailable
from proxy.observe import Exchange
from proxy.observe.metrics import Metrics
from proxy.observe.observer import Observer
from proxy.outbound.attempts import Attempts, Ending
from proxy.outbound.health import Health
from proxy.runtime.runtime import Runtime, build_runtime


def runtime_for(a: dict[str, Any]) -> Runtime:
    settings = parse_settings(
        {
            "upstreams": {
                "a": {"url": "http://127.0.0.1:9/v1", **a},
                "b": {"url": "http://127.0.0.1:9/v1"},
            },
            "routes": [{"model": "m", "upstream": ["a", "b"]}],
        },
        environ={},
    )
    return build_runtime(settings)


def walk_for(a: dict[str, Any]) -> tuple[Attempts, Runtime, Exchange, Metrics]:
    runtime = runtime_for(a)
    metrics = Metrics(multiprocess_dir="")
    observer = Observer(runtime.settings.log, metrics, None)
    ex = Exchange("walk", "POST", "/v1/chat/completions", "-")
    return Attempts(ex, Health(), observer), runtime, ex, metrics


def test_a_retry_gives_the_same_upstream_after_a_growing_backoff_then_moves_on() -> None:
    attempts, runtime, ex, metrics = walk_for({"retries": {"attempts": 2, "backoff": 0.5}})
    tries = attempts.walk(runtime.settings.routes[0], runtime)
    delays = []
    for plan in tries:
        delays.append((plan.name, attempts.delay))
        attempts.start(plan)
        if plan.name == "b":
            attempts.answered_by(plan)
            break
        attempts.failed(plan, "connect", "refused", ending=Ending.UNAVAILABLE, again=True)
    names = [name for name, _ in delays]
    assert names == ["a", "a", "a", "b"]  # one try and its two retries, then the next
    first, retry1, retry2, fallback = (delay for _, delay in delays)
    assert first == 0.0 and fallback == 0.0
    # Full jitter: uniform below base * 2^(n-1), so above 0 and within the bound.
    assert 0.0 < retry1 <= 0.5 and 0.0 < retry2 <= 1.0
    # Every try is recorded; the one that answered is taken off again.
    assert ex.tried == ["a", "a", "a"] and ex.upstream == "b"
    assert (
        metrics.registry.get_sample_value(
            "oaimux_fallbacks_total", {"from_upstream": "a", "to_upstream": "b"}
        )
        == 1
    )
    assert (
        metrics.registry.get_sample_value(
            "oaimux_upstream_failures_total", {"upstream": "a", "kind": "connect"}
        )
        == 3
    )


def test_a_failure_not_worth_another_try_moves_on_at_once() -> None:
    attempts, runtime, ex, _ = walk_for({"retries": {"attempts": 3, "backoff": 0}})
    names = []
    for plan in attempts.walk(runtime.settings.routes[0], runtime):
        names.append(plan.name)
        attempts.start(plan)
        assert attempts.may_retry(plan) is (plan.name == "a")  # b has no retries
        attempts.failed(plan, "status_429", "answered 429", ending=Ending.UNAVAILABLE)
    assert names == ["a", "b"]
    err = attempts.exhausted()
    assert isinstance(err, UpstreamUnavailable)
    assert err.message == "No upstream could answer: a: answered 429; b: answered 429."
    assert ex.tried == ["a", "b"]


@pytest.mark.parametrize("attempts_allowed", [0, 1])
def test_may_retry_counts_the_tries_made(attempts_allowed: int) -> None:
    attempts, runtime, _, _ = walk_for({"retries": {"attempts": attempts_allowed, "backoff": 0}})
    plan = next(attempts.walk(runtime.settings.routes[0], runtime))
    attempts.start(plan)
    assert attempts.may_retry(plan) is (attempts_allowed == 1)
    attempts.failed(plan, "connect", "refused", ending=Ending.UNAVAILABLE, again=True)
    assert next(attempts).name == ("a" if attempts_allowed == 1 else "b")
