"""``create_app(settings)``: a pure factory. No I/O until the app starts.

Long-lived resources (the pooled upstream session, the rate limiter's storage)
are made in ``cleanup_ctx`` and closed there; all state is on the app behind
the typed keys of keys.py.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from ..admission.admission import Admission
from ..admission.buckets import RateLimiter
from ..admission.buckets_memory import MemoryRateLimiter
from ..client import UpstreamPool
from ..config.settings import Settings
from ..observe.observer import Observer, make_observer
from ..outbound.forward import Forwarder
from ..outbound.health import Health
from ..outbound.realtime import RealtimeProxy
from ..outbound.tunnel import RealtimeSessions
from ..runtime.discovery import Discovery
from ..runtime.runtime import RuntimeHolder, build_runtime
from .builtin_upstreams import BuiltinUpstreams
from .keys import (
    BUILTINS,
    DISCOVERY,
    FORWARDER,
    HEALTH,
    LIMITER,
    OBSERVER,
    REALTIME,
    REALTIME_SESSIONS,
    RUNTIME,
    SESSION,
    STARTED_AT,
    UPSTREAMS,
)
from .middlewares import Cors
from .refusals import expect_continue
from .views import about_view, healthz_view, model_view, models_view, proxy_view

__all__ = ["create_app", "make_upstream_session", "server_options"]

# Below the keep-alive timeout of common upstream servers (uvicorn's is 5 s),
# so we never send a request on a connection the upstream is about to close.
POOL_KEEPALIVE_SECONDS = 4.0


def server_options() -> dict[str, Any]:
    """Keyword arguments for aiohttp's server (``AppRunner``/``TestServer``).

    The runner must also get ``handler_cancellation=True`` (``TestServer`` always
    passes it): a client that goes away cancels its handler, which closes the
    upstream request; aiohttp notices silent disconnects only so.

    - ``auto_decompress=False``: request bodies are forwarded exactly as they came.
    - ``access_log=None``: our own access log is written when a response *ends*.
    - ``tcp_keepalive=False``: ``oaimux serve`` sets SO_KEEPALIVE once on its
      listening sockets, and Linux copies it to every accepted connection
      (process.py, ``_listen``); aiohttp would set it again per connection,
      through a socket object and two system calls (docs/decisions.md,
      "An accepted connection costs no socket-option calls").
    """
    return {
        "auto_decompress": False,
        "access_log": None,
        "max_line_size": 8190,
        "max_field_size": 8190,
        "max_headers": 100,
        "tcp_keepalive": False,
    }


def make_upstream_session() -> aiohttp.ClientSession:
    """One pooled session per process, set up for a pass-through (docs/faults.md,
    "Client defaults that break a pass-through")."""
    connector = aiohttp.TCPConnector(
        limit=0,  # no global cap: the upstreams' own limits apply
        limit_per_host=0,
        keepalive_timeout=POOL_KEEPALIVE_SECONDS,
        enable_cleanup_closed=False,
        ttl_dns_cache=60,
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),  # never carry one client's cookies to another
        auto_decompress=False,
        trust_env=False,
        timeout=aiohttp.ClientTimeout(total=None),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        raise_for_status=False,
    )


async def _upstream_session_ctx(app: web.Application) -> AsyncIterator[None]:
    pool = app[UPSTREAMS] = UpstreamPool(keepalive=POOL_KEEPALIVE_SECONDS)
    holder = app[RUNTIME]
    # A reload keeps the warm connections of the upstreams it did not change
    # and closes those of the upstreams it removed (README, "Stop, reload, workers").
    pool.serve(holder.current.origins())
    holder.on_swap = lambda runtime: pool.serve(runtime.origins())
    app[FORWARDER] = Forwarder(pool, app[HEALTH], app[OBSERVER])
    app[SESSION] = make_upstream_session()
    app[REALTIME] = RealtimeProxy(
        app[SESSION],
        app[HEALTH],
        app[OBSERVER],
        sessions=app[REALTIME_SESSIONS],
        admission=app[LIMITER],
    )
    yield
    holder.on_swap = None
    pool.close()
    await app[SESSION].close()


async def _builtin_upstreams_ctx(app: web.Application) -> AsyncIterator[None]:
    # First of the contexts: discovery and the rest see the bound URLs. Closed
    # last, after the proxy's own requests (to the demo, too) have drained.
    holder = app[RUNTIME]
    bound = app[BUILTINS].bind(holder.current.settings)
    if bound is not holder.current.settings:
        # Still the start-up configuration, not a reload: no swap() (generation).
        holder.current = build_runtime(bound)
    await app[BUILTINS].ready()
    yield
    await app[BUILTINS].close()


async def _discovery_ctx(app: web.Application) -> AsyncIterator[None]:
    # In the background: an unreachable upstream never holds up start-up
    # (README, "Model discovery (`models: discover`)").
    app[DISCOVERY].start(app[SESSION])
    yield
    await app[DISCOVERY].close()


async def _close_realtime(app: web.Application) -> None:
    # on_shutdown runs before aiohttp waits for handlers: open WebSockets would
    # otherwise hold the drain until the grace runs out.
    await app[REALTIME_SESSIONS].close_all()


async def _limiter_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[RUNTIME].current.settings
    limiter: RateLimiter
    if settings.rate_limit_storage is not None:
        from ..admission.buckets_redis import RedisRateLimiter

        limiter = RedisRateLimiter(settings.rate_limit_storage)
    else:
        limiter = MemoryRateLimiter()
    admission = Admission(limiter)
    admission.start()
    app[LIMITER] = admission
    yield
    await admission.close()


def create_app(settings: Settings, observer: Observer | None = None) -> web.Application:
    """Build the application for ``settings``. Does no I/O."""
    # No middleware but CORS's: each view is its own error boundary, and with
    # none aiohttp runs no middleware chain per request (docs/decisions.md,
    # "The error boundary is in the views").
    cors = Cors(settings.server.cors) if settings.server.cors is not None else None
    middlewares = [cors.middleware] if cors is not None else []
    app = web.Application(middlewares=middlewares, client_max_size=settings.server.max_body_bytes)
    app[RUNTIME] = RuntimeHolder(build_runtime(settings))
    app[STARTED_AT] = time.time()
    app[HEALTH] = Health()
    observer = observer or make_observer(settings)
    app[OBSERVER] = observer
    app[HEALTH].on_change = observer.breaker_changed
    if cors is not None:
        app.on_response_prepare.append(cors.on_prepare)
    app[BUILTINS] = BuiltinUpstreams()
    app.cleanup_ctx.append(_builtin_upstreams_ctx)
    # Before the upstream session's context: the Responses WebSocket charges
    # each turn (README, "Codex CLI").
    app.cleanup_ctx.append(_limiter_ctx)
    app.cleanup_ctx.append(_upstream_session_ctx)
    app[DISCOVERY] = Discovery(app[RUNTIME])
    app.cleanup_ctx.append(_discovery_ctx)
    app[REALTIME_SESSIONS] = RealtimeSessions()
    app.on_shutdown.append(_close_realtime)

    router = app.router
    router.add_get("/healthz", healthz_view, allow_head=True)
    router.add_get("/about", observer.observed(about_view))
    for prefix in ("/v1", ""):
        router.add_get(f"{prefix}/models", observer.observed(models_view))
        router.add_get(prefix + "/models/{model:.+}", observer.observed(model_view))
    if observer.metrics is not None and settings.metrics.listen is None:
        # Not rate limited, not logged; with metrics.listen it moves to its own
        # listener (process.py), off the port that faces clients.
        router.add_get(settings.metrics.path, observer.metrics.handle)
    # Every origin-form target, a line feed in it too (``(?s)``): the router
    # never answers by itself, in aiohttp's plain text. Other target forms are
    # refused by the connection (connections.py).
    router.add_route("*", "/{tail:(?s:.*)}", proxy_view, expect_handler=expect_continue)
    return app
