"""``--workers N``: N processes sharing one port through SO_REUSEPORT.

The parent only supervises: it forks the workers, forwards SIGTERM, SIGINT and
SIGHUP to every one of them, and exits 0 once all have exited after a stop
(non-zero if one died on its own). The kernel spreads new connections across
the workers' listening sockets.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

from .config import Settings

__all__ = ["run_workers"]

log = logging.getLogger("oaimux")

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_workers(path: str, settings: Settings, host: str, port: int, workers: int) -> int:
    from .serve import serve_worker

    children: list[int] = []
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    if settings.metrics.enabled:
        # Before forking: every worker writes its samples where any worker's
        # /metrics reads them all (prometheus_client's multiprocess mode).
        from .metrics import share_metrics_across_workers

        share_metrics_across_workers()
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # the worker
            for sig in _FORWARDED:
                signal.signal(sig, signal.SIG_DFL)
            code = 0
            try:
                serve_worker(path, settings, host, port)
            except BaseException:  # noqa: BLE001 - a worker must never return into the parent's code
                log.exception("worker failed")
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        children.append(pid)
    log.info("started %d workers: %s", workers, ", ".join(map(str, children)))
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
            for other in remaining:
                try:
                    os.kill(other, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        time.sleep(0)
    return 1 if failed else 0
