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
from typing import NamedTuple

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
# (Charged.add_headers reads the table without openai_duration's test).
_MILLISECONDS = ("1ms", *(f"{ms}ms" for ms in range(1, 1001)))
_SECONDS: dict[int, str] = {}
_SECONDS_KEPT = 4096


class Charged(NamedTuple):
    """What one request was charged (admission.py makes it, with
    ``tuple.__new__``: one is made per charged request, and a NamedTuple's own
    ``__new__`` is a Python frame).

    ``request``: the request bucket's decision (``None``: no request limit).
    ``tokens``: the token budget a reservation was made under (``None``: none
    was, and the fields after it are unused): ``estimate`` tokens, charged to
    the token buckets ``key`` of ``storage``; ``state``: what those buckets
    owe (in memory, the buckets' own state, refunded in place, see
    buckets_memory.py's ``MemoryRateLimiter.refund``; from Redis, the figures
    its answer gave). ``shadowed``: the window that would have refused the
    request had ``tokens.enforce`` been true (``None``: it fitted).

    observe/charge.py's ``Charge`` is what the exchange knows of it.
    """

    request: Decision | None
    tokens: TokenBudget | None
    estimate: int
    state: TokenState | None
    storage: RateLimiter | None
    key: str
    shadowed: str | None

    def add_headers(self, headers: MutableMapping[str, str]) -> None:
        """The ``x-oaimux-ratelimit-*`` headers: what is left in the buckets
        this request was charged to, and when they are full again (for the
        token windows, the one with the fewest tokens left)."""
        request, tokens, _, state, _, _, _ = self
        if request is not None:
            headers[REMAINING_REQUESTS] = str(request[1])  # (Decision.remaining)
            headers[RESET_REQUESTS] = openai_duration(request[3])  # (.reset_after)
        if state is not None:
            assert tokens is not None  # a state is charged under a token budget
            owed_m, owed_d = state.minute, state.day
            cap_m, cap_d = tokens.cap_minute, tokens.cap_day
            if cap_m and not (cap_d and cap_d - owed_d < cap_m - owed_m):
                left, reset = cap_m - owed_m, owed_m * tokens.ns_minute
            else:
                left, reset = cap_d - owed_d, owed_d * tokens.ns_day
            headers[REMAINING_TOKENS] = str(int(left)) if left > 0.0 else "0"
            ms = _ceil(reset * 1e-6)  # (openai_duration, below a second written out)
            headers[RESET_TOKENS] = _MILLISECONDS[ms] if ms <= 1000 else openai_duration(ms / 1000)

    def reconcile(self, billable: int) -> None:
        """Charge the buckets ``billable`` tokens (what the answer's usage
        bills; 0 when no upstream produced any) instead of the estimate: give
        back the difference or charge the overrun (see the module docstring).
        """
        _, tokens, estimate, state, storage, _, _ = self
        refund = billable - estimate
        if (
            refund <= 0 and type(storage) is MemoryRateLimiter and estimate <= tokens.cap_smallest  # type: ignore[union-attr]
        ):
            # The usual case: an estimate charged whole to each window, and
            # generous. Given back in place (MemoryRateLimiter.refund, written out).
            state.minute += refund  # type: ignore[union-attr]
            state.day += refund  # type: ignore[union-attr]
        else:
            self._settle(billable)

    def _settle(self, billable: int) -> None:
        """Charge each window ``billable`` instead of what the reservation charged it."""
        _, tokens, estimate, state, storage, key, _ = self
        assert tokens is not None and storage is not None  # reconciled under a token budget
        cap_m, cap_d = tokens.cap_minute, tokens.cap_day
        delta_m = billable - (estimate if estimate < cap_m else cap_m) if cap_m else 0
        delta_d = billable - (estimate if estimate < cap_d else cap_d) if cap_d else 0
        if type(storage) is MemoryRateLimiter and state is not None and delta_m <= 0 >= delta_d:
            state.minute += delta_m
            state.day += delta_d
        elif delta_m or delta_d:
            storage.settle(key, tokens, (delta_m, delta_d))
