"""Passive upstream health (circuit breakers) and the order upstreams are tried in.

A breaker counts an upstream's *consecutive* failures (cannot connect, no
headers in time, 429, 5xx, our credential refused). Any success resets it.

- **closed**: fewer than ``circuit_breaker.failures`` consecutive failures;
  requests go through.
- **open**: ``failures`` reached. The upstream is skipped for
  ``circuit_breaker.cooldown`` seconds (default 5 failures, 30 s).
- **half-open**: the cool-down has passed. Exactly one request (the probe)
  may try the upstream, however many arrive at once; its success closes the
  breaker, its failure opens it for another cool-down. A probe that never
  reaches a verdict (its client left) frees the slot at once; one that hangs
  frees it after another cool-down, so a lost probe cannot keep an upstream
  out of service for good.

When every upstream of a route is open, the request is refused at once with
503 and ``Retry-After`` (see forward.py): failing fast is the point of a
breaker, and the client's SDK retries after the given delay.

Breakers are kept per upstream name across reloads (they describe the
upstream, not the configuration), and start afresh when the upstream's URL or
breaker settings change. ``Health.clock`` is injectable for tests.

Retries of the same upstream wait :func:`backoff_delay` between tries.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ..config.settings import Balance, Upstream
from ..errors import ServiceUnavailable

__all__ = ["MAX_BACKOFF", "Breaker", "Health", "backoff_delay", "order_upstreams"]

# Longest single wait between two tries of the same upstream, in seconds.
MAX_BACKOFF = 10.0


@dataclass(slots=True)
class Breaker:
    """The breaker of one upstream. ``failures`` counts consecutive failures."""

    upstream: Upstream
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False
    probe_until: float = 0.0

    @property
    def state(self) -> str:
        if self.failures < self.upstream.circuit_breaker.failures:
            return "closed"
        return "half_open" if self.probing else "open"


class Health:
    """Breakers per upstream name. Single-threaded (one event loop), so no locks:
    the check-and-claim of a probe in :meth:`available` cannot interleave."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._breakers: dict[str, Breaker] = {}
        self.on_change: Callable[[str, str], None] | None = None

    def breaker(self, upstream: Upstream) -> Breaker:
        b = self._breakers.get(upstream.name)
        # The identity test is the hot path: a runtime hands out the same object.
        if b is not None and b.upstream is upstream:
            return b
        if (
            b is None
            or b.upstream.url != upstream.url
            or b.upstream.circuit_breaker != upstream.circuit_breaker
        ):
            b = self._breakers[upstream.name] = Breaker(upstream)
        else:
            b.upstream = upstream  # reloaded, same server: keep the state, regain the fast path
        return b

    def available(self, upstream: Upstream) -> bool:
        """May a request go to ``upstream`` now? Claims the half-open probe if so:
        the caller must then report :meth:`success`, :meth:`failure` or
        :meth:`release_probe`."""
        b = self.breaker(upstream)
        if b.failures < upstream.circuit_breaker.failures:
            return True
        now = self.clock()
        if now < b.open_until or (b.probing and now < b.probe_until):
            return False
        b.probing = True
        b.probe_until = now + upstream.circuit_breaker.cooldown
        self._changed(upstream.name, b)
        return True

    def could_try(self, upstream: Upstream) -> bool:
        """Would :meth:`available` say yes? Claims nothing."""
        b = self.breaker(upstream)
        if b.failures < upstream.circuit_breaker.failures:
            return True
        now = self.clock()
        return not (now < b.open_until or (b.probing and now < b.probe_until))

    def success(self, upstream: Upstream) -> None:
        b = self.breaker(upstream)
        was = b.state
        b.failures = 0
        b.probing = False
        if was != "closed":
            self._changed(upstream.name, b)

    def failure(self, upstream: Upstream) -> None:
        b = self.breaker(upstream)
        was = b.state
        b.failures += 1
        b.probing = False
        if b.failures >= upstream.circuit_breaker.failures:
            b.open_until = self.clock() + upstream.circuit_breaker.cooldown
        if b.state != was:
            self._changed(upstream.name, b)

    def release_probe(self, upstream: Upstream) -> None:
        """A request that ended without a verdict (its client left) frees the probe."""
        b = self._breakers.get(upstream.name)
        if b is not None and b.probing:
            b.probing = False
            self._changed(upstream.name, b)

    def retry_after(self, upstreams: Iterable[Upstream]) -> int:
        """Whole seconds until the first of ``upstreams`` may be tried again (>= 1)."""
        now = self.clock()
        soonest = math.inf
        for upstream in upstreams:
            b = self.breaker(upstream)
            until = max(b.open_until, b.probe_until if b.probing else 0.0)
            soonest = min(soonest, until - now)
        return max(1, math.ceil(soonest)) if soonest != math.inf else 1

    def all_paused(self, upstreams: Iterable[Upstream]) -> ServiceUnavailable:
        """The answer when every one of a route's ``upstreams`` is paused by its breaker."""
        return ServiceUnavailable(
            "Every upstream for this model is failing and paused by the proxy's "
            "circuit breaker; retry after the delay given in Retry-After.",
            code="upstream_circuit_open",
            headers={"Retry-After": str(self.retry_after(upstreams))},
        )

    def states(self) -> dict[str, str]:
        return {name: b.state for name, b in self._breakers.items()}

    def _changed(self, name: str, b: Breaker) -> None:
        if self.on_change is not None:
            self.on_change(name, b.state)


def order_upstreams(
    names: Sequence[str], balance: Balance | None, rng: random.Random | None = None
) -> Sequence[str]:
    """The order to try a route's upstreams in.

    A fallback list is tried in file order (``names`` itself is returned: no
    allocation on the hot path). A balance draws each position at random in
    proportion to the remaining weights, so the first choice follows the
    weights and the others remain fallbacks, heavier ones first on average.
    """
    if balance is None or len(names) == 1:
        return names
    draw = (rng or random).random
    remaining = list(balance.weights)
    ordered: list[str] = []
    total = sum(w for _, w in remaining)
    while len(remaining) > 1:
        pick = draw() * total
        for i, (name, weight) in enumerate(remaining):
            pick -= weight
            if pick < 0 or i == len(remaining) - 1:
                ordered.append(name)
                total -= weight
                del remaining[i]
                break
    ordered.append(remaining[0][0])
    return ordered


def backoff_delay(base: float, attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before try number ``attempt`` (1 = the first retry).

    Full jitter (AWS architecture blog, "Exponential Backoff And Jitter"):
    uniform in ``[0, min(MAX_BACKOFF, base * 2**(attempt-1))]``, so clients
    failing together do not retry together.
    """
    return (rng or random).uniform(0, min(MAX_BACKOFF, base * 2 ** (attempt - 1)))
