"""What one request was charged, shown on its answer and reconciled when it ends.

admission.py charges a request and hands back what it charged: a
:class:`Reservation` for a request charged tokens alone (the usual case of a
token budget), else a :class:`Charged` (the request bucket's decision, and the
reservation when one was made). The exchange keeps it until the answer has
ended (it knows either as observe/charge.py's ``Charge``, a protocol both
satisfy); then the observer works out what the answer's usage bills and
:meth:`Reservation.reconcile` replaces the reservation with it (README: Token
budgets):

- usage in the answer (any reader's :class:`~proxy.observe.usage.Usage`): the
  buckets are charged its billable tokens instead of the estimate, so a
  smaller answer gives the difference back at once and a larger one takes the
  overrun (a bucket may then owe more than it holds, and the next request
  waits);
- no upstream produced anything (the proxy answered with an error of its own,
  or the upstream answered with an error status): refunded in full;
- otherwise (no usage reported, a compressed body, a stream cut short, a
  client that left, a response timeout): the reservation is kept, and the
  answer counts as unreconciled.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import ClassVar, NamedTuple

from multidict import istr

from ..config.settings import TokenBudget
from .buckets import Decision, RateLimiter
from .buckets_memory import MemoryRateLimiter
from .token_buckets import TokenState

__all__ = [
    "REMAINING_REQUESTS",
    "REMAINING_TOKENS",
    "RESET_REQUESTS",
    "RESET_TOKENS",
    "Charged",
    "Reservation",
    "openai_duration",
    "reservation",
]

# The proxy's own budget, on every answer of a charged request; the upstream's
# x-ratelimit-* headers (its limits on the proxy's account) pass untouched.
REMAINING_REQUESTS = istr("x-oaimux-ratelimit-remaining-requests")
RESET_REQUESTS = istr("x-oaimux-ratelimit-reset-requests")
REMAINING_TOKENS = istr("x-oaimux-ratelimit-remaining-tokens")
RESET_TOKENS = istr("x-oaimux-ratelimit-reset-tokens")


def openai_duration(seconds: float) -> str:
    """OpenAI's reset format (Go's duration): ``250ms``, ``1s``, ``6m0s``, ``1h2m3s``.

    Rounded up, to whole milliseconds below one second (at least ``1ms``) and
    to whole seconds above. Written on every answer of a limited request, so
    each text is made once: below a second from a table, above from a
    bounded memo.
    """
    if seconds < 1:
        ms = _ceil(seconds * 1000)
        return _MILLISECONDS[ms] if ms > 0 else "1ms"
    total = _ceil(seconds)
    text = _SECONDS.get(total)
    if text is None:
        h, rest = divmod(total, 3600)
        m, s = divmod(rest, 60)
        text = f"{h}h{m}m{s}s" if h else f"{m}m{s}s" if m else f"{s}s"
        if len(_SECONDS) < _SECONDS_KEPT:
            _SECONDS[total] = text
    return text


_ceil = math.ceil
# Index 0 is "1ms" too: a bucket full again within the millisecond says so
# (Reservation.add_headers reads the table without openai_duration's test).
_MILLISECONDS = ("1ms", *(f"{ms}ms" for ms in range(1, 1001)))
_SECONDS: dict[int, str] = {}
_SECONDS_KEPT = 4096


class Reservation:
    """The tokens reserved for one request: ``estimate`` tokens under
    ``budget``, charged to the token buckets ``key`` of ``storage``.
    ``state``: what those buckets owe (in memory, the buckets' own state,
    refunded in place, see :meth:`reconcile`; from Redis, the figures its
    answer gave, in a state of their own).

    What the exchange keeps of a request charged tokens alone (a block with
    no request limit, the usual reservation in memory), so made without an
    ``__init__`` (:func:`reservation`): one per model request.
    observe/charge.py's ``Charge`` is what the exchange knows of it, as of
    :class:`Charged`.
    """

    __slots__ = ("budget", "estimate", "key", "state", "storage")
    budget: TokenBudget
    estimate: int
    key: str
    state: TokenState
    storage: RateLimiter
    shadowed: ClassVar[str | None] = None  # it fitted (Charged says when it did not)

    def add_headers(self, headers: MutableMapping[str, str]) -> None:
        """The ``x-oaimux-ratelimit-*-tokens`` headers: what is left in the
        window with the fewest tokens left, and when it is full again."""
        budget, state = self.budget, self.state
        # What the state owes may be below zero: a refund goes into it whole,
        # and a bucket owes at least nothing (Reservation.reconcile).
        owed_m, owed_d = state.minute, state.day
        if owed_m < 0.0:
            owed_m = 0.0
        if owed_d < 0.0:
            owed_d = 0.0
        cap_m, cap_d = budget.room_minute, budget.room_day
        if cap_m and not (cap_d and cap_d - owed_d < cap_m - owed_m):
            left, reset = cap_m - owed_m, owed_m * budget.ns_minute
        else:
            left, reset = cap_d - owed_d, owed_d * budget.ns_day
        headers[REMAINING_TOKENS] = str(int(left)) if left > 0.0 else "0"
        ms = _ceil(reset * 1e-6)  # (openai_duration, below a second written out)
        headers[RESET_TOKENS] = _MILLISECONDS[ms] if ms <= 1000 else openai_duration(ms / 1000)

    def reconcile(self, billable: int) -> None:
        """Charge the buckets ``billable`` tokens (what the answer's usage
        bills; 0 when no upstream produced any) instead of the estimate: give
        back the difference or charge the overrun (see the module docstring).

        The usual case, in memory, is a refund of an estimate charged whole to
        each window (of the budget the state is still under: a reload may have
        added one): it goes into the state in place, no clock, no lookup.
        Exact: a bucket that owes ``S`` as of ``at`` owes ``max(0, S - drain)``
        now, and ``max(0, max(0, S - drain) + refund)`` equals
        ``max(0, S + refund - drain)`` for any refund <= 0, so the refund can
        go into ``S`` itself, at any time (below zero too: a bucket is read as
        owing at least nothing; a window not limited owes nothing whatever its
        ``S``). The heap entry stays as late as it was (the sweeper retires the
        bucket a little later); a state the sweeper already retired is full,
        and the refund changes nothing, as a settle would. Anything else is
        the store's ``settle``, window by window.
        """
        estimate = self.estimate
        refund = billable - estimate
        state = self.state
        if (
            refund <= 0
            and estimate <= self.budget.cap_smallest
            and state.budget is self.budget
            and type(self.storage) is MemoryRateLimiter
        ):
            state.minute += refund
            state.day += refund
            return
        budget = self.budget
        cap_m, cap_d = budget.cap_minute, budget.cap_day
        delta_m = billable - (estimate if estimate < cap_m else cap_m) if cap_m else 0
        delta_d = billable - (estimate if estimate < cap_d else cap_d) if cap_d else 0
        if delta_m or delta_d:
            self.storage.settle(self.key, budget, (delta_m, delta_d))


def reservation(
    budget: TokenBudget, estimate: int, state: TokenState, storage: RateLimiter, key: str
) -> Reservation:
    """A :class:`Reservation` (a function, for callers off the hot path)."""
    made = _new_reservation(Reservation)
    made.budget, made.estimate, made.state, made.storage, made.key = (
        budget, estimate, state, storage, key
    )  # fmt: skip
    return made


# A Reservation without its (absent) __init__: admission.py fills its slots in.
_new_reservation = object.__new__


class Charged(NamedTuple):
    """What one request was charged, when not tokens alone: the request
    bucket's decision (``None``: no request limit) and the token reservation
    (``None``: none was made), whose ``budget`` and ``estimate`` are repeated
    here (``None`` and 0 without one) as the exchange reads them.
    ``shadowed``: the window that would have refused the request had
    ``budget.enforce`` been true (``None``: it fitted). Made with
    ``tuple.__new__`` (admission.py): a NamedTuple's own ``__new__`` is a
    Python frame.
    """

    request: Decision | None
    budget: TokenBudget | None
    estimate: int
    reserved: Reservation | None
    shadowed: str | None

    def add_headers(self, headers: MutableMapping[str, str]) -> None:
        """The ``x-oaimux-ratelimit-*`` headers of the buckets charged."""
        request, _, _, reserved, _ = self
        if request is not None:
            headers[REMAINING_REQUESTS] = str(request[1])  # (Decision.remaining)
            headers[RESET_REQUESTS] = openai_duration(request[3])  # (.reset_after)
        if reserved is not None:
            reserved.add_headers(headers)

    def reconcile(self, billable: int) -> None:
        """:meth:`Reservation.reconcile` (called only when one was made)."""
        assert self.reserved is not None
        self.reserved.reconcile(billable)
