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

from ..config.settings import TokenBudget

__all__ = ["Charge"]


class Charge(Protocol):
    """A request's charge: the token budget it reserved under, if any, what it
    reserved, and whether a token budget that does not enforce would have
    refused it."""

    @property
    def budget(self) -> TokenBudget | None:
        """The token budget a reservation was made under (``None``: none was)."""
        ...

    @property
    def estimate(self) -> int:
        """Tokens reserved (when :attr:`budget` is set)."""
        ...

    @property
    def shadowed(self) -> str | None:
        """The token window that would have refused the request (``enforce:
        false``), or ``None``."""
        ...

    def add_headers(self, headers: MutableMapping[str, str]) -> None:
        """Write the ``x-oaimux-ratelimit-*`` headers of the buckets charged."""
        ...

    def reconcile(self, billable: int) -> None:
        """Settle the reservation once the answer has ended: charge it
        ``billable`` tokens instead of the estimate (README, "Token budgets")."""
        ...
