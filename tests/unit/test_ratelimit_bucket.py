"""The token bucket arithmetic and the in-memory limiter, on a fake clock."""

from __future__ import annotations

import asyncio
import sys
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.admission.buckets import NS, interval_ns, take_token
from proxy.admission.buckets_memory import MemoryRateLimiter
from proxy.config import RateLimitSettings

MINUTE = 60 * NS


class FakeClock:
    """Integer nanoseconds, moved by hand."""

    def __init__(self, start: int = 10**15) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now

    def advance(self, ns: int) -> None:
        self.now += ns


def test_interval_is_whole_nanoseconds_per_token() -> None:
    assert interval_ns(RateLimitSettings(60, 1)) == NS
    assert interval_ns(RateLimitSettings(1, 1)) == MINUTE
    assert interval_ns(RateLimitSettings(7, 1)) == round(MINUTE / 7)


def test_exactly_burst_then_refused_with_exact_waits() -> None:
    interval = NS  # 60 per minute
    now = 5 * NS
    full_at = now
    for i in range(3):
        decision, full_at = take_token(full_at, now, 3, interval)
        assert decision.allowed
        assert decision.remaining == 2 - i
        assert decision.reset_after == i + 1  # seconds until full again
    refused, after = take_token(full_at, now, 3, interval)
    assert not refused.allowed and refused.remaining == 0
    assert after == full_at  # a refused request costs nothing
    assert refused.retry_after == 1.0
    assert refused.reset_after == 3.0
    # Half a token later: still refused, half the wait.
    half, _ = take_token(full_at, now + NS // 2, 3, interval)
    assert not half.allowed and half.retry_after == 0.5
    # One token later: allowed again, and exactly one.
    again, full_at = take_token(full_at, now + NS, 3, interval)
    assert again.allowed and again.remaining == 0
    assert not take_token(full_at, now + NS, 3, interval)[0].allowed


def test_a_full_bucket_does_not_overfill() -> None:
    # Idle for an hour with burst 2: still only 2 requests in a row.
    full_at = 0
    now = 3600 * NS
    allowed = 0
    for _ in range(5):
        decision, full_at = take_token(full_at, now, 2, NS)
        allowed += decision.allowed
    assert allowed == 2


@given(
    burst=st.integers(1, 20),
    interval=st.integers(1, 10**6),
    gaps=st.lists(st.integers(0, 3 * 10**6), min_size=1, max_size=60),
)
def test_matches_a_continuously_refilled_token_bucket(
    burst: int, interval: int, gaps: list[int]
) -> None:
    """Compared with the textbook bucket in exact fractions: same answers, always."""
    tokens = Fraction(burst)
    now = 10**9
    full_at = now
    for gap in gaps:
        now += gap
        tokens = min(Fraction(burst), tokens + Fraction(gap, interval))
        decision, full_at = take_token(full_at, now, burst, interval)
        if tokens >= 1:
            tokens -= 1
            assert decision.allowed
            assert decision.remaining == int(tokens)  # whole tokens left
        else:
            assert not decision.allowed
            assert Fraction(round(decision.retry_after * NS)) == (1 - tokens) * interval
        assert Fraction(round(decision.reset_after * NS)) == (burst - tokens) * interval


LIMIT = RateLimitSettings(requests_per_minute=60, burst=3)  # one token a second


def test_memory_limiter_counts_per_key() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock)
    assert [limiter.acquire_now("a", LIMIT).allowed for _ in range(4)] == [True] * 3 + [False]
    assert limiter.acquire_now("b", LIMIT).allowed
    assert len(limiter) == 2


def test_buckets_are_evicted_once_full_again_and_not_before() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock)
    limiter.acquire_now("a", LIMIT)  # full again 1 s later
    limiter.acquire_now("b", LIMIT)
    limiter.acquire_now("b", LIMIT)  # full again 2 s later
    clock.advance(NS - 1)
    assert limiter.evict(clock(), 100) == 0
    assert len(limiter) == 2
    clock.advance(1)
    assert limiter.evict(clock(), 100) == 1  # "a" is full: dropped
    assert len(limiter) == 1
    clock.advance(NS)
    assert limiter.evict(clock(), 100) == 1
    assert len(limiter) == 0
    # An evicted bucket is exactly a new one.
    assert limiter.acquire_now("a", LIMIT).remaining == 2


def test_a_busy_bucket_is_kept_and_holds_one_heap_entry() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock, shards=1)
    for _ in range(1000):  # requests keep coming: the bucket never fills
        limiter.acquire_now("busy", LIMIT)
        clock.advance(NS // 2)
        limiter.evict(clock(), 100)
        assert len(limiter) == 1
        # Memory is per bucket, not per request.
        assert len(limiter._shards[0].heap) == 1


def test_each_acquire_retires_only_a_few_entries() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock, shards=1)  # one shard: every key shares the heap
    for i in range(10):
        limiter.acquire_now(f"c{i}", LIMIT)
    clock.advance(10 * NS)  # all ten are full again
    limiter.acquire_now("new", LIMIT)
    assert len(limiter) == 10 - MemoryRateLimiter.EVICT_PER_ACQUIRE + 1


@pytest.mark.parametrize("shards", [1, 4, 256])
async def test_sweep_drops_every_full_bucket_in_slices(shards: int) -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock, shards=shards)
    limiter.SWEEP_SLICE = 7
    for i in range(100):
        limiter.acquire_now(f"idle{i}", LIMIT)
    clock.advance(NS)
    limiter.acquire_now("fresh", LIMIT)  # not full until 1 s from now
    before = len(limiter)  # that acquire may have retired a couple already
    dropped = await limiter.sweep()
    assert dropped == before - 1
    assert len(limiter) == 1
    assert limiter.acquire_now("fresh", LIMIT).remaining == 1  # kept, and still counting


async def test_sweep_gives_back_the_table_of_a_shrunken_dict() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock, shards=1)
    limiter.COMPACT_MIN_PEAK = 1000
    for i in range(5000):
        limiter.acquire_now(f"k{i}", LIMIT)
    big = sys.getsizeof(limiter._shards[0].buckets)
    clock.advance(NS)
    await limiter.sweep()
    assert len(limiter) == 0
    assert sys.getsizeof(limiter._shards[0].buckets) < big // 10


async def test_a_sweep_passes_over_shards_that_hold_nothing() -> None:
    """The sweeper runs every second, limits configured or not: shards with no
    bucket and no table to give back cost it no call (not even the clock)."""
    reads = 0

    def clock() -> int:
        nonlocal reads
        reads += 1
        return 10**15

    limiter = MemoryRateLimiter(clock, shards=256)
    assert await limiter.sweep() == 0
    assert reads == 0
    limiter.acquire_now("one", LIMIT)  # one shard of 512 holds a bucket now
    reads = 0
    await limiter.sweep()
    assert reads == 1


async def test_the_started_sweeper_evicts_without_any_request() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock)
    limiter.SWEEP_INTERVAL = 0.001
    for i in range(50):
        limiter.acquire_now(f"idle{i}", LIMIT)
    limiter.start()
    try:
        clock.advance(NS)
        async with asyncio.timeout(5):
            while len(limiter):
                await asyncio.sleep(0.001)
    finally:
        await limiter.close()


@pytest.mark.parametrize("rpm", [1, 7, 60, 6000])
def test_exactly_burst_succeed_at_any_rate(rpm: float) -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock)
    limit = RateLimitSettings(rpm, 100)
    results = [limiter.acquire_now("one", limit).allowed for _ in range(500)]
    assert results.count(True) == 100
    assert results[:100] == [True] * 100


@pytest.mark.parametrize("shards", [0, 3, 100])
def test_shards_must_be_a_power_of_two(shards: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        MemoryRateLimiter(FakeClock(), shards=shards)


# Limits that change (a reload): a debt above the new limit's ceiling is cut.

OLD = RateLimitSettings(requests_per_minute=1, burst=20)
RAISED = RateLimitSettings(requests_per_minute=6000, burst=100)  # 10 ms a token


def test_a_raised_limit_cuts_a_drained_clients_wait_to_one_new_interval() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock)
    assert all(limiter.acquire_now("c", OLD).allowed for _ in range(20))
    clock.advance(2 * NS)  # the reload, two seconds later
    # Under the old limit this client owes 20 minutes; the new one can owe 1 s.
    first = limiter.acquire_now("c", RAISED)
    assert not first.allowed
    assert first.retry_after == 0.01  # one token of the new limit, not 1,198 s
    assert first.reset_after == 1.0
    clock.advance(10_000_000)
    assert limiter.acquire_now("c", RAISED).allowed
    # From then on the new limit, exactly: refilled a second later, burst 100.
    clock.advance(NS)
    results = [limiter.acquire_now("c", RAISED).allowed for _ in range(150)]
    assert results.count(True) == 100


def test_a_lowered_limit_keeps_the_debt_it_can_hold() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock)
    for _ in range(3):
        limiter.acquire_now("c", RAISED)  # owes 30 ms
    slower = RateLimitSettings(requests_per_minute=60, burst=5)  # ceiling 5 s
    decision = limiter.acquire_now("c", slower)
    assert decision.allowed and decision.reset_after == 1.03  # nothing cut, nothing given


def test_a_cut_bucket_is_evicted_late_never_early() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock, shards=1)
    for _ in range(20):
        limiter.acquire_now("c", OLD)  # its heap entry is due in 20 minutes
    limiter.acquire_now("c", RAISED)  # cut: full again in 1 s
    clock.advance(NS - 1)
    limiter.evict(clock(), 100)
    assert len(limiter) == 1
    # Kept: 1 ns short of full, so this request leaves 98 tokens (a new bucket, 99).
    assert limiter.acquire_now("c", RAISED).remaining == 98
    clock.advance(20 * MINUTE)
    assert limiter.evict(clock(), 100) == 1
    assert len(limiter) == 0 and limiter._shards[0].heap == []


@given(
    history=st.lists(
        st.tuples(st.integers(1, 20), st.integers(1, 10**6), st.integers(0, 3 * 10**6)),
        min_size=1,
        max_size=40,
    ),
    burst=st.integers(1, 20),
    interval=st.integers(1, 10**6),
)
def test_after_any_history_the_wait_is_bounded_by_the_limit_in_force(
    history: list[tuple[int, int, int]], burst: int, interval: int
) -> None:
    """Whatever limits wrote the bucket before, the limit read with bounds the wait."""
    now = 10**9
    full_at = now
    for old_burst, old_interval, gap in history:
        now += gap
        _, full_at = take_token(full_at, now, old_burst, old_interval)
    decision, after = take_token(full_at, now, burst, interval)
    assert round(decision.retry_after * NS) <= interval
    assert round(decision.reset_after * NS) <= burst * interval
    assert after - now <= burst * interval  # the cut is stored, not only reported
