"""``oaimux serve`` and ``oaimux check``: the thin command line.

``serve`` runs one process (serve.py), or with ``--workers N`` a supervisor
of N (workers.py).

Exit status 2 for a configuration error (message on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .config import ConfigError, Settings, load_settings
from .serve import configure_logging, port_reusable, serve
from .workers import run_workers

__all__ = ["main"]

log = logging.getLogger("oaimux")


def _config_path(given: str | None) -> str:
    return given or os.environ.get("OAIMUX_CONFIG") or "routes.yaml"


def _port(given: int | None, settings: Settings) -> int:
    if given is not None:
        return given
    env = os.environ.get("PORT")
    if env:
        try:
            return int(env)
        except ValueError:
            raise ConfigError(f"$PORT: not a port number: {env!r}") from None
    return settings.server.port if settings.server.port is not None else 8080


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oaimux", description="One OpenAI-compatible endpoint in front of every model."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="routes file (default: $OAIMUX_CONFIG, else ./routes.yaml)")
    serve.add_argument("--host", help="listen address (default: server.host)")
    serve.add_argument(
        "--port", type=int, help="listen port (default: $PORT, else server.port, else 8080)"
    )
    serve.add_argument(
        "--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)"
    )
    check = sub.add_parser("check", help="validate a routes file and print a summary")
    check.add_argument("--config", help="routes file (default: $OAIMUX_CONFIG, else ./routes.yaml)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = _config_path(args.config)
    try:
        settings = load_settings(path)
        if args.command == "check":
            print(f"ok: {settings.summary()}")
            for route in settings.routes:
                print(f"  route {route.index}: {route.describe()} -> {', '.join(route.upstreams)}")
            return 0
        host = args.host or settings.server.host
        port = _port(args.port, settings)
        if args.workers < 1:
            raise ConfigError(f"--workers: must be at least 1, got {args.workers}")
        if args.workers > 1 and not port_reusable():
            raise ConfigError("--workers: this system cannot share a port (no SO_REUSEPORT)")
    except ConfigError as exc:
        print(f"oaimux: config error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    if args.workers > 1:
        return run_workers(path, settings, host, port, args.workers)
    return serve(path, settings, host, port)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
