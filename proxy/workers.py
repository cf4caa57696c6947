"""``--workers N``: N processes sharing one port through SO_REUSEPORT.

The parent only supervises: it forks the workers, forwards SIGTERM, SIGINT and
SIGHUP to every one of them, and exits 0 once all have exited after a stop
(non-zero if one died on its own). The kernel spreads new connections across
the workers' listening sockets.

- Workers are forked with those signals blocked and unblock them once their
  event loop handles them, so a signal that arrives while they start is held,
  not lost, and never kills a worker half set up.
- A SIGHUP held while the process started (early_signals.py) is answered
  before forking: the workers start from the file as it is then.
- SIGHUP: the parent reads the file first; a broken file is reported once
  and not passed on (the workers keep the running config). A good one is
  passed on, and every worker re-reads it.
- A second SIGTERM/SIGINT while the workers drain kills them at once (exit 1).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Iterable

from . import early_signals
from .config import ConfigError, Settings, load_settings

__all__ = ["run_workers"]

log = logging.getLogger("oaimux")


def _signal_all(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def run_workers(path: str, settings: Settings, host: str, port: int, workers: int) -> int:
    from .serve import LIFECYCLE_SIGNALS, serve_worker

    children: list[int] = []
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum == signal.SIGHUP:
            try:
                load_settings(path)
            except ConfigError as exc:
                log.error("reload refused, the workers keep the running config: %s", exc)
                return
            _signal_all(children, signum)
        elif not stopping:
            stopping = True
            _signal_all(children, signum)
        else:
            log.warning("second %s: killing the workers now", signal.Signals(signum).name)
            _signal_all(children, signal.SIGKILL)

    signal.pthread_sigmask(signal.SIG_BLOCK, LIFECYCLE_SIGNALS)
    for sig in LIFECYCLE_SIGNALS:
        signal.signal(sig, forward)
    if early_signals.take_reload():
        # A SIGHUP held since the file was read at start (early_signals.py):
        # the workers start from the file as it is now.
        try:
            settings = load_settings(path)
        except ConfigError as exc:
            log.error("reload refused, the workers keep the running config: %s", exc)
    if settings.metrics.enabled:
        # Before forking: every worker writes its samples where any worker's
        # /metrics reads them all (prometheus_client's multiprocess mode).
        from .metrics import share_metrics_across_workers

        share_metrics_across_workers()
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # the worker; the signals stay blocked until its loop handles them
            for sig in LIFECYCLE_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            code = 0
            try:
                code = serve_worker(path, settings, host, port)
            except BaseException:  # noqa: BLE001 - a worker must never return into the parent's code
                log.exception("worker failed")
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        children.append(pid)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, LIFECYCLE_SIGNALS)  # held ones run now
    log.info(
        "started %d workers: %s (supervisor pid %d)",
        workers,
        ", ".join(map(str, children)),
        os.getpid(),
    )
    failed = False
    remaining = set(children)
    while remaining:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        remaining.discard(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            failed = True
        if not stopping:
            # A worker died by itself: stop the others too; the service manager restarts us.
            log.error("worker %d exited unexpectedly; stopping", pid)
            stopping = True
            _signal_all(remaining, signal.SIGTERM)
        time.sleep(0)
    return 1 if failed else 0
