"""Running the server: logging, the event loop, signals, workers.

- SIGTERM / SIGINT: stop accepting (the listening socket is closed, so new
  connections are refused), let requests and streams in flight finish for up
  to ``server.shutdown_grace_seconds``, close what is left, exit 0. A second
  SIGTERM / SIGINT during the drain exits at once (status 1).
- SIGHUP: re-read the config file; on success swap the runtime atomically
  (requests already running finish on the old one, new ones use the new
  one); on failure keep the old one and log why. Settings read only at start
  (listen address, grace, header/keep-alive timeouts, CORS, logging, metrics,
  rate-limit storage) are named in a warning: they need a restart.
- ``--workers N``: N processes bound to the same port with SO_REUSEPORT, each
  with its own event loop; the parent forwards SIGTERM and SIGHUP to all
  (workers.py). A worker whose parent died stops itself.

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
import time

from aiohttp import web

from .app import create_app, server_options
from .check import startup_warnings
from .config import ConfigError, Settings, load_settings
from .connections import ProxyRunner
from .keys import BUILTINS, DISCOVERY, OBSERVER, RUNTIME
from .observe import send_access_log_to
from .runtime import build_runtime

__all__ = ["configure_logging", "serve"]

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
    # Access lines go to stderr on their own, a batch per loop turn (observe.py).
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
        ("server.cors", old.server.cors, new.server.cors),
        ("log", old.log, new.log),
        ("metrics", old.metrics, new.metrics),
        ("rate_limit.storage", old.rate_limit_storage, new.rate_limit_storage),
    ]
    return [name for name, was, now in pairs if was != now]


async def _run(
    path: str,
    settings: Settings,
    host: str,
    port: int,
    reuse_port: bool,
    uvloop_used: bool,
    parent: int | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT. ``parent``: in a worker, the supervisor's pid."""
    app = create_app(settings)
    runner = ProxyRunner(
        app,
        settings.server,
        handler_cancellation=True,
        shutdown_timeout=settings.server.shutdown_grace_seconds,
        **server_options(),
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=1024)
    try:
        await site.start()
        metrics_runner = await _start_metrics_listener(app, settings, reuse_port)
    except OSError as exc:
        # Address in use, not ours to bind...: one clear line, resources closed.
        await runner.cleanup()
        raise CannotListen(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    pid = os.getpid()
    log.info(
        "oaimux serving %s on http://%s:%d: %d routes, %d upstreams, uvloop %s (pid %d)",
        path,
        host,
        port,
        len(settings.routes),
        len(settings.upstreams),
        "on" if uvloop_used else "off",
        pid,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reload() -> None:
        try:
            new = app[BUILTINS].bind(load_settings(path))
        except ConfigError as exc:
            log.error("reload failed, keeping the running config (pid %d): %s", pid, exc)
            return
        # Requests hold the runtime they started with (runtime.py): swapping
        # the holder's one reference is the whole, atomic switch.
        old = app[RUNTIME].current.settings
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

    def on_stop(name: str) -> None:
        if not stop.is_set():
            stop.set()
        elif parent is None:
            # A second signal (an operator's second Ctrl-C): stop waiting. A
            # worker ignores it: it can get one signal twice, from the
            # terminal and from its parent; the parent handles repeats.
            log.warning("second %s: exiting now, without waiting for requests in flight", name)
            logging.shutdown()
            os._exit(1)

    loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, reload)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, LIFECYCLE_SIGNALS)
    orphan_watch = loop.create_task(_watch_parent(parent, stop)) if parent is not None else None
    await stop.wait()
    if orphan_watch is not None:
        orphan_watch.cancel()
    server = runner.server
    log.info(
        "stopping (pid %d): no new connections; %d open, draining for up to %gs",
        pid,
        len(server.connections) if server is not None else 0,
        settings.server.shutdown_grace_seconds,
    )
    started = time.monotonic()
    await runner.cleanup()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    log.info("stopped (pid %d) after %.1fs", pid, time.monotonic() - started)


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
    from .metrics import serve_metrics

    host, port = settings.metrics.listen
    runner = await serve_metrics(metrics, settings.metrics.path, host, port, reuse_port)
    log.info("metrics on http://%s:%d%s", host, port, settings.metrics.path)
    return runner


def serve(path: str, settings: Settings, host: str, port: int, workers: int) -> int:
    configure_logging(settings)
    # Once, before any worker starts: the same lines as `oaimux check`.
    for warning in startup_warnings(settings, host, port):
        log.warning("%s", warning)
    if workers > 1:
        from .workers import run_workers

        return run_workers(path, settings, host, port, workers)
    uvloop_used = _install_uvloop()
    try:
        asyncio.run(_run(path, settings, host, port, False, uvloop_used))
    except CannotListen as exc:
        log.error("%s", exc)
        return 1
    return 0


class CannotListen(Exception):
    """The listening socket could not be opened (the message says where and why)."""


def serve_worker(path: str, settings: Settings, host: str, port: int) -> int:
    """Entry of one worker process (``--workers N``), forked with the lifecycle
    signals blocked; they are unblocked once the loop handles them. Returns the
    worker's exit status."""
    configure_logging(settings)
    uvloop_used = _install_uvloop()
    try:
        asyncio.run(_run(path, settings, host, port, True, uvloop_used, parent=os.getppid()))
    except CannotListen as exc:
        log.error("%s", exc)
        return 1
    return 0


def port_reusable() -> bool:
    return hasattr(socket, "SO_REUSEPORT")
