"""What one request was charged, shown on its answer and reconciled when it ends.

admission.py charges a request and hands back a :class:`Charged`: the request
bucket's and the token buckets' answers, and, when a token budget applies,
the reservation made for it. The exchange keeps it until the answer has
ended (it knows it as observe/charge.py's ``Charge``, a protocol that
:class:`Charged` satisfies); then :meth:`Charged.reconcile` replaces the reservation with what the
answer really used (README: Token budgets):

- usage in the answer (any reader's :class:`~proxy.observe.usage.Usage`): the buckets
  are charged its billable tokens instead of the estimate, so a smaller answer
  gives the difference back at once and a larger one takes the overrun (a
  bucket may then owe more than it holds, and the next request waits);
- no upstream produced anything (the proxy answered with an error of its own,
  or the upstream answered with an error status): refunded in full;
- otherwise (no usage reported, a compressed body, a stream cut short, a
  client that left, a response timeout): the reservation is kept, and the
  answer counts as unreconciled.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping

from multidict import istr

from ..config.settings import TokenBudget
from ..observe.usage import Usage, billable_tokens
from .buckets import Decision, RateLimiter, Reserved
from .buckets_memory import MemoryRateLimiter

__all__ = [
    "REMAINING_REQUESTS",
    "REMAINING_TOKENS",
    "RESET_REQUESTS",
    "RESET_TOKENS",
    "Charged",
    "Reservation",
    "openai_duration",
]

# The proxy's own budget, on every answer of a charged request; the upstream's
# x-ratelimit-* headers (its limits on the proxy's account) pass untouched.
REMAINING_REQUESTS = istr("x-oaimux-ratelimit-remaining-requests")
RESET_REQUESTS = istr("x-oaimux-ratelimit-reset-requests")
REMAINING_TOKENS = istr("x-oaimux-ratelimit-remaining-tokens")
RESET_TOKENS = istr("x-oaimux-ratelimit-reset-tokens")


def openai_duration(seconds: float) -> str:
    """OpenAI's reset format (Go's duration): ``250ms``, ``1s``, ``6m0s``, ``1h2m3s``.

    Rounded up, to whole milliseconds below one second and to whole seconds
    above. Written on every answer of a limited request, so each text is made
    once: below a second from a table, above from a bounded memo.
    """
    if seconds < 1:
        ms = math.ceil(seconds * 1000)
        return _MILLISECONDS[ms] if ms > 0 else "1ms"
    total = math.ceil(seconds)
    text = _SECONDS.get(total)
    if text is None:
        h, rest = divmod(total, 3600)
        m, s = divmod(rest, 60)
        text = f"{h}h{m}m{s}s" if h else f"{m}m{s}s" if m else f"{s}s"
        if len(_SECONDS) < _SECONDS_KEPT:
            _SECONDS[total] = text
    return text


_MILLISECONDS = tuple(f"{ms}ms" for ms in range(1001))
_SECONDS: dict[int, str] = {}
_SECONDS_KEPT = 4096


# What a token reservation charged, as admission.py has it at hand: the tokens
# charged per minute and per day (the estimate, cut to each window's capacity;
# 0 for a window not limited), and the store's answer (:data:`Reserved`: what
# the windows owed before and after, and in memory the buckets' state). One
# tuple of two made per model request, read only where used.
Reservation = tuple[tuple[int, int], Reserved]


class Charged:
    """What one request was charged: the request bucket's decision (``None``
    when no request limit applies) and, with a token budget, the reservation
    to reconcile: ``estimate`` tokens (as logged), charged to the token
    buckets ``key`` of ``storage`` as ``reservation`` says. ``shadowed``: the
    window that would have refused the request had ``budget.enforce`` been
    true (``None``: it fitted; set by admission.py after construction, as it
    is rare).

    ``charged_tokens`` is ``None`` until :meth:`reconcile` ran, then the tokens
    the buckets were finally charged for the request. One object per request,
    slotted and plain, built with positional arguments: it is made on the hot
    path, and the figures of the headers are worked out only when they are
    written. observe/charge.py's ``Charge`` is what the exchange knows of it.
    """

    __slots__ = (
        "budget", "charged_tokens", "estimate", "key", "request", "reservation", "shadowed",
        "storage",
    )  # fmt: skip

    def __init__(
        self,
        request: Decision | None,
        budget: TokenBudget | None = None,
        storage: RateLimiter | None = None,
        key: str = "",
        estimate: int | None = None,
        reservation: Reservation | None = None,
    ) -> None:
        self.request = request
        self.budget = budget
        self.storage = storage
        self.key = key
        self.estimate = estimate
        self.reservation = reservation
        self.shadowed: str | None = None
        self.charged_tokens: int | None = None

    def add_headers(self, headers: MutableMapping[str, str]) -> None:
        """The ``x-oaimux-ratelimit-*`` headers: what is left in the buckets
        this request was charged to, and when they are full again (for the
        token windows, the one with the fewest tokens left)."""
        request = self.request
        if request is not None:
            headers[REMAINING_REQUESTS] = str(request.remaining)
            headers[RESET_REQUESTS] = openai_duration(request.reset_after)
        budget = self.budget
        reservation = self.reservation
        if budget is not None and reservation is not None:
            cap_m, cap_d = budget.cap_minute, budget.cap_day
            reserved = reservation[1]
            owed_m, owed_d = reserved[3], reserved[4]  # what the windows owed after it
            if cap_m and not (cap_d and cap_d - owed_d < cap_m - owed_m):
                left, reset = cap_m - owed_m, owed_m * budget.ns_minute
            else:
                left, reset = cap_d - owed_d, owed_d * budget.ns_day
            headers[REMAINING_TOKENS] = str(int(left)) if left > 0.0 else "0"
            headers[RESET_TOKENS] = openai_duration(reset / 1e9)

    def reconcile(self, usage: Usage | None, produced: bool) -> bool:
        """Settle the reservation as the module docstring says.

        ``usage``: what the answer reported, if anything (from any reader);
        ``produced``: whether an upstream may have produced tokens for it
        (false: refund in full). Returns True when the reservation was kept
        without a count (an unreconciled answer).
        """
        estimate = self.estimate
        if estimate is None or self.charged_tokens is not None:
            return False
        billable = None if usage is None else billable_tokens(usage)
        if billable is None:
            if produced:
                self.charged_tokens = estimate
                return True
            billable = 0
        self.charged_tokens = billable
        budget = self.budget
        reservation = self.reservation
        if budget is None or self.storage is None or reservation is None:
            return False
        (cost_m, cost_d), reserved = reservation
        delta_m = billable - cost_m if budget.cap_minute else 0
        delta_d = billable - cost_d if budget.cap_day else 0
        if delta_m <= 0 and delta_d <= 0:  # the usual case: the estimate was generous
            state = reserved[6]  # the buckets' state in memory as charged (None in Redis)
            if state is not None:
                MemoryRateLimiter.refund(state, delta_m, delta_d)
                return False
            if not (delta_m or delta_d):
                return False
        self.storage.settle(self.key, budget, (delta_m, delta_d))
        return False
