"""Per-client token buckets.

A bucket holds up to ``burst`` tokens and refills at ``requests_per_minute / 60``
tokens a second; a request takes one token. :func:`take_token` is the pure
arithmetic (the clock is an argument, so tests pass a fake one); the limiters
store bucket states. The in-memory limiter drops a bucket once it would be full
again, so idle clients cost nothing and a flood of distinct addresses cannot
grow memory without bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .config import RateLimitSettings

__all__ = ["Decision", "MemoryRateLimiter", "RateLimiter", "StorageUnavailable", "take_token"]


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one request against one bucket.

    ``retry_after``: seconds until one token is available (0 when allowed).
    ``reset_after``: seconds until the bucket is full again.
    """

    allowed: bool
    remaining: int
    retry_after: float
    reset_after: float


def take_token(
    tokens: float, updated: float, now: float, limit: RateLimitSettings
) -> tuple[Decision, float]:
    """Refill a bucket last seen at ``updated`` holding ``tokens``, then take one.

    Returns the decision and the bucket's token count as of ``now``.
    """
    rate = limit.refill_per_second
    burst = float(limit.burst)
    elapsed = max(0.0, now - updated)
    tokens = min(burst, tokens + elapsed * rate)
    if tokens >= 1.0:
        tokens -= 1.0
        return Decision(True, int(tokens), 0.0, (burst - tokens) / rate), tokens
    return Decision(False, 0, (1.0 - tokens) / rate, (burst - tokens) / rate), tokens


class StorageUnavailable(Exception):
    """The shared bucket storage could not be reached; the caller decides open/closed."""


class RateLimiter(Protocol):
    async def acquire(self, key: str, limit: RateLimitSettings) -> Decision:
        """Take one token from the bucket ``key`` shaped by ``limit``."""
        ...

    async def close(self) -> None: ...


class MemoryRateLimiter:
    """Buckets in this process's memory: exact for one process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # key -> (tokens, updated, time at which the bucket is full again)
        self._buckets: dict[str, tuple[float, float, float]] = {}
        self._next_sweep = 0.0

    def __len__(self) -> int:
        return len(self._buckets)

    async def acquire(self, key: str, limit: RateLimitSettings) -> Decision:
        return self.acquire_now(key, limit)

    def acquire_now(self, key: str, limit: RateLimitSettings) -> Decision:
        now = self._clock()
        state = self._buckets.get(key)
        if state is None:
            tokens, updated = float(limit.burst), now
        else:
            tokens, updated = state[0], state[1]
        decision, tokens = take_token(tokens, updated, now, limit)
        self._buckets[key] = (tokens, now, now + decision.reset_after)
        if now >= self._next_sweep:
            self._sweep(now)
        return decision

    def _sweep(self, now: float) -> None:
        """Drop buckets that are full again: they behave exactly like a new one."""
        buckets = self._buckets
        for key in [k for k, (_, _, full_at) in buckets.items() if full_at <= now]:
            del buckets[key]
        # Sweeping costs O(buckets); do it at most once a second.
        self._next_sweep = now + 1.0

    async def close(self) -> None:
        self._buckets.clear()
