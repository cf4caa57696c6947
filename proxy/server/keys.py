"""Every typed ``web.AppKey`` of the application, in one place."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from ..admission.admission import Admission
from ..client import UpstreamPool
from ..observe.observer import Observer
from ..outbound.forward import Forwarder
from ..outbound.health import Health
from ..outbound.realtime import RealtimeProxy
from ..outbound.tunnel import RealtimeSessions
from ..runtime.discovery import Discovery
from ..runtime.runtime import RuntimeHolder
from .builtin_upstreams import BuiltinUpstreams

__all__ = [
    "BUILTINS",
    "DISCOVERY",
    "FORWARDER",
    "HEALTH",
    "LIMITER",
    "OBSERVER",
    "REALTIME",
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
# Built with the pool: what sends each routed request to its upstreams.
FORWARDER = web.AppKey("forwarder", Forwarder)
LIMITER = web.AppKey("limiter", Admission)
OBSERVER = web.AppKey("observer", Observer)
HEALTH = web.AppKey("health", Health)
STARTED_AT = web.AppKey("started_at", float)
DISCOVERY = web.AppKey("discovery", Discovery)
REALTIME_SESSIONS = web.AppKey("realtime_sessions", RealtimeSessions)
# Built with SESSION: what opens realtime WebSocket sessions (and the tunnels).
REALTIME = web.AppKey("realtime", RealtimeProxy)
# The listeners of built-in upstreams (``builtin: demo``); started only when named.
BUILTINS = web.AppKey("builtin_upstreams", BuiltinUpstreams)
