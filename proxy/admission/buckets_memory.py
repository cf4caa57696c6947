"""Request and token buckets in this process's memory: exact for one process.

The arithmetic is buckets.py's (:func:`~proxy.admission.buckets.take_token`)
and token_buckets.py's (:func:`~proxy.admission.token_buckets.take_tokens`,
:func:`~proxy.admission.token_buckets.settle_tokens`), written out where one
call per request counts; buckets_redis.py is the same store in Redis.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable

from ..config.settings import RateLimitSettings, TokenBudget
from .buckets import Decision, Reserved, interval_ns, take_token

__all__ = ["MemoryRateLimiter"]


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


class _TokenShard:
    """One slice of the token buckets: ``key -> [owed_minute, owed_day, at,
    full_at]`` (tokens, tokens, ns, ns) and an eviction heap as in :class:`_Shard`
    (one entry per bucket; ``full_at`` is when both windows drained, at the
    rates of the last write)."""

    __slots__ = ("buckets", "heap", "peak")

    def __init__(self) -> None:
        self.buckets: dict[str, list[float]] = {}
        self.heap: list[tuple[float, str]] = []
        self.peak = 0

    def evict(self, now: int, budget: int) -> tuple[int, int]:
        heap, buckets = self.heap, self.buckets
        if len(buckets) > self.peak:
            self.peak = len(buckets)
        dropped = 0
        while budget > 0 and heap and heap[0][0] <= now:
            budget -= 1
            key = heap[0][1]
            full_at = buckets[key][3]
            if full_at <= now:
                heapq.heappop(heap)
                del buckets[key]
                dropped += 1
            else:
                heapq.heapreplace(heap, (full_at, key))
        return dropped, budget

    def compact(self, min_peak: int) -> None:
        size = len(self.buckets)
        if self.peak >= min_peak and size <= self.peak // 16:
            self.buckets = dict(self.buckets)
            self.peak = size

    def write(
        self,
        key: str,
        state: list[float] | None,
        owed_minute: float,
        owed_day: float,
        now: int,
        budget: TokenBudget,
    ) -> None:
        """Store what is owed as of ``now`` (``state``: the bucket's list, if it has one)."""
        drained_m = owed_minute * budget.ns_minute  # 0.0 for a window not limited
        drained_d = owed_day * budget.ns_day
        full_at = now + (drained_m if drained_m > drained_d else drained_d)
        if state is None:
            self.buckets[key] = [owed_minute, owed_day, now, full_at]
            heapq.heappush(self.heap, (full_at, key))
        else:
            state[0], state[1], state[2], state[3] = owed_minute, owed_day, now, full_at


class MemoryRateLimiter:
    """Buckets in this process's memory: exact for one process.

    Eviction: each bucket has exactly one entry in a min-heap ordered by the
    ``full_at`` it had when the entry was pushed. ``full_at`` never moves
    earlier (but for the cut below), so the heap's top is a lower bound: when
    it has passed, the bucket is either full (dropped) or was used since (its
    entry is pushed again with the real ``full_at``). A bucket whose debt a
    changed limit cut (see buckets.py's module docstring) is full before its
    entry says: it is dropped when the entry comes due, late by at most the
    earlier limit's ceiling, never early. Every ``acquire`` retires at most
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
        self._token_shards = tuple(_TokenShard() for _ in range(shards))
        self._all_shards: tuple[_Shard | _TokenShard, ...] = self._shards + self._token_shards
        self._mask = shards - 1
        self._sweeper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        """Buckets held: request buckets, and clients' token buckets (both windows one)."""
        return sum(len(shard.buckets) for shard in self._shards) + sum(
            len(shard.buckets) for shard in self._token_shards
        )

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

    async def reserve(
        self,
        key: str,
        limit: RateLimitSettings | None,
        budget: TokenBudget,
        costs: tuple[int, int],
    ) -> Reserved:
        return self.reserve_now(key, limit, budget, costs)

    def reserve_now(
        self,
        key: str,
        limit: RateLimitSettings | None,
        budget: TokenBudget,
        costs: tuple[int, int],
    ) -> Reserved:
        """:meth:`reserve` without the coroutine (atomic: nothing here awaits).

        The token buckets are kept under the same key, in dicts of their own.
        token_buckets.py's ``take_tokens`` written out with the budget's derived constants
        (one call per model request): a window not limited has capacity,
        drain and cost 0, so it owes 0 and always fits, with no test of its own.
        """
        now = self._clock()
        index = hash(key) & self._mask
        decision: Decision | None = None
        if limit is not None:
            full_at = self._shards[index].buckets.get(key)
            decision, new_full_at = take_token(
                now if full_at is None else full_at, now, limit.burst, interval_ns(limit)
            )
        tokens = self._token_shards[index]
        state = tokens.buckets.get(key)
        cap_m, cap_d = budget.cap_minute, budget.cap_day
        if state is None:
            m = d = 0.0
        else:
            elapsed = now - state[2]
            m = state[0] - elapsed * budget.drain_minute
            m = 0.0 if m <= 0.0 else (m if m <= 2.0 * cap_m else 2.0 * cap_m)
            d = state[1] - elapsed * budget.drain_day
            d = 0.0 if d <= 0.0 else (d if d <= 2.0 * cap_d else 2.0 * cap_d)
        if decision is not None and not decision.allowed:
            return decision, m, d, m, d, False, None  # refused: the tokens are only looked at
        after_m, after_d = m + costs[0], d + costs[1]
        fits = after_m <= cap_m and after_d <= cap_d
        if not (fits or not budget.enforce):
            return decision, m, d, m, d, False, None
        if not fits:
            after_m = after_m if after_m <= 2.0 * cap_m else 2.0 * cap_m
            after_d = after_d if after_d <= 2.0 * cap_d else 2.0 * cap_d
        drained_m = after_m * budget.ns_minute  # (_TokenShard.write, written out)
        drained_d = after_d * budget.ns_day
        drained_at = now + (drained_m if drained_m > drained_d else drained_d)
        if state is None:
            state = tokens.buckets[key] = [after_m, after_d, now, drained_at]
            heapq.heappush(tokens.heap, (drained_at, key))
        else:
            state[0], state[1], state[2], state[3] = after_m, after_d, now, drained_at
        if decision is not None:
            self._store(key, full_at, new_full_at, now)
        return decision, m, d, after_m, after_d, fits, state

    @staticmethod
    def refund(state: list[float], minute: int, day: int) -> None:
        """Give back ``minute`` and ``day`` tokens (each <= 0) of a reservation
        whose buckets' state :meth:`reserve_now` returned: no clock, no lookup.

        Exact: a bucket that owes ``S`` as of ``at`` owes ``max(0, S - drain)``
        now, and ``max(0, max(0, S - drain) + refund)`` equals
        ``max(0, S + refund - drain)`` for any refund <= 0, so the refund can
        go into ``S`` itself, at any time. Its ``full_at`` stays as late as
        it was (the sweeper then retires the bucket a little later). A state
        the sweeper already retired is full: the refund changes nothing, as
        :meth:`settle` would.
        """
        state[0] += minute
        state[1] += day

    def _store(self, key: str, full_at: int | None, new_full_at: int, now: int) -> None:
        """Write a request bucket's new ``full_at`` (as :meth:`acquire_now` does)."""
        shard = self._shards[hash(key) & self._mask]
        shard.buckets[key] = new_full_at
        if full_at is None:
            heapq.heappush(shard.heap, (new_full_at, key))
        if shard.heap[0][0] <= now:
            shard.evict(now, self.EVICT_PER_ACQUIRE)

    def settle(self, key: str, budget: TokenBudget, deltas: tuple[int, int]) -> None:
        """token_buckets.py's ``settle_tokens`` written out, as in
        :meth:`reserve_now`. Drained buckets are retired by the sweeper
        (reservations and settles never evict): one settle per answer, kept
        short."""
        now = self._clock()
        tokens = self._token_shards[hash(key) & self._mask]
        state = tokens.buckets.get(key)
        cap_m, cap_d = budget.cap_minute, budget.cap_day
        if state is None:  # drained and retired since the reservation
            m, d = float(deltas[0]), float(deltas[1])
        else:
            elapsed = now - state[2]
            m = state[0] - elapsed * budget.drain_minute
            m = (0.0 if m <= 0.0 else (m if m <= 2.0 * cap_m else 2.0 * cap_m)) + deltas[0]
            d = state[1] - elapsed * budget.drain_day
            d = (0.0 if d <= 0.0 else (d if d <= 2.0 * cap_d else 2.0 * cap_d)) + deltas[1]
        m = 0.0 if m <= 0.0 else (m if m <= 2.0 * cap_m else 2.0 * cap_m)
        d = 0.0 if d <= 0.0 else (d if d <= 2.0 * cap_d else 2.0 * cap_d)
        if state is not None or m or d:  # (an overrun charged after the bucket drained)
            tokens.write(key, state, m, d, now, budget)

    def evict(self, now: int, budget: int) -> int:
        """Retire up to ``budget`` heap entries due by ``now``; return buckets dropped."""
        dropped = 0
        for shard in self._all_shards:
            if budget <= 0:
                break
            n, budget = shard.evict(now, budget)
            dropped += n
        return dropped

    async def sweep(self) -> int:
        """Drop every bucket that is full, a slice at a time; return how many."""
        total = 0
        spent = 0  # heap entries handled since the last yield
        for shard in self._all_shards:
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
        for shard in self._all_shards:
            shard.buckets.clear()
            shard.heap.clear()
