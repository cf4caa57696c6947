"""Lifecycle signals that arrive before the event loop handles them.

A process starts with the default dispositions, and SIGHUP's default is to
terminate: a ``systemctl reload`` right after ``start``, or a log-rotation
hook, would otherwise kill the proxy during its ~0.3 s of imports and set-up.
:func:`hold` is the first thing ``oaimux``'s ``main`` does (cli.py), and it
runs before any heavy import (aiohttp, yaml, the proxy's own modules):

- SIGHUP is *held*: noted, not acted on. The first load of the routes file
  takes the note (:func:`take_reload` just before the read: whatever it reads
  is at least as new as the signal); a SIGHUP noted after that read is
  replayed as a reload once the event loop handles signals
  (server/process.py), or by the ``--workers`` supervisor (server/workers.py).
- SIGTERM and SIGINT exit with status 0 at once: nothing is listening yet, so
  there is nothing to drain (README, "Stop, reload, workers"). The exit is
  ``os._exit`` after flushing stdout and stderr, not a ``SystemExit`` raised
  where the program was: that point can be anywhere in an import (a
  ``SystemExit`` raised while ``ssl`` was being imported once ended as a
  ``TypeError`` and a non-zero status), and nothing held this early needs
  ``finally`` blocks or ``atexit`` hooks.

Once the event loop (or the supervisor) installs its own handlers these are
replaced; nothing here runs while requests are served.

The disposition is process-wide state, so it lives here, at module level,
and only ``main`` changes it: importing this module (or any other) changes
nothing.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

__all__ = ["hold", "take_reload"]

_reload_noted = False


def _note_reload(_signum: int, _frame: FrameType | None) -> None:
    global _reload_noted
    _reload_noted = True


def _exit_now(_signum: int, _frame: FrameType | None) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe: nothing to keep
            pass
    os._exit(0)


def hold() -> None:
    """Install the start-up dispositions (see the module docstring)."""
    signal.signal(signal.SIGHUP, _note_reload)
    signal.signal(signal.SIGTERM, _exit_now)
    signal.signal(signal.SIGINT, _exit_now)


def take_reload() -> bool:
    """Was a SIGHUP held since the last call? Clears the note."""
    global _reload_noted
    noted, _reload_noted = _reload_noted, False
    return noted
