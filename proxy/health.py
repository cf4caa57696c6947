"""Passive upstream health (circuit breakers) and the order upstreams are tried in.

After ``circuit_breaker.failures`` consecutive failures an upstream is *open*:
it is skipped for ``circuit_breaker.cooldown`` seconds. Then it is *half-open*:
exactly one request may try it; success closes the breaker, failure opens it
for another cool-down. If every upstream of a route is open, the route's
upstreams are tried anyway, in order, rather than failing without trying.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .config import Balance, CircuitBreakerSettings

__all__ = ["Breaker", "Health", "order_upstreams"]


@dataclass(slots=True)
class Breaker:
    settings: CircuitBreakerSettings
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False

    @property
    def state(self) -> str:
        if self.failures < self.settings.failures:
            return "closed"
        return "half_open" if self.probing else "open"


class Health:
    """Breakers per upstream name, kept across reloads (state is about the upstream,
    not the configuration)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._breakers: dict[str, Breaker] = {}
        self.on_change: Callable[[str, str], None] | None = None

    def breaker(self, name: str, settings: CircuitBreakerSettings) -> Breaker:
        b = self._breakers.get(name)
        if b is None or b.settings != settings:
            b = self._breakers[name] = Breaker(settings)
        return b

    def available(self, name: str, settings: CircuitBreakerSettings) -> bool:
        """May a request go to ``name`` now? Claims the half-open probe if so."""
        b = self.breaker(name, settings)
        if b.failures < settings.failures:
            return True
        now = self._clock()
        if now < b.open_until or b.probing:
            return False
        b.probing = True
        self._changed(name, b)
        return True

    def success(self, name: str, settings: CircuitBreakerSettings) -> None:
        b = self.breaker(name, settings)
        was = b.state
        b.failures = 0
        b.probing = False
        if was != "closed":
            self._changed(name, b)

    def failure(self, name: str, settings: CircuitBreakerSettings) -> None:
        b = self.breaker(name, settings)
        was = b.state
        b.failures += 1
        b.probing = False
        if b.failures >= settings.failures:
            b.open_until = self._clock() + settings.cooldown
        if b.state != was:
            self._changed(name, b)

    def release_probe(self, name: str, settings: CircuitBreakerSettings) -> None:
        """A probe that ended without a verdict (client left) frees the slot."""
        b = self.breaker(name, settings)
        b.probing = False

    def states(self) -> dict[str, str]:
        return {name: b.state for name, b in self._breakers.items()}

    def _changed(self, name: str, b: Breaker) -> None:
        if self.on_change is not None:
            self.on_change(name, b.state)


def order_upstreams(
    names: Sequence[str], balance: Balance | None, rng: random.Random | None = None
) -> list[str]:
    """The order to try a route's upstreams: file order for a fallback list; for a
    balance, a weighted random draw first and the rest after it (by weight)."""
    if balance is None or len(names) == 1:
        return list(names)
    r = rng or random
    remaining = list(balance.weights)
    ordered: list[str] = []
    while remaining:
        total = sum(w for _, w in remaining)
        pick = r.uniform(0, total)
        acc = 0.0
        for i, (name, weight) in enumerate(remaining):
            acc += weight
            if pick <= acc or i == len(remaining) - 1:
                ordered.append(name)
                del remaining[i]
                break
    return ordered
