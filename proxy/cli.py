"""``oaimux serve`` and ``oaimux check``: the thin command line.

Exit status 2 for a configuration error (message on stderr, no traceback);
``check --probe`` exits 1 when an upstream a route names cannot be used.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from .config import ConfigError, Settings, load_settings

__all__ = ["main"]

log = logging.getLogger("oaimux")


def _config_path(given: str | None) -> str:
    return given or os.environ.get("OAIMUX_CONFIG") or "routes.yaml"


def _port(given: int | None, settings: Settings) -> tuple[int, str]:
    """The port to listen on, and where it came from."""
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
    args = _parser().parse_args(argv)
    path = _config_path(args.config)
    try:
        settings = load_settings(path)
        host = args.host or settings.server.host
        port, port_from = _port(args.port, settings)
        if args.command == "check":
            host_from = "--host" if args.host else "server.host"
            listen = f"host from {host_from}, port from {port_from}"
            return _check(settings, host, port, listen, args.probe, args.timeout)
        if args.workers < 1:
            raise ConfigError(f"--workers: must be at least 1, got {args.workers}")
    except ConfigError as exc:
        print(f"oaimux: config error: {exc}", file=sys.stderr)
        return 2
    from .serve import serve

    return serve(path, settings, host, port, args.workers)


def _check(
    settings: Settings,
    host: str,
    port: int,
    listen_from: str,
    probe: bool,
    timeout: float | None,
) -> int:
    from .check import PROBE_TIMEOUT, listen_url, probe_upstreams, startup_warnings

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
