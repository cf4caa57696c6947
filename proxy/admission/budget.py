"""What one request was charged, shown on its answer and reconciled when it ends.

admission.py charges a request and hands back a :class:`Charged`: the request
bucket's and the token buckets' answers, and, when a token budget applies,
the reservation made for it. The exchange keeps it until the answer has
ended; then :meth:`Charged.reconcile` replaces the reservation with what the
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
from .buckets import Decision, RateLimiter, TokenDecision

__all__ = [
    "REMAINING_REQUESTS",
    "REMAINING_TOKENS",
    "RESET_REQUESTS",
    "RESET_TOKENS",
    "Charged",
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

    Rounded up, to whole milliseconds below one second and to whole seconds above.
    """
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    total = math.ceil(seconds)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


class Charged:
    """What one request was charged: the request bucket's decision and the token
    buckets' decision (each ``None`` when no such limit applies) and, with a
    token budget, the reservation to reconcile: ``estimate`` tokens (as logged),
    of which each window (minute, day) was charged ``costs`` (the estimate, cut
    to the window's capacity), in the token buckets ``key`` of ``storage``.

    ``charged_tokens`` is ``None`` until :meth:`reconcile` ran, then the tokens
    the buckets were finally charged for the request. One object per request,
    slotted and plain: it is made on the hot path.
    """

    __slots__ = (
        "budget", "charged_tokens", "costs", "estimate", "key", "request", "storage", "tokens",
    )  # fmt: skip

    def __init__(
        self,
        request: Decision | None,
        tokens: TokenDecision | None = None,
        storage: RateLimiter | None = None,
        key: str = "",
        budget: TokenBudget | None = None,
        estimate: int | None = None,
        costs: tuple[int, int] = (0, 0),
    ) -> None:
        self.request = request
        self.tokens = tokens
        self.storage = storage
        self.key = key
        self.budget = budget
        self.estimate = estimate
        self.costs = costs
        self.charged_tokens: int | None = None

    @property
    def reserves_tokens(self) -> bool:
        return self.estimate is not None

    def add_headers(self, headers: MutableMapping[str, str]) -> None:
        """The ``x-oaimux-ratelimit-*`` headers: what is left in the buckets
        this request was charged to, and when they are full again."""
        request = self.request
        if request is not None:
            headers[REMAINING_REQUESTS] = str(request.remaining)
            headers[RESET_REQUESTS] = openai_duration(request.reset_after)
        tokens = self.tokens
        if tokens is not None:
            headers[REMAINING_TOKENS] = str(tokens.remaining)
            headers[RESET_TOKENS] = openai_duration(tokens.reset_after)

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
        if billable is None and produced:
            self.charged_tokens = estimate
            return True
        charged = self.charged_tokens = billable or 0
        costs = self.costs
        deltas = (charged - costs[0], charged - costs[1])
        if deltas != (0, 0) and self.storage is not None and self.budget is not None:
            self.storage.settle(self.key, self.budget, deltas)
        return False
