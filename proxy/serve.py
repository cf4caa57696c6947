"""Running the server: logging, the event loop, signals, workers.

- SIGTERM / SIGINT: stop accepting, let requests and streams in flight finish
  for up to ``server.shutdown_grace_seconds``, close what is left, exit 0.
- SIGHUP: re-read the config file; on success swap the runtime atomically
  (requests already running finish on the old one); on failure keep the old
  one and log why.
- ``--workers N``: N processes bound to the same port with SO_REUSEPORT, each
  with its own event loop; the parent forwards SIGTERM and SIGHUP to all.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys

from aiohttp import web

from .app import create_app, server_options
from .config import ConfigError, Settings, load_settings
from .keys import DISCOVERY, OBSERVER, RUNTIME
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
    # aiohttp's own access log is off (server_options); ours is oaimux.access.
    logging.getLogger("aiohttp.access").disabled = True


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name == "oaimux.access":
            return record.getMessage()  # already a whole line, with its own time
        return super().format(record)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import json

        if record.name == "oaimux.access":
            return record.getMessage()
        return json.dumps(
            {
                "time": self.formatTime(record),
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
            }
        )


def _install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def _run(
    path: str, settings: Settings, host: str, port: int, reuse_port: bool, uvloop_used: bool
) -> None:
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=settings.server.shutdown_grace_seconds,
        **server_options(),
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=1024)
    await site.start()
    metrics_runner = await _start_metrics_listener(app, settings, reuse_port)
    log.info(
        "oaimux serving %s on http://%s:%d: %d routes, %d upstreams, uvloop %s",
        path,
        host,
        port,
        len(settings.routes),
        len(settings.upstreams),
        "on" if uvloop_used else "off",
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reload() -> None:
        try:
            new = load_settings(path)
        except ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            return
        app[RUNTIME].swap(build_runtime(new))
        app[DISCOVERY].refresh(new)  # models: discover asks its upstreams again
        log.info("reloaded %s: %d routes, %d upstreams", path, len(new.routes), len(new.upstreams))

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    await stop.wait()
    log.info(
        "stopping: draining requests in flight for up to %gs",
        settings.server.shutdown_grace_seconds,
    )
    await runner.cleanup()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    log.info("stopped")


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
    if workers > 1:
        from .workers import run_workers

        return run_workers(path, settings, host, port, workers)
    uvloop_used = _install_uvloop()
    asyncio.run(_run(path, settings, host, port, False, uvloop_used))
    return 0


def serve_worker(path: str, settings: Settings, host: str, port: int) -> None:
    """Entry of one worker process (``--workers N``)."""
    configure_logging(settings)
    uvloop_used = _install_uvloop()
    asyncio.run(_run(path, settings, host, port, True, uvloop_used))


def port_reusable() -> bool:
    return hasattr(socket, "SO_REUSEPORT")
