"""Running one server process: logging, the event loop, signals, the drain.

- SIGTERM / SIGINT: stop accepting (the listening socket is closed, so new
  connections are refused), let requests and streams in flight finish until
  ``server.shutdown_grace_seconds`` have passed, abort what is left (a broken
  response, never a clean end; drain.py), exit 0 within the grace plus
  one second, and log how many requests were cut. A second SIGTERM / SIGINT
  during the drain exits at once (status 1).
- SIGHUP: re-read the config file; on success swap the runtime atomically
  (requests already running finish on the old one, new ones use the new
  one); on failure keep the old one and log why. Settings read only at start
  (listen address, grace, header/keep-alive timeouts, CORS, logging, metrics,
  rate-limit storage) are named in a warning: they need a restart.
- Before the loop handles them (while importing and loading), the start-up
  dispositions of early_signals.py apply: SIGHUP held, SIGTERM/SIGINT exit 0.
  The loop's handlers are installed before the app is set up or the port
  bound; a SIGHUP held until then is answered by a reload at that point.
- A worker of ``--workers N`` (workers.py) runs the same server; one whose
  supervisor died stops itself.

Log lines about the lifecycle carry the process id, so the workers of one
``--workers N`` run can be told apart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import web

from .. import early_signals
from ..config import ConfigError, Settings, load_settings
from ..observe.access_log import send_access_log_to
from ..runtime.runtime import build_runtime
from .app import create_app, server_options
from .collector import tune_collector
from .drain import ProxyRunner
from .keys import BUILTINS, DISCOVERY, OBSERVER, RUNTIME

__all__ = [
    "LIFECYCLE_SIGNALS",
    "CannotListen",
    "Worker",
    "configure_logging",
    "port_reusable",
    "serve",
    "serve_worker",
]

log = logging.getLogger("oaimux")


def configure_logging(settings: Settings) -> None:
    """Log to stderr; access lines are written as they are (already formatted)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    if settings.log.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(settings.log.level)
    # Access lines go to stderr on their own, a batch per loop turn (observe/access_log.py).
    send_access_log_to(sys.stderr)
    # aiohttp's own access log is off (server_options); ours is oaimux.access.
    logging.getLogger("aiohttp.access").disabled = True


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name == "oaimux.access":
            return record.getMessage()  # already a whole line, with its own time
        return super().format(record)


class _JsonFormatter(logging.Formatter):
    """One JSON object per line; an exception's traceback goes in ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "oaimux.access":
            return record.getMessage()
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


# Signals handled by the loop; a worker is forked with them blocked, and
# unblocks them once its handlers are in place (see workers.py).
LIFECYCLE_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _needs_restart(old: Settings, new: Settings) -> list[str]:
    """The settings that changed but are only read at start."""
    pairs = [
        ("server.host", old.server.host, new.server.host),
        ("server.port", old.server.port, new.server.port),
        (
            "server.shutdown_grace_seconds",
            old.server.shutdown_grace_seconds,
            new.server.shutdown_grace_seconds,
        ),
        ("server.header_timeout", old.server.header_timeout, new.server.header_timeout),
        ("server.keepalive_timeout", old.server.keepalive_timeout, new.server.keepalive_timeout),
        ("server.send_timeout", old.server.send_timeout, new.server.send_timeout),
        ("server.cors", old.server.cors, new.server.cors),
        ("log", old.log, new.log),
        ("metrics", old.metrics, new.metrics),
        ("rate_limit.storage", old.rate_limit_storage, new.rate_limit_storage),
    ]
    return [name for name, was, now in pairs if was != now]


# Past the grace, the process is gone by this much at the latest: the drain's
# own steps after the deadline take about half of it (drain.py), and if
# anything hangs anyway (a DNS lookup in a thread, a cleanup step) the process
# exits without it.
EXIT_MARGIN = 0.8


async def _run(
    path: str,
    settings: Settings,
    host: str,
    port: int,
    uvloop_used: bool,
    worker: Worker | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain (module docstring)."""
    app = create_app(settings)
    pid = os.getpid()
    if worker is not None and worker.current is not settings:
        # A replacement worker: serve the configuration its siblings reloaded.
        _apply(app, path, settings, worker.current, pid)
    lifecycle = _Lifecycle(app, path, worker)
    # The loop's handlers replace the start-up ones (early_signals.py) before
    # anything is set up or bound, so no signal finds the process half ready.
    lifecycle.install(asyncio.get_running_loop())
    runner = ProxyRunner(app, settings.server, handler_cancellation=True, **server_options())
    await runner.setup()
    tune_collector()  # everything made so far lives as long as the process
    if lifecycle.stop.is_set():  # stopped while setting up: never listen
        await runner.cleanup()
        log.info("stopped (pid %d) before listening", pid)
        return
    metrics_runner = await _listen(runner, settings, host, port, worker is not None)
    served = app[RUNTIME].current.settings
    log.info(
        "oaimux serving %s on http://%s:%d: %d routes, %d upstreams, uvloop %s (pid %d)",
        path,
        host,
        port,
        len(served.routes),
        len(served.upstreams),
        "on" if uvloop_used else "off",
        pid,
    )
    orphan_watch = (
        asyncio.create_task(_watch_parent(worker.parent, lifecycle.stop))
        if worker is not None
        else None
    )
    await lifecycle.stop.wait()
    if orphan_watch is not None:
        orphan_watch.cancel()
    await _drain(runner, metrics_runner, settings.server.shutdown_grace_seconds, pid)


class _Lifecycle:
    """The loop's answers to the lifecycle signals of one serving process:
    SIGTERM/SIGINT set :attr:`stop`, SIGHUP reloads (module docstring)."""

    def __init__(self, app: web.Application, path: str, worker: Worker | None) -> None:
        self.app = app
        self.path = path
        self.worker = worker
        self.pid = os.getpid()
        self.stop = asyncio.Event()

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Handle the lifecycle signals on ``loop`` from now on; answer a SIGHUP
        held since the start."""
        loop.add_signal_handler(signal.SIGTERM, self.on_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.on_stop, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, LIFECYCLE_SIGNALS)
        if early_signals.take_reload():
            self.reload()  # a SIGHUP came after the file was read at start: read it again

    def reload(self) -> None:
        app = self.app
        try:
            new = app[BUILTINS].bind(load_settings(self.path))
        except ConfigError as exc:
            log.error("reload failed, keeping the running config (pid %d): %s", self.pid, exc)
            return
        _apply(app, self.path, app[RUNTIME].current.settings, new, self.pid)

    def on_stop(self, name: str) -> None:
        if not self.stop.is_set():
            self.stop.set()
        elif self.worker is None:
            # A second signal (an operator's second Ctrl-C): stop waiting. A
            # worker ignores it: it can get one signal twice, from the
            # terminal and from its parent; the parent handles repeats.
            log.warning("second %s: exiting now, without waiting for requests in flight", name)
            logging.shutdown()
            os._exit(1)


async def _listen(
    runner: ProxyRunner, settings: Settings, host: str, port: int, shared: bool
) -> web.AppRunner | None:
    """Listen on ``host``:``port`` (``shared``: with the other workers, through
    SO_REUSEPORT), and on the metrics address if it has one; return the
    metrics listener's runner."""
    site = web.TCPSite(runner, host, port, reuse_port=shared or None, backlog=1024)
    try:
        await site.start()
        _probe_idle_peers(site)
        return await _start_metrics_listener(runner.app, settings, shared)
    except OSError as exc:
        # Address in use, not ours to bind...: one clear line, resources closed.
        await runner.cleanup()
        raise CannotListen(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _probe_idle_peers(site: web.TCPSite) -> None:
    """SO_KEEPALIVE on ``site``'s listening sockets, for every connection they
    accept: Linux copies a listener's socket options to the sockets accept()
    makes, so aiohttp does not set it per connection (app.py, ``server_options``)."""
    # asyncio's and uvloop's servers both list their sockets; the abstract
    # type aiohttp declares does not say so.
    sockets: Iterable[socket.socket] = getattr(site._server, "sockets", None) or ()
    for sock in sockets:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


async def _drain(
    runner: ProxyRunner, metrics_runner: web.AppRunner | None, grace: float, pid: int
) -> None:
    """Stop: no new connections, requests in flight get up to ``grace``
    seconds, then what is left is cut (drain.py); log how it went."""
    started = time.monotonic()
    _exit_anyway_after(grace + EXIT_MARGIN, pid)
    server = runner.server
    log.info(
        "stopping (pid %d): no new connections; %d open, draining for up to %gs",
        pid,
        len(server.connections) if server is not None else 0,
        grace,
    )
    await runner.cleanup()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    log.info(
        "stopped (pid %d) after %.1fs: %d connections finished, %d requests cut at the deadline",
        pid,
        time.monotonic() - started,
        server.finished if server is not None else 0,
        server.cut if server is not None else 0,
    )


def _apply(app: web.Application, path: str, old: Settings, new: Settings, pid: int) -> None:
    """Serve ``new`` from now on (a reload)."""
    # Requests hold the runtime they started with (runtime.py): swapping
    # the holder's one reference is the whole, atomic switch.
    app[RUNTIME].swap(build_runtime(new))
    app[DISCOVERY].refresh(new)  # models: discover asks its upstreams again
    log.info(
        "reloaded %s: %d routes, %d upstreams (pid %d)",
        path,
        len(new.routes),
        len(new.upstreams),
        pid,
    )
    stale = _needs_restart(old, new)
    if stale:
        log.warning("changed settings that need a restart: %s", ", ".join(stale))


def _exit_anyway_after(seconds: float, pid: int) -> None:
    """Keep the stop's bound even if a step hangs: a thread, so it fires even
    when the event loop is stuck or already closed."""

    def exit_now() -> None:
        os.write(2, f"stop overran its deadline; exiting now (pid {pid})\n".encode())
        os._exit(0)

    timer = threading.Timer(seconds, exit_now)
    timer.daemon = True
    timer.start()


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """A worker whose supervisor died (killed outright) stops like on SIGTERM,
    rather than serve on unsupervised. One cheap check a second."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.warning("the supervising process %d is gone; stopping", parent)
    stop.set()


async def _start_metrics_listener(
    app: web.Application, settings: Settings, reuse_port: bool
) -> web.AppRunner | None:
    """``metrics.listen``: /metrics on its own address (observability owns this)."""
    metrics = app[OBSERVER].metrics
    if metrics is None or settings.metrics.listen is None:
        return None
    from ..observe.metrics import serve_metrics

    host, port = settings.metrics.listen
    runner = await serve_metrics(metrics, settings.metrics.path, host, port, reuse_port)
    log.info("metrics on http://%s:%d%s", host, port, settings.metrics.path)
    return runner


class CannotListen(Exception):
    """The listening socket could not be opened (the message says where and why)."""


@dataclass(frozen=True, slots=True)
class Worker:
    """What a worker process of ``--workers N`` is told by its supervisor."""

    parent: int  # the supervisor's pid: the worker stops if it goes
    current: Settings  # the configuration in force (a replacement may start after reloads)


def serve(path: str, settings: Settings, host: str, port: int) -> int:
    """Serve in this process until stopped; return the exit status."""
    return _serve(path, settings, host, port, None)


def serve_worker(path: str, settings: Settings, host: str, port: int, worker: Worker) -> int:
    """Entry of one worker process (``--workers N``), forked with the lifecycle
    signals blocked; they are unblocked once the loop handles them.
    ``settings`` is what the service started with (the start-only settings
    come from it). Returns the worker's exit status."""
    configure_logging(settings)
    return _serve(path, settings, host, port, worker)


def _serve(path: str, settings: Settings, host: str, port: int, worker: Worker | None) -> int:
    uvloop_used = _install_uvloop()
    try:
        asyncio.run(_run(path, settings, host, port, uvloop_used, worker))
    except CannotListen as exc:
        log.error("%s", exc)
        return 1
    return 0


def port_reusable() -> bool:
    """Can several processes listen on one port (``--workers``)?"""
    return hasattr(socket, "SO_REUSEPORT")
