"""Every typed ``web.AppKey`` of the application, in one place."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from .admission import Admission
from .client import UpstreamPool
from .demo import BuiltinUpstreams
from .discovery import Discovery
from .health import Health
from .observe.observer import Observer
from .realtime import RealtimeSessions
from .runtime import RuntimeHolder

__all__ = [
    "BUILTINS",
    "DISCOVERY",
    "HEALTH",
    "LIMITER",
    "OBSERVER",
    "REALTIME_SESSIONS",
    "RUNTIME",
    "SESSION",
    "STARTED_AT",
    "UPSTREAMS",
]

RUNTIME = web.AppKey("runtime", RuntimeHolder)
# The hot path's pooled connections (proxy/client/); SESSION serves discovery and
# realtime WebSockets.
UPSTREAMS = web.AppKey("upstream_pool", UpstreamPool)
SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)
LIMITER = web.AppKey("limiter", Admission)
OBSERVER = web.AppKey("observer", Observer)
HEALTH = web.AppKey("health", Health)
STARTED_AT = web.AppKey("started_at", float)
DISCOVERY = web.AppKey("discovery", Discovery)
REALTIME_SESSIONS = web.AppKey("realtime_sessions", RealtimeSessions)
# The listeners of built-in upstreams (``builtin: demo``); started only when named.
BUILTINS = web.AppKey("builtin_upstreams", BuiltinUpstreams)
