"""``--workers N``: N processes sharing one port through SO_REUSEPORT.

The parent only supervises; the kernel spreads new connections across the
workers' listening sockets.

- It forks the workers with SIGTERM, SIGINT and SIGHUP blocked; each worker
  unblocks them once its event loop handles them, so a signal that arrives
  while it starts is held, not lost, and never kills it half set up.
- The supervisor itself keeps those signals and SIGCHLD blocked and takes them
  one at a time with ``sigtimedwait``: no handler runs in the middle of its
  bookkeeping, and a restart's backoff is just the wait's timeout.
- SIGHUP: the file is read first; a broken file is reported once and not
  passed on (the workers keep the running config). A good one is passed on,
  every worker re-reads it, and later replacements start with it.
- SIGTERM / SIGINT: passed on; each worker drains within the grace (process.py).
  A worker still alive one second after the grace gets SIGKILL. The
  supervisor exits 0 once all have stopped cleanly, 1 otherwise. A second
  SIGTERM/SIGINT while they drain kills them at once (exit 1).
- A worker that dies by itself (a crash, an OOM kill) is logged with its exit
  status or signal and replaced, while the others keep serving: the first
  replacement at once, each further one within a minute after a doubling
  backoff (0.5 s, 1 s, ... up to 10 s). More than N deaths within a minute
  stop everything (exit 1), so the service manager takes over.
- A SIGHUP held while the process started (early_signals.py) is answered
  before forking: the workers start from the file as it is then.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections import deque

from .. import early_signals
from ..config import ConfigError, Settings, load_settings
from ..observe.metrics import forget_worker, share_metrics_across_workers
from .process import LIFECYCLE_SIGNALS, Worker, serve_worker

__all__ = ["run_workers"]

log = logging.getLogger("oaimux")

_WATCHED = (*LIFECYCLE_SIGNALS, signal.SIGCHLD)
RESTART_WINDOW = 60.0
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 10.0
# Past the grace, a worker that has not exited gets SIGKILL: workers exit by
# grace + process.EXIT_MARGIN themselves, so only a stuck one is killed.
KILL_MARGIN = 0.95


def run_workers(path: str, settings: Settings, host: str, port: int, workers: int) -> int:
    """Supervise ``workers`` processes until stopped; return the exit status."""
    return _Supervisor(path, settings, host, port, workers).run()


class _Supervisor:
    def __init__(self, path: str, settings: Settings, host: str, port: int, size: int) -> None:
        self.path = path
        self.started_with = settings  # start-only settings: every worker gets these
        self.current = settings  # the last good reload: a replacement serves it
        self.host = host
        self.port = port
        self.size = size
        self.children: set[int] = set()
        self.deaths: deque[float] = deque()  # times of unexpected deaths, within the window
        self.restarts_due: list[float] = []  # monotonic times
        self.stopping = False
        self.stop_signals = 0  # SIGTERM/SIGINT received: a second one kills
        self.kill_at: float | None = None
        self.failed = False

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
        if early_signals.take_reload():
            # A SIGHUP held since the file was read at start (early_signals.py):
            # the workers start from the file as it is now.
            self._reload()
        if self.started_with.metrics.enabled:
            # Before forking: every worker writes its samples where any worker's
            # /metrics reads them all (prometheus_client's multiprocess mode).
            share_metrics_across_workers()
        for _ in range(self.size):
            self._fork()
        log.info(
            "started %d workers: %s (supervisor pid %d)",
            self.size,
            ", ".join(map(str, sorted(self.children))),
            os.getpid(),
        )
        while self.children or (self.restarts_due and not self.stopping):
            info = self._next_signal()
            if info is None:
                self._on_time()
            elif info.si_signo == signal.SIGCHLD:
                self._reap()
            elif info.si_signo == signal.SIGHUP:
                self._reload()
            else:
                self.stop_signals += 1
                self._stop(signal.Signals(info.si_signo))
        return 1 if self.failed else 0

    def _next_signal(self) -> signal.struct_siginfo | None:
        wake = [*self.restarts_due, *([self.kill_at] if self.kill_at is not None else [])]
        if not wake:
            return signal.sigwaitinfo(_WATCHED)
        return signal.sigtimedwait(_WATCHED, max(0.0, min(wake) - time.monotonic()))

    def _fork(self) -> int:
        pid = os.fork()
        if pid == 0:  # the worker; the lifecycle signals stay blocked until its loop handles them
            signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGCHLD,))
            code = 1
            try:
                code = serve_worker(
                    self.path,
                    self.started_with,
                    self.host,
                    self.port,
                    Worker(parent=os.getppid(), current=self.current),
                )
            except BaseException:  # noqa: BLE001 - a worker must never return into the parent's code
                log.exception("worker failed")
            finally:
                sys.stderr.flush()
                os._exit(code)
        self.children.add(pid)
        return pid

    def _on_time(self) -> None:
        now = time.monotonic()
        if self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            for pid in self.children:
                log.error("worker %d did not stop within the grace; killing it", pid)
            self._signal_all(signal.SIGKILL)
            self.failed = True
        due = [t for t in self.restarts_due if t <= now]
        self.restarts_due = [t for t in self.restarts_due if t > now]
        if self.stopping:
            return
        for _ in due:
            log.info("started worker %d in place of one that died", self._fork())

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                if code != 0:
                    self.failed = True
                    log.error("worker %d %s while stopping", pid, _how(code))
                continue
            log.error("worker %d %s", pid, _how(code))
            forget_worker(pid)
            self._replace()

    def _replace(self) -> None:
        now = time.monotonic()
        while self.deaths and now - self.deaths[0] >= RESTART_WINDOW:
            self.deaths.popleft()
        self.deaths.append(now)
        if len(self.deaths) > self.size:
            log.error(
                "%d workers died within %gs; stopping all of them",
                len(self.deaths),
                RESTART_WINDOW,
            )
            self.failed = True
            self._stop(signal.SIGTERM)
            return
        n = len(self.deaths)
        delay = 0.0 if n == 1 else min(FIRST_BACKOFF * 2 ** (n - 2), MAX_BACKOFF)
        self.restarts_due.append(now + delay)
        log.warning(
            "starting a replacement in %gs (restart %d of at most %d within %gs)",
            delay,
            n,
            self.size,
            RESTART_WINDOW,
        )
        if delay == 0.0:
            self._on_time()

    def _reload(self) -> None:
        try:
            new = load_settings(self.path)
        except ConfigError as exc:
            log.error("reload refused, the workers keep the running config: %s", exc)
            return
        self.current = new
        self._signal_all(signal.SIGHUP)

    def _stop(self, signum: signal.Signals) -> None:
        if self.stop_signals > 1:
            log.warning("second %s: killing the workers now", signum.name)
            self._signal_all(signal.SIGKILL)
            self.kill_at = None
            self.failed = True
            return
        if self.stopping:
            return
        self.stopping = True
        self.restarts_due = []
        grace = self.started_with.server.shutdown_grace_seconds
        self.kill_at = time.monotonic() + grace + KILL_MARGIN
        self._signal_all(signum)

    def _signal_all(self, signum: int) -> None:
        for pid in self.children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def _how(code: int) -> str:
    """An exit code from ``os.waitstatus_to_exitcode`` in words."""
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"
