"""One timer for many bounds: the base of the upstream pool's response
deadlines and idle watch (upstream.py) and of the client send watch
(connections.py)."""

from __future__ import annotations

import asyncio
import math

__all__ = ["Ticker"]


class Ticker:
    """One timer for many bounds instead of a timer each (a timer per request
    cost ~9 µs of the bench machine's CPU, and ~1 KB of each open stream;
    issue 8).

    It ticks every eighth of the shortest bound armed, while :meth:`_check`
    says something is still watched. A bound is met at most one tick late,
    and with the tick that sees progress also up to one tick late, 1.25
    times a bound at worst; never early. An eighth (not a quarter) because
    bounds differ per upstream and a longer one is rarely a whole number of
    ticks.
    """

    def __init__(self) -> None:
        self._timer: asyncio.TimerHandle | None = None
        self._tick = math.inf

    def _arm(self, bound: float) -> None:
        tick = bound / 8
        if tick < self._tick:
            if self._timer is not None:
                self._timer.cancel()
            self._tick = tick
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + tick, self._on_tick)

    def _on_tick(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        if not self._check(now):
            self._tick = math.inf
        elif self._timer is None:  # _arm may have run from a callback of _check
            self._timer = loop.call_at(now + self._tick, self._on_tick)

    def _check(self, now: float) -> bool:
        """Act on the bounds due at ``now``; whether any is still watched."""
        raise NotImplementedError

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
