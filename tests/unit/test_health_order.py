"""The order upstreams are tried in, and the retry backoff, with seeded randomness."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from proxy.config import Balance
from proxy.outbound.health import MAX_BACKOFF, backoff_delay, order_upstreams


def test_fallback_list_is_file_order_without_copying() -> None:
    names = ("a", "b", "c")
    assert order_upstreams(names, None) is names


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_balance_first_choice_follows_the_weights(seed: int) -> None:
    balance = Balance((("a", 3), ("b", 1), ("c", 4)))
    rng = random.Random(seed)
    draws = 8000
    first = Counter(order_upstreams(("a", "b", "c"), balance, rng)[0] for _ in range(draws))
    for name, weight in balance.weights:
        p = weight / 8
        expected = draws * p
        sd = math.sqrt(draws * p * (1 - p))
        assert abs(first[name] - expected) < 5 * sd, (name, first)


def test_balance_lists_every_member_once_and_others_fall_back() -> None:
    balance = Balance((("a", 1), ("b", 1), ("c", 1)))
    rng = random.Random(7)
    seconds: Counter[str] = Counter()
    for _ in range(3000):
        order = list(order_upstreams(("a", "b", "c"), balance, rng))
        assert sorted(order) == ["a", "b", "c"]
        seconds[order[1]] += 1
    assert all(800 < seconds[n] < 1200 for n in "abc"), seconds


def test_heavier_fallback_comes_second_more_often() -> None:
    balance = Balance((("a", 1), ("b", 9), ("c", 1)))
    rng = random.Random(11)
    after_b = Counter(
        order[1]
        for order in (order_upstreams(("a", "b", "c"), balance, rng) for _ in range(4000))
        if order[0] == "b"
    )
    assert after_b["a"] > 0 and after_b["c"] > 0
    assert abs(after_b["a"] - after_b["c"]) < 0.15 * (after_b["a"] + after_b["c"])


def test_single_member_balance() -> None:
    assert list(order_upstreams(("a",), Balance((("a", 5),)))) == ["a"]


def test_backoff_is_full_jitter_doubling_and_capped() -> None:
    rng = random.Random(5)
    for attempt, ceiling in [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6)]:
        delays = [backoff_delay(0.2, attempt, rng) for _ in range(2000)]
        assert all(0 <= d <= ceiling for d in delays)
        # Spread over the whole range, not a fixed step.
        assert min(delays) < 0.05 * ceiling and max(delays) > 0.95 * ceiling
    assert all(backoff_delay(5.0, 9, rng) <= MAX_BACKOFF for _ in range(100))
    assert backoff_delay(0.0, 3, rng) == 0.0
