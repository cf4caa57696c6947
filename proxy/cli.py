"""``oaimux serve`` and ``oaimux check``: the thin command line.

``serve`` runs one process (server/process.py), or with ``--workers N`` a
supervisor of N (server/workers.py): the choice is made here, in ``main``.

Exit status 2 for a configuration error (message on stderr, no traceback);
``check --probe`` exits 1 when an upstream a route names cannot be used.

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


def _port(given: int | None, settings: Settings) -> tuple[int, str]:
    """The port to listen on, and where it came from."""
    from .config import ConfigError

    if given is not None:
        return given, "--port"
    env = os.environ.get("PORT")
    if env:
        try:
            return int(env), "$PORT"
        except ValueError:
            raise ConfigError(f"$PORT: not a port number: {env!r}") from None
    if settings.server.port is not None:
        return settings.server.port, "server.port"
    return 8080, "the default"


def _add_listen_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="routes file (default: $OAIMUX_CONFIG, else ./routes.yaml)"
    )
    parser.add_argument("--host", help="listen address (default: server.host)")
    parser.add_argument(
        "--port", type=int, help="listen port (default: $PORT, else server.port, else 8080)"
    )


def _parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog="oaimux", description="One OpenAI-compatible endpoint in front of every model."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy")
    _add_listen_flags(serve)
    serve.add_argument(
        "--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)"
    )
    check = sub.add_parser(
        "check", help="validate a routes file, print what serve would do, warn about mistakes"
    )
    _add_listen_flags(check)
    check.add_argument(
        "--probe",
        action="store_true",
        help="also ask every upstream for GET <url>/models and say how it answered",
    )
    check.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds each probe may take (default: 5)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    early_signals.hold()  # first: see the module docstring
    from .config import ConfigError, load_settings
    from .server.process import configure_logging, port_reusable, serve

    args = _parser().parse_args(argv)
    path = _config_path(args.config)
    try:
        # A SIGHUP held until now is answered by this read (it is newer).
        early_signals.take_reload()
        settings = load_settings(path)
        host = args.host or settings.server.host
        port, port_from = _port(args.port, settings)
        if args.command == "check":
            host_from = "--host" if args.host else "server.host"
            listen = f"host from {host_from}, port from {port_from}"
            return _check(settings, host, port, listen, args.probe, args.timeout)
        if args.workers < 1:
            raise ConfigError(f"--workers: must be at least 1, got {args.workers}")
        if args.workers > 1 and not port_reusable():
            raise ConfigError("--workers: this system cannot share a port (no SO_REUSEPORT)")
    except ConfigError as exc:
        print(f"oaimux: config error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    import logging

    from .check import startup_warnings

    # Once, before any worker starts: the same lines as `oaimux check`.
    for warning in startup_warnings(settings, host, port):
        logging.getLogger("oaimux").warning("%s", warning)
    if args.workers > 1:
        from .server.workers import run_workers

        return run_workers(path, settings, host, port, args.workers)
    return serve(path, settings, host, port)


def _check(
    settings: Settings,
    host: str,
    port: int,
    listen_from: str,
    probe: bool,
    timeout: float | None,
) -> int:
    import asyncio

    from .check import PROBE_TIMEOUT, listen_url, probe_upstreams, startup_warnings
    from .config import ConfigError

    if timeout is not None and not timeout > 0:
        raise ConfigError(f"--timeout: must be a positive number of seconds, got {timeout:g}")
    print(f"ok: {settings.summary()}")
    print(f"  listen {listen_url(host, port)} ({listen_from})")
    for route in settings.routes:
        print(f"  route {route.index}: {route.describe()} -> {', '.join(route.upstreams)}")
    for warning in startup_warnings(settings, host, port):
        print(f"warning: {warning}")
    if not probe:
        return 0
    seconds = timeout or PROBE_TIMEOUT
    print(f"probing {len(settings.upstreams)} upstreams: GET <url>/models, {seconds:g}s each")
    results = asyncio.run(probe_upstreams(settings, seconds))
    for result in results:
        print(result.line())
    failed = [r.name for r in results if r.failed]
    if failed:
        print(f"probe failed: routes use {', '.join(failed)}, which cannot serve requests")
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
