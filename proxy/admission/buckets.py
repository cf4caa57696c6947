"""Per-client request buckets, and what a store of buckets offers.

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
pass a fake one). This module also states what a bucket storage offers
(:class:`RateLimiter`): buckets_memory.py keeps buckets in this process,
buckets_redis.py keeps them in Redis for many processes and machines. Token
budgets' buckets (a minute's and a day's tokens) are token_buckets.py's.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from ..config.settings import RateLimitSettings, TokenBudget
from .token_buckets import TokenState

__all__ = [
    "NS",
    "Decision",
    "RateLimiter",
    "Reserved",
    "StorageUnavailable",
    "interval_ns",
    "take_token",
]

NS = 1_000_000_000


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


# A reservation's answer (:meth:`RateLimiter.reserve`): the request bucket's
# decision (None: no request limit), the tokens owed per minute and per day
# before the reservation and after it (after is before when nothing was
# charged), whether the request bucket and every window had room, and, in
# memory, the token buckets' state as charged (see buckets_memory.py's
# budget.py's Reservation.reconcile; None from Redis). Flat: one is made per model
# request; token_buckets.py's token_decision makes the figures of a refusal
# from it.
Reserved = tuple[Decision | None, float, float, float, float, bool, TokenState | None]


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
        estimate: int,
    ) -> Reserved:
        """In one atomic step: take one token from the request bucket ``key``
        (when ``limit`` is set) and reserve ``estimate`` tokens from each of the
        client's token buckets of the same key (at most a window's capacity).
        Nothing is taken unless both have room, except that with
        ``budget.enforce`` false the tokens are taken anyway (see
        :data:`Reserved` for the answer; when the request bucket refuses, the
        token buckets are reported untouched)."""
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
