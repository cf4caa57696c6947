"""Token budgets' buckets: a minute's and a day's tokens per client.

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
and a lowered one refills no one. The cut of buckets.py's module docstring
applies, in tokens: a bucket never owes more than its *ceiling*, twice its
capacity (a whole budget reserved, and at most one more charged by answers
that used more than they reserved); anything above is cut on read. Counts
are floats (Lua's numbers in Redis are doubles too), exact for whole tokens
far beyond any budget.

The stores that keep these buckets, beside the request buckets, are
buckets_memory.py and buckets_redis.py.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ..config.settings import TokenBudget

__all__ = [
    "DAY",
    "MINUTE",
    "TokenDecision",
    "TokenState",
    "settle_tokens",
    "take_tokens",
    "token_decision",
]

MINUTE = 60.0  # seconds: the two token windows
DAY = 86_400.0


class TokenState:
    """One client's token buckets in this process (buckets_memory.py): what the
    minute's and the day's windows owed (``minute``, ``day``) as of ``at``
    (ns), written under ``budget``. A state written under another budget (a
    reload changed it) is cut to this one's ceiling when next read; one
    written under the budget in force never exceeds it, so it is read with
    no cut.

    Slotted: one per client with a token budget (about 70 bytes; a list of
    the same four is about 100).
    """

    __slots__ = ("at", "budget", "day", "minute")

    def __init__(self, minute: float, day: float, at: int, budget: TokenBudget) -> None:
        self.minute = minute
        self.day = day
        self.at = at
        self.budget = budget

    @property
    def full_at(self) -> float:
        """When both windows have drained (ns), at the rates of ``budget``."""
        budget = self.budget
        drained_m = self.minute * budget.ns_minute  # 0.0 for a window not limited
        drained_d = self.day * budget.ns_day
        return self.at + (drained_m if drained_m > drained_d else drained_d)


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
