"""What admission charged a request, as the record of the exchange sees it.

admission/ charges each request before it is sent and hands back what it
charged (admission/budget.py's ``Charged``); the exchange keeps it until the
answer has ended. observe/ sits below admission/ (README, "Architecture"), so
it names only what it uses of that object, as a structural protocol: the
figures for the access log and the metrics, the ``x-oaimux-ratelimit-*``
headers for an answer, and the reconciliation once the answer has ended
(README, "Token budgets").
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Protocol

from .usage import Usage

__all__ = ["Charge"]


class Charge(Protocol):
    """A request's charge: what it reserved, what it was finally charged, and
    whether a token budget that does not enforce would have refused it."""

    @property
    def estimate(self) -> int | None:
        """Tokens reserved (``None``: no token budget applied)."""
        ...

    @property
    def charged_tokens(self) -> int | None:
        """Tokens finally charged (``None`` until :meth:`reconcile` ran)."""
        ...

    @property
    def shadowed(self) -> str | None:
        """The token window that would have refused the request (``enforce:
        false``), or ``None``."""
        ...

    def add_headers(self, headers: MutableMapping[str, str]) -> None:
        """Write the ``x-oaimux-ratelimit-*`` headers of the buckets charged."""
        ...

    def reconcile(self, usage: Usage | None, produced: bool) -> bool:
        """Settle the reservation once the answer has ended (``usage``: what it
        reported; ``produced``: whether an upstream may have produced tokens).
        True when the reservation was kept without a count."""
        ...
