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
buckets_redis.py keeps them in Redis for many processes and machines.

Token budgets (README: Token budgets) are buckets too, one per window (a
minute, a day), of ``capacity`` tokens refilled continuously over the window,
but a request's cost is not one: it is an estimate reserved before the
request is sent (:func:`take_tokens`), replaced by the real count when the
answer ends (:func:`settle_tokens`), so a bucket can owe more than it holds.
Their state is therefore kept as tokens owed, not as a time: ``owed`` as of
``at``, which drains at ``capacity`` per window::

    owed(now)   = max(0, owed - (now - at) * capacity / window)
    fits        iff owed(now) + cost <= capacity

Tokens, not a time, because a token bucket's ceiling in time is always its
window (a minute's budget takes a minute to refill, whatever its size): a
debt kept as a time would make a client that owes tokens wait as long after a
raised limit as before it. Kept as tokens, a raised limit gives room at once
and a lowered one refills no one. The same cut applies as above, in tokens: a
bucket never owes more than its *ceiling*, twice its capacity (a whole budget
reserved, and at most one more charged by answers that used more than they
reserved); anything above is cut on read. Counts are floats (Lua's numbers in
Redis are doubles too), exact for whole tokens far beyond any budget.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

from ..config.settings import RateLimitSettings, TokenBudget

__all__ = [
    "DAY",
    "MINUTE",
    "Decision",
    "MemoryRateLimiter",
    "RateLimiter",
    "StorageUnavailable",
    "Reserved",
    "TokenDecision",
    "interval_ns",
    "settle_tokens",
    "take_token",
    "take_tokens",
    "token_decision",
]

NS = 1_000_000_000
MINUTE = 60.0  # seconds: the two token windows
DAY = 86_400.0


class Decision(NamedTuple):
    """The outcome of one request against one bucket (a tuple: one is made per
    request, and a frozen dataclass costs twice as much).

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


class TokenDecision(NamedTuple):
    """The outcome of one reservation against a client's token buckets (a tuple:
    one is made per request, and a frozen dataclass costs three times as much).

    ``allowed``: every window had room for its cost (with ``enforce: false``
    the reservation was charged anyway). ``window`` (``"minute"`` or
    ``"day"``) is the window the other figures describe: the one that refused
    with the longest wait, or, when allowed, the one with the fewest tokens
    left. ``limit``: its capacity. ``used``: tokens it owed before this
    reservation. ``remaining``: whole tokens left in it after the reservation
    (when refused: before it). ``retry_after``: seconds until the cost fits in
    every window (0 when allowed). ``reset_after``: seconds until the window
    is full again.
    """

    allowed: bool
    window: str
    limit: int
    used: int
    remaining: int
    retry_after: float
    reset_after: float


def _drain(owed: float, elapsed: float, capacity: int, window: float) -> float:
    """Tokens still owed ``elapsed`` (any unit) after ``owed``, cut to the ceiling."""
    owed -= elapsed * capacity / window
    if owed <= 0.0:
        return 0.0
    ceiling = 2.0 * capacity
    return ceiling if owed > ceiling else owed


def take_tokens(
    owed: tuple[float, float],
    elapsed: float,
    unit: float,
    capacities: tuple[int, int],
    costs: tuple[int, int],
    force: bool,
) -> tuple[float, float, float, float, bool]:
    """Reserve ``costs`` (minute, day) from buckets that owed ``owed`` ``elapsed``
    ago, with ``unit`` time units a second (a capacity of 0: window not limited).

    Returns what the minute and the day owe now (before), what they owe after,
    and whether every window had room. Nothing is charged when a window has no
    room, unless ``force`` (``enforce: false``). The Redis script does the same
    steps.
    """
    cap_m, cap_d = capacities
    m = _drain(owed[0], elapsed, cap_m, MINUTE * unit) if cap_m else 0.0
    d = _drain(owed[1], elapsed, cap_d, DAY * unit) if cap_d else 0.0
    cost_m, cost_d = costs
    fits = (not cap_m or m + cost_m <= cap_m) and (not cap_d or d + cost_d <= cap_d)
    if not (fits or force):
        return m, d, m, d, False
    after_m = min(m + cost_m, 2.0 * cap_m) if cap_m else 0.0
    after_d = min(d + cost_d, 2.0 * cap_d) if cap_d else 0.0
    return m, d, after_m, after_d, fits


def settle_tokens(
    owed: tuple[float, float],
    elapsed: float,
    unit: float,
    capacities: tuple[int, int],
    deltas: tuple[int, int],
) -> tuple[float, float]:
    """Add ``deltas`` (a refund when negative) to buckets that owed ``owed``
    ``elapsed`` ago; never below zero (full) nor above the ceiling."""
    cap_m, cap_d = capacities
    m = _drain(owed[0], elapsed, cap_m, MINUTE * unit) + deltas[0] if cap_m else 0.0
    d = _drain(owed[1], elapsed, cap_d, DAY * unit) + deltas[1] if cap_d else 0.0
    return (min(max(m, 0.0), 2.0 * cap_m), min(max(d, 0.0), 2.0 * cap_d))


def token_decision(
    budget: TokenBudget,
    before: tuple[float, float],
    after: tuple[float, float],
    costs: tuple[int, int],
    allowed: bool,
) -> TokenDecision:
    """The figures of one reservation (see :class:`TokenDecision`), from what
    each window owed before and after it (``after`` is ``before`` when nothing
    was charged)."""
    cap_m, cap_d = budget.per_minute, budget.per_day
    day = not cap_m
    if cap_m and cap_d:  # both windows: the one that binds
        if allowed:
            day = cap_d - after[1] < cap_m - after[0]
        else:
            day = (before[1] + costs[1] - cap_d) * DAY / cap_d > (
                before[0] + costs[0] - cap_m
            ) * MINUTE / cap_m
    i, capacity, seconds = (1, cap_d, DAY) if day else (0, cap_m, MINUTE)
    assert capacity, "a token budget has at least one window (config/limits.py)"
    owed_before, owed_after = before[i], after[i]
    retry = (owed_before + costs[i] - capacity) * seconds / capacity
    return TokenDecision(
        allowed,
        "day" if day else "minute",
        capacity,
        int(owed_before + 0.5),
        max(0, math.floor(capacity - owed_after)),
        retry if retry > 0.0 else 0.0,
        owed_after * seconds / capacity,
    )


# A reservation's answer (:meth:`RateLimiter.reserve`): the request bucket's
# decision (None: no request limit), the tokens owed per minute and per day
# before the reservation and after it (after is before when nothing was
# charged), whether every window had room, and, in memory, the token
# buckets' state as charged (see :meth:`MemoryRateLimiter.refund`; None from
# Redis). Flat: one is made per model request; :func:`token_decision` makes
# the figures of a refusal from it.
Reserved = tuple[Decision | None, float, float, float, float, bool, "list[float] | None"]


class StorageUnavailable(Exception):
    """The shared bucket storage could not be reached; the caller decides open/closed."""


class RateLimiter(Protocol):
    """Bucket storage. ``acquire`` raises only :class:`StorageUnavailable`."""

    async def acquire(self, key: str, limit: RateLimitSettings) -> Decision:
        """Take one token from the bucket ``key`` shaped by ``limit``."""
        ...

    async def reserve(
        self,
        key: str,
        limit: RateLimitSettings | None,
        budget: TokenBudget,
        costs: tuple[int, int],
    ) -> Reserved:
        """In one atomic step: take one token from the request bucket ``key``
        (when ``limit`` is set) and reserve ``costs`` (minute, day) from the
        client's token buckets of the same key. Nothing is taken unless both
        have room, except that with ``budget.enforce`` false the tokens are
        taken anyway (see :data:`Reserved` for the answer; when the request
        bucket refuses, the token buckets are reported untouched)."""
        ...

    def settle(self, key: str, budget: TokenBudget, deltas: tuple[int, int]) -> None:
        """Add ``deltas`` (minute, day; negative: a refund) to the token buckets
        of ``key``. Never blocks and never raises: it is applied before any
        later ``reserve`` of this storage, or (storage unreachable) dropped."""
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
        :func:`take_tokens` written out with the budget's derived constants
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
        """:func:`settle_tokens` written out, as in :meth:`reserve_now`. Drained
        buckets are retired by the sweeper (reservations and settles never
        evict): one settle per answer, kept short."""
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
