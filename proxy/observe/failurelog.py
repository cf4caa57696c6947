"""Logging a failure that keeps coming back, without repeating it every time.

A background task that fails (model discovery asking a down upstream every
60 s, the rate limiter's Redis during an outage) would otherwise write the
same warning on every attempt, for as long as the outage lasts. A
:class:`FailureLog` writes:

- the first failure, at once (WARNING);
- a failure whose reason differs from the last one (a change of state), at once;
- the same reason again only after ``every`` seconds (10 minutes by default),
  saying how many failures there were and for how long;
- the recovery, once (INFO), with the outage's length and failure count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["TEN_MINUTES", "FailureLog", "format_duration"]

TEN_MINUTES = 600.0


def format_duration(seconds: float) -> str:
    """``45s``, ``3m20s``, ``2h5m``: how long, for a person."""
    total = max(0, round(seconds))
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class FailureLog:
    """The log lines of one thing that can fail repeatedly (see the module docstring).

    ``subject`` starts every line (``"model discovery: upstream local"``);
    ``reason`` is the failure's state: two failures with equal reasons are the
    same state. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        logger: logging.Logger,
        subject: str,
        *,
        every: float = TEN_MINUTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self.subject = subject
        self._every = every
        self._clock = clock
        self._reason: str | None = None  # None: not failing
        self._since = 0.0  # when the outage began
        self._logged_at = 0.0  # when the last line was written
        self._failures = 0  # in this outage
        self._unlogged = 0  # failures since the last line
        # Whether an outage is on: a plain attribute, read once per request by
        # admission.py (a property is a call).
        self.failing = False

    def failed(self, reason: str) -> bool:
        """Record one failure; return whether a line was written."""
        now = self._clock()
        self._failures += 1
        if self._reason is None:
            self._since = now
        elif reason == self._reason and now - self._logged_at < self._every:
            self._unlogged += 1
            return False
        if reason == self._reason:
            self._log.warning(
                "%s: %s (still failing: %d more times in %s, failing for %s)",
                self.subject,
                reason,
                self._unlogged + 1,
                format_duration(now - self._logged_at),
                format_duration(now - self._since),
            )
        else:
            self._log.warning("%s: %s", self.subject, reason)
        self._reason = reason
        self.failing = True
        self._logged_at = now
        self._unlogged = 0
        return True

    def recovered(self) -> bool:
        """Record a success; return whether it ended an outage (and was logged)."""
        if self._reason is None:
            return False
        self._log.info(
            "%s: recovered after %s (%d failures)",
            self.subject,
            format_duration(self._clock() - self._since),
            self._failures,
        )
        self._reason = None
        self.failing = False
        self._failures = 0
        self._unlogged = 0
        return True
