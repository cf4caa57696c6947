"""Circuit breakers with an injected clock: open after N consecutive failures,
skipped during the cool-down, then exactly one probe."""

from __future__ import annotations

from dataclasses import replace

from yarl import URL

from proxy.config import CircuitBreakerSettings, Upstream
from proxy.outbound.health import Health


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def upstream(failures: int = 3, cooldown: float = 30.0, name: str = "a") -> Upstream:
    return Upstream(
        name=name,
        url=URL("http://127.0.0.1:1/v1"),
        circuit_breaker=CircuitBreakerSettings(failures=failures, cooldown=cooldown),
    )


def test_defaults_are_five_failures_and_thirty_seconds() -> None:
    assert CircuitBreakerSettings() == CircuitBreakerSettings(failures=5, cooldown=30.0)


def test_opens_after_n_consecutive_failures_only() -> None:
    clock, u = Clock(), upstream(failures=3)
    health = Health(clock)
    health.failure(u)
    health.failure(u)
    health.success(u)  # a success resets the count: failures must be consecutive
    health.failure(u)
    health.failure(u)
    assert health.available(u)
    health.failure(u)
    assert health.states() == {"a": "open"}
    assert not health.available(u)
    assert not health.could_try(u)


def test_cooldown_then_exactly_one_probe() -> None:
    clock, u = Clock(), upstream(failures=1, cooldown=30)
    health = Health(clock)
    health.failure(u)
    clock.now += 29.9
    assert not health.available(u)
    clock.now += 0.2
    assert health.could_try(u)  # a peek claims nothing ...
    assert health.could_try(u)
    assert health.available(u)  # ... the first caller gets the probe
    assert health.states() == {"a": "half_open"}
    assert not health.available(u)  # and everyone else waits for its verdict
    assert not health.could_try(u)
    health.success(u)
    assert health.states() == {"a": "closed"}
    assert health.available(u) and health.available(u)


def test_failed_probe_opens_for_another_cooldown() -> None:
    clock, u = Clock(), upstream(failures=2, cooldown=10)
    health = Health(clock)
    health.failure(u)
    health.failure(u)
    clock.now += 10
    assert health.available(u)
    health.failure(u)
    assert health.states() == {"a": "open"}
    clock.now += 9.9
    assert not health.available(u)
    clock.now += 0.1
    assert health.available(u)


def test_released_probe_lets_the_next_request_probe() -> None:
    clock, u = Clock(), upstream(failures=1, cooldown=5)
    health = Health(clock)
    health.failure(u)
    clock.now += 5
    assert health.available(u)
    health.release_probe(u)  # its client left before a verdict
    assert health.available(u)


def test_lost_probe_expires_after_a_cooldown() -> None:
    clock, u = Clock(), upstream(failures=1, cooldown=5)
    health = Health(clock)
    health.failure(u)
    clock.now += 5
    assert health.available(u)  # this probe never reports back
    clock.now += 4.9
    assert not health.available(u)
    clock.now += 0.1
    assert health.available(u)


def test_retry_after_is_the_soonest_reopening() -> None:
    clock = Clock()
    a, b = upstream(failures=1, cooldown=30, name="a"), upstream(failures=1, cooldown=8, name="b")
    health = Health(clock)
    health.failure(a)
    health.failure(b)
    clock.now += 2.5
    assert health.retry_after([a, b]) == 6  # ceil(5.5)
    clock.now += 100
    assert health.retry_after([a, b]) == 1  # never less than a second


def test_state_survives_a_reload_unless_the_upstream_changed() -> None:
    clock, u = Clock(), upstream(failures=1)
    health = Health(clock)
    health.failure(u)
    same = replace(u, keep_response_headers=frozenset({"x-a"}))  # a new object, same upstream
    assert not health.available(same)
    moved = replace(u, url=URL("http://127.0.0.1:2/v1"))
    assert health.available(moved)  # a different server: start afresh
    retuned = replace(moved, circuit_breaker=CircuitBreakerSettings(failures=1, cooldown=1))
    health.failure(moved)
    assert health.available(retuned)


def test_changes_are_reported() -> None:
    clock, u = Clock(), upstream(failures=1, cooldown=1)
    health = Health(clock)
    seen: list[tuple[str, str]] = []
    health.on_change = lambda name, state: seen.append((name, state))
    health.failure(u)
    clock.now += 1
    assert health.available(u)
    health.success(u)
    assert seen == [("a", "open"), ("a", "half_open"), ("a", "closed")]


def test_after_a_reload_the_breaker_follows_the_new_upstream_object() -> None:
    clock, u = Clock(), upstream(failures=2)
    health = Health(clock)
    health.failure(u)
    reloaded = replace(u, keep_response_headers=frozenset({"x-a"}))
    assert health.breaker(reloaded).upstream is reloaded  # the identity fast path again
    health.failure(reloaded)
    assert health.states() == {"a": "open"}  # the count carried over the reload
