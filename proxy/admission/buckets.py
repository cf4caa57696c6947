"""Per-client token buckets.

A bucket holds up to ``burst`` tokens and refills at ``requests_per_minute``;
a request takes one token. The bucket is stored as one number, the time at
which it will be full again (``full_at``, the "theoretical arrival time" of
the generic cell rate algorithm, GCRA, from ATM traffic management, ITU-T
I.371). With ``interval`` the time one token takes to refill::

    tokens(now)  = burst - max(0, full_at - now) / interval
    allowed      iff full_at - now <= (burst - 1) * interval
    on allow:    full_at = max(full_at, now) + interval

This is exactly a continuously refilled token bucket, with two advantages:
one number per client, and integer arithmetic (nanoseconds here, microseconds
in Redis), so "exactly ``burst`` requests pass" holds without float drift.
A bucket that is full again is indistinguishable from a new one, so it can
be dropped: idle clients cost nothing.

Limits that change (a reload, or Redis state written under an earlier
configuration): what is stored is a debt of time, ``full_at - now``, and a
limit can never owe more than its *ceiling*, ``burst * interval`` (a full
bucket emptied). A larger debt was built under another limit, one with a
higher ceiling, and is cut to this one when the bucket is next read::

    debt = min(max(0, full_at - now), burst * interval)

So after a change no client waits longer than the new limit can ever make it
wait: one ``interval`` (e.g. from ``1/min, burst 20`` drained to ``6000/min,
burst 100``: a 20-minute debt becomes 1 s, and the next request waits at
most 10 ms instead of 20 minutes). State written under the limit in force
never exceeds its ceiling, so the cut changes nothing for it, and costs one
comparison per request. The rule holds for any bucket whose state is a time
debt, whatever a unit costs (requests here; tokens per minute or per day
alike: the ceiling is capacity times the time one unit takes to refill).

:func:`take_token` is the pure arithmetic (the clock is an argument, so tests
pass a fake one). :class:`MemoryRateLimiter` keeps buckets in this process;
ratelimit_redis.py keeps them in Redis for many processes and machines.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..config.settings import RateLimitSettings

__all__ = [
    "Decision",
    "MemoryRateLimiter",
    "RateLimiter",
    "StorageUnavailable",
    "interval_ns",
    "take_token",
]

NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one request against one bucket.

    ``remaining``: whole tokens left after this request (0 when refused).
    ``retry_after``: seconds until one token is available (0 when allowed).
    ``reset_after``: seconds until the bucket is full again.
    """

    allowed: bool
    remaining: int
    retry_after: float
    reset_after: float


def interval_ns(limit: RateLimitSettings) -> int:
    """Nanoseconds one token takes to refill (at least 1)."""
    return max(1, round(60 * NS / limit.requests_per_minute))


def take_token(full_at: int, now: int, burst: int, interval: int) -> tuple[Decision, int]:
    """Try to take one token from a bucket that is full again at ``full_at``.

    All times are integers in one unit (``now`` and ``full_at`` on the same
    clock, ``interval`` per token); the decision's seconds assume nanoseconds.
    Returns the decision and the bucket's new ``full_at``: unchanged when
    refused (a refused request costs nothing), except that a debt above this
    limit's ceiling is cut to it (see the module docstring).
    """
    debt = full_at - now  # time until full; <= 0 means full
    ceiling = burst * interval
    if debt < 0:
        debt = 0
    elif debt > ceiling:  # owed under an earlier limit with a higher ceiling
        debt = ceiling
        full_at = now + ceiling
    if debt <= ceiling - interval:
        debt += interval
        remaining = burst - -(-debt // interval)  # burst - ceil(debt / interval)
        return Decision(True, remaining, 0.0, debt / NS), now + debt
    retry = debt - (ceiling - interval)
    return Decision(False, 0, retry / NS, debt / NS), full_at


class StorageUnavailable(Exception):
    """The shared bucket storage could not be reached; the caller decides open/closed."""


class RateLimiter(Protocol):
    """Bucket storage. ``acquire`` raises only :class:`StorageUnavailable`."""

    async def acquire(self, key: str, limit: RateLimitSettings) -> Decision:
        """Take one token from the bucket ``key`` shaped by ``limit``."""
        ...

    def start(self) -> None:
        """Start background work (called once the event loop runs); no I/O."""
        ...

    async def close(self) -> None:
        """Stop background work and release connections."""
        ...


class _Shard:
    """One slice of the buckets: a dict and the eviction heap over its keys."""

    __slots__ = ("buckets", "heap", "peak")

    def __init__(self) -> None:
        self.buckets: dict[str, int] = {}  # key -> full_at
        self.heap: list[tuple[int, str]] = []  # (full_at when pushed, key)
        self.peak = 0  # largest size since the last compaction

    def evict(self, now: int, budget: int) -> tuple[int, int]:
        """Retire up to ``budget`` heap entries due by ``now``.

        Returns (buckets dropped, budget left); budget left > 0 means nothing
        more is due."""
        heap, buckets = self.heap, self.buckets
        if len(buckets) > self.peak:
            self.peak = len(buckets)
        dropped = 0
        while budget > 0 and heap and heap[0][0] <= now:
            budget -= 1
            key = heap[0][1]
            full_at = buckets[key]
            if full_at <= now:
                heapq.heappop(heap)
                del buckets[key]
                dropped += 1
            else:  # used since the entry was pushed: look again when it is full
                heapq.heapreplace(heap, (full_at, key))
        return dropped, budget

    def compact(self, min_peak: int) -> None:
        """A dict never shrinks when keys are deleted: once it has fallen to
        1/16 of its peak, copy it, so a past flood gives its table back."""
        size = len(self.buckets)
        if self.peak >= min_peak and size <= self.peak // 16:
            self.buckets = dict(self.buckets)
            self.peak = size


class MemoryRateLimiter:
    """Buckets in this process's memory: exact for one process.

    Eviction: each bucket has exactly one entry in a min-heap ordered by the
    ``full_at`` it had when the entry was pushed. ``full_at`` never moves
    earlier (but for the cut below), so the heap's top is a lower bound: when
    it has passed, the bucket is either full (dropped) or was used since (its
    entry is pushed again with the real ``full_at``). A bucket whose debt a
    changed limit cut (see the module docstring) is full before its entry
    says: it is dropped when the entry comes due, late by at most the earlier
    limit's ceiling, never early. Every ``acquire`` retires at most
    :attr:`EVICT_PER_ACQUIRE` heap entries, and :meth:`start`'s sweeper
    retires the rest once a second in slices of :attr:`SWEEP_SLICE`,
    yielding to the event loop between slices, so no request waits behind
    an O(buckets) pass (a one-pass sweep of a million buckets holds the loop
    for about 0.3 s of CPU; a slice, for a few ms: ``python -m bench.limiter_memory``).

    Buckets are spread over ``shards`` dicts by the key's hash: a dict grows
    by copying its whole table, and one dict of 700,000 buckets took 85 ms
    to grow, in the middle of a request; 256 shards make each copy 1/256 of
    that.

    ``clock`` returns integer nanoseconds (``time.monotonic_ns``).
    """

    EVICT_PER_ACQUIRE = 2
    SWEEP_SLICE = 1024
    SWEEP_INTERVAL = 1.0  # seconds between sweeps
    COMPACT_MIN_PEAK = 64  # per shard

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns, *, shards: int = 256) -> None:
        if shards < 1 or shards & (shards - 1):
            raise ValueError(f"shards must be a power of two, got {shards}")
        self._clock = clock
        self._shards = tuple(_Shard() for _ in range(shards))
        self._mask = shards - 1
        self._sweeper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return sum(len(shard.buckets) for shard in self._shards)

    async def acquire(self, key: str, limit: RateLimitSettings) -> Decision:
        return self.acquire_now(key, limit)

    def acquire_now(self, key: str, limit: RateLimitSettings) -> Decision:
        """:meth:`acquire` without the coroutine, for callers outside a loop."""
        now = self._clock()
        shard = self._shards[hash(key) & self._mask]
        buckets = shard.buckets
        full_at = buckets.get(key)
        decision, new_full_at = take_token(
            now if full_at is None else full_at, now, limit.burst, interval_ns(limit)
        )
        if full_at is None:  # a new bucket: burst >= 1, so this request was allowed
            buckets[key] = new_full_at
            heapq.heappush(shard.heap, (new_full_at, key))
        elif new_full_at != full_at:
            buckets[key] = new_full_at
        heap = shard.heap
        if heap[0][0] <= now:
            shard.evict(now, self.EVICT_PER_ACQUIRE)
        return decision

    def evict(self, now: int, budget: int) -> int:
        """Retire up to ``budget`` heap entries due by ``now``; return buckets dropped."""
        dropped = 0
        for shard in self._shards:
            if budget <= 0:
                break
            n, budget = shard.evict(now, budget)
            dropped += n
        return dropped

    async def sweep(self) -> int:
        """Drop every bucket that is full, a slice at a time; return how many."""
        total = 0
        spent = 0  # heap entries handled since the last yield
        for shard in self._shards:
            while True:
                dropped, left = shard.evict(self._clock(), self.SWEEP_SLICE - spent)
                total += dropped
                spent = self.SWEEP_SLICE - left
                if spent < self.SWEEP_SLICE:
                    break  # this shard has nothing more due
                await asyncio.sleep(0)  # let requests run between slices
                spent = 0
            shard.compact(self.COMPACT_MIN_PEAK)
        return total

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(
                self._sweep_forever(), name="oaimux-ratelimit-sweeper"
            )

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.SWEEP_INTERVAL)
            await self.sweep()

    async def close(self) -> None:
        task, self._sweeper = self._sweeper, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for shard in self._shards:
            shard.buckets.clear()
            shard.heap.clear()
