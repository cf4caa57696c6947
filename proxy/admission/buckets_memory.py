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
from typing import Generic, TypeVar

from ..config.settings import RateLimitSettings, TokenBudget
from .buckets import Decision, Reserved, interval_ns, take_token
from .token_buckets import TokenState

__all__ = ["MemoryRateLimiter"]

_Bucket = TypeVar("_Bucket")


class _Slice(Generic[_Bucket]):
    """One slice of a store's buckets: a dict and the eviction heap over its
    keys (one entry per bucket, see :class:`MemoryRateLimiter`)."""

    __slots__ = ("buckets", "heap", "peak")

    def __init__(self) -> None:
        self.buckets: dict[str, _Bucket] = {}
        self.heap: list[tuple[float, str]] = []  # (full_at when pushed, key)
        self.peak = 0  # largest size since the last compaction

    @staticmethod
    def full_at(bucket: _Bucket) -> float:
        """When ``bucket`` is full again (ns)."""
        raise NotImplementedError

    def evict(self, now: int, budget: int) -> tuple[int, int]:
        """Retire up to ``budget`` heap entries due by ``now``.

        Returns (buckets dropped, budget left); budget left > 0 means nothing
        more is due."""
        heap, buckets, full_at_of = self.heap, self.buckets, self.full_at
        if len(buckets) > self.peak:
            self.peak = len(buckets)
        dropped = 0
        while budget > 0 and heap and heap[0][0] <= now:
            budget -= 1
            key = heap[0][1]
            full_at = full_at_of(buckets[key])
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


class _Shard(_Slice[int]):
    """One slice of the request buckets: ``key -> full_at`` (ns)."""

    __slots__ = ()

    @staticmethod
    def full_at(bucket: int) -> float:
        return bucket


class _TokenShard(_Slice[TokenState]):
    """One slice of the token buckets: ``key -> TokenState``."""

    __slots__ = ()

    @staticmethod
    def full_at(bucket: TokenState) -> float:
        return bucket.full_at


def _owed(state: TokenState, now: int, budget: TokenBudget) -> tuple[float, float]:
    """What ``state``'s windows owe at ``now`` under ``budget``, each cut to
    its ceiling (twice its capacity; see token_buckets.py)."""
    elapsed = now - state.at
    cap_m, cap_d = budget.cap_minute, budget.cap_day
    m = state.minute - elapsed * budget.drain_minute
    m = 0.0 if m <= 0.0 else (m if m <= 2.0 * cap_m else 2.0 * cap_m)
    d = state.day - elapsed * budget.drain_day
    d = 0.0 if d <= 0.0 else (d if d <= 2.0 * cap_d else 2.0 * cap_d)
    return m, d


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
        estimate: int,
    ) -> Reserved:
        return self.reserve_now(key, limit, budget, estimate)

    def reserve_now(
        self,
        key: str,
        limit: RateLimitSettings | None,
        budget: TokenBudget,
        estimate: int,
    ) -> Reserved:
        """:meth:`reserve` without the coroutine (atomic: nothing here awaits).

        The token buckets are kept under the same key, in dicts of their own;
        :meth:`take_tokens_now` charges them when every window has room.
        """
        now = self._clock()
        decision: Decision | None = None
        if limit is not None:
            full_at = self._shards[hash(key) & self._mask].buckets.get(key)
            decision, new_full_at = take_token(
                now if full_at is None else full_at, now, limit.burst, interval_ns(limit)
            )
            if not decision[0]:  # (Decision.allowed) refused: the tokens are only looked at
                m, d = self._owed(key, budget, now)
                return decision, m, d, m, d, False, None
        cap_m, cap_d = budget.cap_minute, budget.cap_day
        cost_m = estimate if estimate < cap_m else cap_m
        cost_d = estimate if estimate < cap_d else cap_d
        state = self.take_tokens_now(key, budget, estimate, now)
        if state is not None:
            after_m, after_d = state.minute, state.day
            before_m, before_d, fits = after_m - cost_m, after_d - cost_d, True
        else:
            before_m, before_d = self._owed(key, budget, now)
            if budget.enforce:
                return decision, before_m, before_d, before_m, before_d, False, None
            # enforce: false charges it anyway, each window up to its ceiling.
            after_m, after_d, fits = before_m + cost_m, before_d + cost_d, False
            after_m = after_m if after_m <= 2.0 * cap_m else 2.0 * cap_m
            after_d = after_d if after_d <= 2.0 * cap_d else 2.0 * cap_d
            state = self._write(key, after_m, after_d, budget, now)
        if decision is not None:
            self._store(key, full_at, new_full_at, now)
        return decision, before_m, before_d, after_m, after_d, fits, state

    def take_tokens_now(
        self, key: str, budget: TokenBudget, estimate: int, now: int | None = None
    ) -> TokenState | None:
        """Reserve ``estimate`` tokens from each of ``key``'s token windows (at
        most a window's capacity) when every window has room, and return their
        state as charged; else charge nothing and return ``None``.

        token_buckets.py's ``take_tokens`` written out with the budget's
        derived constants: the whole reservation of a block with a token
        budget and no request limit (admission.py's ``charge_now``), one call
        per model request. A window not limited has capacity, drain and cost
        0, so it owes 0 and always fits, with no test of its own. ``now``: the
        clock's time, when the caller has read it.
        """
        if now is None:
            now = self._clock()
        tokens = self._token_shards[hash(key) & self._mask]
        state = tokens.buckets.get(key)
        if state is None:
            m = d = 0.0
        else:
            if state.budget is not budget:  # written under another: cut to this one, as of now
                state.minute, state.day = _owed(state, now, budget)
                state.at, state.budget = now, budget
            elapsed = now - state.at
            m = state.minute - elapsed * budget.drain_minute
            if m < 0.0:
                m = 0.0
            d = state.day - elapsed * budget.drain_day
            if d < 0.0:
                d = 0.0
        # A window is charged at most its capacity: an estimate larger than a
        # whole budget passes when the budget is full, and what the answer uses
        # beyond is charged when it ends.
        room_m, room_d = budget.room_minute, budget.room_day
        m += estimate if estimate < room_m else room_m
        d += estimate if estimate < room_d else room_d
        if m > room_m or d > room_d:
            return None
        if state is None:
            state = tokens.buckets[key] = TokenState(m, d, now, budget)
            heapq.heappush(tokens.heap, (state.full_at, key))
        else:
            state.minute = m
            state.day = d
            state.at = now
        return state

    def _owed(self, key: str, budget: TokenBudget, now: int) -> tuple[float, float]:
        """What ``key``'s token windows owe at ``now``, cut to their ceilings."""
        state = self._token_shards[hash(key) & self._mask].buckets.get(key)
        return (0.0, 0.0) if state is None else _owed(state, now, budget)

    def _write(
        self, key: str, minute: float, day: float, budget: TokenBudget, now: int
    ) -> TokenState:
        """Store what ``key``'s token windows owe as of ``now``; return their state."""
        tokens = self._token_shards[hash(key) & self._mask]
        state = tokens.buckets.get(key)
        if state is None:
            state = tokens.buckets[key] = TokenState(minute, day, now, budget)
            heapq.heappush(tokens.heap, (state.full_at, key))
        else:
            state.minute, state.day, state.at, state.budget = minute, day, now, budget
        return state

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
        :meth:`take_tokens_now`, under the budget the buckets are in force
        under (``budget``, the reservation's, when they were retired: a reload
        may have changed it since). Drained buckets are retired by the
        sweeper (reservations and settles never evict)."""
        now = self._clock()
        state = self._token_shards[hash(key) & self._mask].buckets.get(key)
        if state is None:
            m, d = float(deltas[0]), float(deltas[1])
        else:
            budget = state.budget
            m, d = _owed(state, now, budget)
            m += deltas[0]
            d += deltas[1]
        cap_m, cap_d = budget.cap_minute, budget.cap_day
        m = 0.0 if m <= 0.0 else (m if m <= 2.0 * cap_m else 2.0 * cap_m)
        d = 0.0 if d <= 0.0 else (d if d <= 2.0 * cap_d else 2.0 * cap_d)
        # (No bucket is made for one retired since that stays drained.)
        if m or d or state is not None:
            self._write(key, m, d, budget, now)

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
        min_peak = self.COMPACT_MIN_PEAK
        for shard in self._all_shards:
            if not shard.heap and shard.peak < min_peak:
                # No bucket (each has one heap entry) and no table to give back:
                # nothing to do, so no call. Most shards on most sweeps, and all
                # of them with no limit configured (docs/decisions.md, "The
                # rate-limit sweep passes over empty shards").
                continue
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
