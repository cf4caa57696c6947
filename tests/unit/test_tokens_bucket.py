"""Token budgets' arithmetic and the in-memory store, on a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.admission.admission import estimate_tokens
from proxy.admission.buckets import NS, Decision
from proxy.admission.buckets_memory import MemoryRateLimiter
from proxy.admission.budget import reservation
from proxy.admission.token_buckets import (
    TokenDecision,
    settle_tokens,
    take_tokens,
    token_decision,
)
from proxy.config import ConfigError, parse_settings
from proxy.config.settings import Limits, RateLimitSettings, TokenBudget

MINUTE_NS = 60 * NS
DAY_NS = 86400 * NS
PER_MINUTE = TokenBudget(per_minute=1000, per_day=None)
BOTH = TokenBudget(per_minute=1000, per_day=5000)


def reserve(
    limiter: MemoryRateLimiter,
    key: str,
    limit: RateLimitSettings | None,
    budget: TokenBudget,
    estimate: int,
) -> tuple[Decision | None, TokenDecision]:
    """One reservation, and its figures as a refusal's message would give them."""
    decision, before_m, before_d, after_m, after_d, fits, _ = limiter.reserve_now(
        key, limit, budget, estimate
    )
    costs = (min(estimate, budget.cap_minute), min(estimate, budget.cap_day))
    tokens = token_decision(budget, (before_m, before_d), (after_m, after_d), costs, fits)
    return decision, tokens


class Clock:
    def __init__(self) -> None:
        self.now = 10**15

    def __call__(self) -> int:
        return self.now


def test_a_bucket_refills_continuously_over_its_window() -> None:
    # 600 owed, half a minute later: 100 owed on a 1000/min budget.
    # (minute before, day before, minute after, day after, fits)
    taken = take_tokens((600.0, 0.0), MINUTE_NS / 2, NS, (1000, 0), (900, 0), False)
    assert taken == (100.0, 0.0, 1000.0, 0.0, True)
    # One token more does not fit, and nothing is charged.
    taken = take_tokens((600.0, 0.0), MINUTE_NS / 2, NS, (1000, 0), (901, 0), False)
    assert taken == (100.0, 0.0, 100.0, 0.0, False)


def test_every_window_must_have_room() -> None:
    owed = (0.0, 4800.0)  # the minute is empty, the day nearly spent
    taken = take_tokens(owed, 0, NS, (1000, 5000), (300, 300), False)
    assert taken == (0.0, 4800.0, 0.0, 4800.0, False)
    decision = token_decision(BOTH, owed, owed, (300, 300), False)
    assert (decision.window, decision.limit, decision.used) == ("day", 5000, 4800)
    assert decision.retry_after == pytest.approx(100 * 86400 / 5000)  # 100 tokens of a day's refill


def test_enforce_false_charges_what_does_not_fit() -> None:
    taken = take_tokens((900.0, 0.0), 0, NS, (1000, 0), (300, 0), True)
    assert taken == (900.0, 0.0, 1200.0, 0.0, False)


def test_debts_are_cut_to_twice_the_budget() -> None:
    assert take_tokens((50000.0, 0.0), 0, NS, (1000, 0), (0, 0), False)[:2] == (2000.0, 0.0)
    assert settle_tokens((900.0, 0.0), 0, NS, (1000, 0), (10**6, 0)) == (2000.0, 0.0)
    assert settle_tokens((900.0, 0.0), 0, NS, (1000, 0), (-(10**6), 0)) == (0.0, 0.0)


def test_the_decision_names_the_tightest_window_when_allowed() -> None:
    decision = token_decision(BOTH, (0.0, 4100.0), (100.0, 4200.0), (100, 100), True)
    assert (decision.window, decision.remaining, decision.retry_after) == ("day", 800, 0.0)
    assert decision.reset_after == pytest.approx(4200 * 86400 / 5000)


# ---------------------------------------------------------------------------
# The in-memory store


def test_reservation_and_request_bucket_are_all_or_nothing() -> None:
    clock = Clock()
    limiter = MemoryRateLimiter(clock)
    requests = RateLimitSettings(requests_per_minute=1, burst=5)
    for _ in range(2):
        decision, tokens = reserve(limiter, "c", requests, PER_MINUTE, 500)
        assert decision is not None and decision.allowed and tokens.allowed
    decision, tokens = reserve(limiter, "c", requests, PER_MINUTE, 1)
    assert decision is not None and decision.allowed and not tokens.allowed
    # The refused reservation took no request token: 3 of 5 are left.
    assert limiter.acquire_now("c", requests).remaining == 2
    # A request bucket that refuses leaves the tokens alone.
    for _ in range(2):
        limiter.acquire_now("c", requests)
    decision, tokens = reserve(limiter, "c", requests, PER_MINUTE, 0)
    assert decision is not None and not decision.allowed
    limiter.settle("c", PER_MINUTE, (-1000, 0))
    assert reserve(limiter, "c", None, PER_MINUTE, 1000)[1].allowed


def test_a_raised_limit_gives_room_at_once_and_a_lowered_one_refills_no_one() -> None:
    clock = Clock()
    limiter = MemoryRateLimiter(clock)
    assert reserve(limiter, "t", None, PER_MINUTE, 1000)[1].allowed
    raised = TokenBudget(per_minute=100000, per_day=None)
    _, tokens = reserve(limiter, "t", None, raised, 5000)
    # The 1000 owed are 1000 of the new budget (kept as a time, they would be
    # a whole minute of it, and this would wait).
    assert tokens.allowed and tokens.remaining == 100000 - 1000 - 5000
    lowered = TokenBudget(per_minute=100, per_day=None)
    _, tokens = reserve(limiter, "t", None, lowered, 10)
    # 6000 owed, cut to twice the new budget: 200; 110 over it at 100 a minute.
    assert not tokens.allowed and tokens.used == 200
    assert tokens.retry_after == pytest.approx(110 * 60 / 100)
    # The cut is kept (the state is now the lowered budget's): once the wait
    # has passed, the 10 fit, and not a nanosecond before.
    clock.now += 66 * NS - 1
    assert not reserve(limiter, "t", None, lowered, 10)[1].allowed
    clock.now += 1
    _, tokens = reserve(limiter, "t", None, lowered, 10)
    assert tokens.allowed and tokens.remaining == 0


def test_the_day_window_refills_over_24_hours() -> None:
    clock = Clock()
    limiter = MemoryRateLimiter(clock)
    day = TokenBudget(per_minute=None, per_day=2400)
    assert reserve(limiter, "t", None, day, 2400)[1].window == "day"
    clock.now += 3600 * NS  # an hour: 100 tokens back
    _, tokens = reserve(limiter, "t", None, day, 101)
    assert not tokens.allowed
    assert tokens.retry_after == pytest.approx(86400 / 2400)  # the one token missing
    assert reserve(limiter, "t", None, day, 100)[1].allowed


async def test_drained_token_buckets_are_swept() -> None:
    clock = Clock()
    limiter = MemoryRateLimiter(clock)
    for i in range(100):
        reserve(limiter, f"c{i}", None, BOTH, 100)
    reserve(limiter, "busy", None, BOTH, 1000)
    assert len(limiter) == 101
    # The minutes are full after 6 s; the days owe 100 of 5000: 28.8 minutes.
    clock.now += 29 * 60 * NS
    assert await limiter.sweep() == 100
    assert len(limiter) == 1  # "busy" owes its day 1000: 4.8 hours (its minute: 1 minute)
    clock.now += 5 * 3600 * NS
    assert await limiter.sweep() == 1
    assert len(limiter) == 0
    await limiter.close()


async def test_a_token_bucket_used_again_is_swept_only_once_drained() -> None:
    """Its heap entry comes due when the first reservation would have drained;
    the bucket, owing more since, is kept until it has drained too."""
    clock = Clock()
    limiter = MemoryRateLimiter(clock)
    reserve(limiter, "t", None, BOTH, 100)  # the day drains in 28.8 minutes
    clock.now += 20 * 60 * NS
    reserve(limiter, "t", None, BOTH, 100)  # owes 130.6 of its day: 37.6 minutes
    clock.now += 10 * 60 * NS  # 30 minutes: the entry is due, the bucket is not
    assert await limiter.sweep() == 0
    assert len(limiter) == 1
    clock.now += 28 * 60 * NS  # 58 minutes
    assert await limiter.sweep() == 1
    assert len(limiter) == 0
    await limiter.close()


def test_a_settled_refund_of_an_evicted_bucket_stores_nothing() -> None:
    limiter = MemoryRateLimiter(Clock())
    limiter.settle("t", PER_MINUTE, (-500, 0))
    assert len(limiter) == 0
    limiter.settle("t", PER_MINUTE, (700, 0))  # an overrun after the bucket was gone
    assert reserve(limiter, "t", None, PER_MINUTE, 301)[1].allowed is False


# ---------------------------------------------------------------------------
# The estimate and the configuration


@pytest.mark.parametrize(
    ("prompt_bytes", "cap", "budget", "expected"),
    [
        (400, None, TokenBudget(1000, None), 100 + 1024),  # the default output part
        (401, 50, TokenBudget(1000, None), 101 + 50),  # ceil(bytes / 4)
        (0, 128000, TokenBudget(1000, None), 4096),  # capped by max_output_reservation
        (0, 128000, TokenBudget(1000, None, max_output_reservation=None), 128000),
        (8, None, TokenBudget(1000, None, default_output_tokens=0), 2),
    ],
)
def test_the_estimate(
    prompt_bytes: int, cap: int | None, budget: TokenBudget, expected: int
) -> None:
    assert estimate_tokens(prompt_bytes, cap, budget) == expected


def settings_with(rate: Any) -> Any:
    return parse_settings(
        {
            "upstreams": {"u": {"url": "http://127.0.0.1:1/v1"}},
            "routes": [{"model": "m", "upstream": "u", "rate_limit": rate}],
            "auth": {"keys": [{"name": "k", "key": "sk-0123456789", "rate_limit": rate}]},
            "rate_limit": rate,
        },
        environ={},
    )


def test_token_budgets_parse_wherever_a_limit_can_be_set() -> None:
    rate = {
        "requests_per_minute": 600, "burst": 50, "tokens_per_minute": 200000,
        "tokens_per_day": 2000000, "default_output_tokens": 512,
        "max_output_reservation": None, "enforce": False,
    }  # fmt: skip
    settings = settings_with(rate)
    expected = Limits(
        RateLimitSettings(600, 50),
        TokenBudget(200000, 2000000, default_output_tokens=512, max_output_reservation=None,
                    enforce=False),
    )  # fmt: skip
    assert settings.rate_limit == expected
    assert settings.routes[0].rate_limit == expected
    assert settings.auth_keys[0].rate_limit == expected
    # Either window alone, with the defaults.
    alone = settings_with({"tokens_per_day": 10}).rate_limit
    assert alone == Limits(None, TokenBudget(None, 10, 1024, 4096, True))


@pytest.mark.parametrize(
    ("rate", "where", "says"),
    [
        ({}, "rate_limit", "set at least one of"),
        ({"burst": 5}, "rate_limit", "requests_per_minute"),
        ({"tokens_per_minute": 0}, "rate_limit.tokens_per_minute", "whole number"),
        ({"tokens_per_day": 1.5}, "rate_limit.tokens_per_day", "whole number"),
        ({"default_output_tokens": 5, "requests_per_minute": 1, "burst": 1},
         "rate_limit.default_output_tokens", "needs tokens_per_minute or tokens_per_day"),
        ({"tokens_per_day": 9, "enforce": "no"}, "rate_limit.enforce", "true or false"),
        ({"tokens_per_day": 9, "max_output_reservation": -1},
         "rate_limit.max_output_reservation", "whole number"),
        ({"tokens_per_day": 9, "tokens_per_hour": 9}, "rate_limit", "unknown key"),
    ],
)  # fmt: skip
def test_bad_budgets_are_refused_by_key_path(rate: dict[str, Any], where: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(
            {"upstreams": {"u": {"url": "http://127.0.0.1:1/v1"}},
             "routes": [{"model": "m", "upstream": "u"}], "rate_limit": rate},
            source="routes.yaml",
            environ={},
        )  # fmt: skip
    message = str(info.value)
    assert message.startswith(f"routes.yaml: {where}: "), message
    assert says in message


def test_a_window_of_refill_repays_a_whole_budget() -> None:
    owed = (1000.0, 2400.0)
    assert take_tokens(owed, DAY_NS, NS, (1000, 2400), (0, 0), False)[:2] == (0.0, 0.0)
    half_day = take_tokens(owed, DAY_NS // 2, NS, (1000, 2400), (0, 0), False)[:2]
    assert half_day == (0.0, 1200.0)


@pytest.mark.parametrize("later_ns", [0, 3 * NS, 30 * NS, 120 * NS])
def test_a_refund_into_the_state_equals_a_settle(later_ns: int) -> None:
    # Two clients, the same reservations on the same clock; the answer's
    # refund goes into the returned state for one (Reservation.reconcile, in
    # place) and through settle for the other, some time later: the next
    # reservation sees the same buckets.
    clock = Clock()
    limiter = MemoryRateLimiter(clock)
    for key in ("refunded", "settled"):
        reserve(limiter, key, None, BOTH, 300)
    clock.now += NS
    state = limiter.reserve_now("refunded", None, BOTH, 600)[6]
    limiter.reserve_now("settled", None, BOTH, 600)
    clock.now += later_ns
    assert state is not None
    reservation(BOTH, 600, state, limiter, "refunded").reconcile(50)  # 550 given back
    limiter.settle("settled", BOTH, (-550, -550))
    clock.now += NS
    refunded = limiter.reserve_now("refunded", None, BOTH, 10)
    settled = limiter.reserve_now("settled", None, BOTH, 10)
    assert refunded[1:6] == pytest.approx(settled[1:6])


def test_after_a_reload_adds_a_window_an_earlier_answer_settles_only_what_it_charged() -> None:
    # A reserved under a budget with no day window; B under the reloaded one,
    # which has one. A's refund (its upstream failed) and overrun go to the
    # minute alone, and the day keeps what B owes it.
    before = TokenBudget(per_minute=100_000, per_day=None)
    after = TokenBudget(per_minute=100_000, per_day=1000)
    for billable, minute in ((0, 900.0), (1000, 1900.0)):
        clock = Clock()
        limiter = MemoryRateLimiter(clock)
        first = reservation(before, 800, limiter.take_tokens_now("k", before, 800), limiter, "k")
        assert limiter.take_tokens_now("k", after, 900) is not None
        first.reconcile(billable)
        state = limiter.take_tokens_now("k", after, 0)
        assert state is not None
        assert (state.minute, state.day) == (minute, 900.0)
