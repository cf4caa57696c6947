"""``oaimux serve`` and ``oaimux check``: the thin command line.

``serve`` runs one process (serve.py), or with ``--workers N`` a supervisor
of N (workers.py).

Exit status 2 for a configuration error (message on stderr, no traceback).

This module's top imports nothing heavy, and ``main`` takes over the
lifecycle signals before importing the rest (early_signals.py): the console
script ``oaimux`` and ``python -m proxy`` both import this module first, and
a SIGHUP must not kill a process that is still importing aiohttp. Installing
the handlers in ``main`` rather than at the top of ``proxy/__init__.py`` keeps
every import free of side effects (a test or a library user importing
``proxy`` keeps its own signal handling); the price is that this module and
``proxy/__init__.py`` must stay light, which a test checks.
"""

from __future__ import annotations

import os
import sys

from . import early_signals

# typing.TYPE_CHECKING without importing typing (several ms, all of them
# before the signals are held); mypy reads any TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

    from .config import Settings

__all__ = ["main"]


def _config_path(given: str | None) -> str:
    return given or os.environ.get("OAIMUX_CONFIG") or "routes.yaml"


def _port(given: int | None, settings: Settings) -> int:
    from .config import ConfigError

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
    import argparse

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
    early_signals.hold()  # first: see the module docstring
    from .config import ConfigError, load_settings
    from .serve import configure_logging, port_reusable, serve

    args = _parser().parse_args(argv)
    path = _config_path(args.config)
    try:
        # A SIGHUP held until now is answered by this read (it is newer).
        early_signals.take_reload()
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
        from .workers import run_workers

        return run_workers(path, settings, host, port, args.workers)
    return serve(path, settings, host, port)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
