"""Everything derived from one configuration, swapped as a whole on reload.

A :class:`Runtime` is immutable. A request takes ``holder.current`` once at its
start and uses that snapshot to its end, so a reload (SIGHUP) never changes the
rules under a request already running: in-flight requests finish on the old
configuration, new ones see the new one (README, "Stop, reload, workers").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

import aiohttp
from yarl import URL

from ..admission.clientip import TrustedNetworks, trusted_networks
from ..admission.proxy_keys import KeyTable
from ..client import Destination, Origin
from ..config.settings import Route, Settings, Upstream
from .headers import RequestHeaderPolicy, ResponseHeaderPolicy
from .query import query_param_name
from .route_table import RouteTable

__all__ = ["Runtime", "RuntimeHolder", "UpstreamPlan", "build_runtime"]

# Characters a query name or value keeps unencoded (RFC 3986 §2.3).
_UNRESERVED = "-._~"


@dataclass(frozen=True, slots=True)
class UpstreamPlan:
    """An upstream with everything the hot path needs precomputed."""

    upstream: Upstream
    base: str  # the base URL as text, without a trailing slash
    request_headers: RequestHeaderPolicy
    response_headers: ResponseHeaderPolicy
    client_timeout: aiohttp.ClientTimeout  # discovery and realtime (ClientSession)
    origin: Origin  # the hot path's lean client (proxy/client/)
    destination: Destination  # the origin and its timeouts, as that client takes them
    path_prefix: str  # the base URL's path, without a trailing slash
    # The upstream's ``query`` parameters, encoded (values are secrets: no repr),
    # and their names (lower-cased, as query_param_name reads a client's),
    # whose client parameters they replace.
    added_query: str = field(default="", repr=False)
    added_names: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return self.upstream.name

    def url_for(self, path: str, query_string: str) -> URL:
        """``<base url>/<path>?<query>``; both are raw (still percent-encoded) and
        already vetted: no ``..`` segment, no encoded slash (see inbound/head.py).
        The upstream's own query parameters are added (:meth:`query_for`)."""
        text = f"{self.base}/{path}"
        query_string = self.query_for(query_string)
        if query_string:
            text = f"{text}?{query_string}"
        return URL(text, encoded=True)

    def target_for(self, path: str, query_string: str) -> str:
        """The request target (RFC 9112 §3.2.1 origin-form) for :meth:`url_for`'s URL."""
        if self.added_query:  # the hot path: no call for an upstream without ``query``
            query_string = self.query_for(query_string)
        if query_string:
            return f"{self.path_prefix}/{path}?{query_string}"
        return f"{self.path_prefix}/{path}"

    def query_for(self, query_string: str) -> str:
        """The query sent upstream: the client's (raw, vetted), without the
        parameters the upstream's ``query`` sets, then those (README, "Azure
        OpenAI"). Unchanged for an upstream with no ``query``."""
        added = self.added_query
        if not added:
            return query_string
        names = self.added_names
        kept = [
            part for part in query_string.split("&") if part and query_param_name(part) not in names
        ]
        kept.append(added)
        return "&".join(kept)


def _plan(upstream: Upstream) -> UpstreamPlan:
    t = upstream.timeouts
    origin = Origin.of(upstream.url)
    return UpstreamPlan(
        upstream=upstream,
        base=str(upstream.url).rstrip("/"),
        request_headers=RequestHeaderPolicy.for_upstream(upstream),
        response_headers=ResponseHeaderPolicy.for_upstream(upstream),
        # No total timeout: a stream that keeps producing is never cut. Time to
        # response headers is bounded by the caller; idle silence by the
        # connection's read timeout once headers are in (see outbound/forward.py).
        # ``connect`` also bounds DNS and the TLS handshake, which
        # ``sock_connect`` alone does not.
        client_timeout=aiohttp.ClientTimeout(
            total=None, connect=t.connect, sock_connect=t.connect, sock_read=None
        ),
        origin=origin,
        destination=Destination(origin, t.connect, t.response),
        path_prefix=upstream.url.raw_path.rstrip("/"),
        added_query="&".join(
            f"{quote(name, safe=_UNRESERVED)}={quote(value.value, safe=_UNRESERVED)}"
            for name, value in upstream.query
        ),
        added_names=frozenset(name.lower() for name, _ in upstream.query),
    )


@dataclass(frozen=True, slots=True)
class Runtime:
    settings: Settings
    table: RouteTable
    plans: Mapping[str, UpstreamPlan]
    keys: KeyTable
    trusted: TrustedNetworks
    # Does any route carry its own rate_limit (so the bucket depends on the route)?
    route_limited: bool
    # Does any rate_limit block (global, key, route) set a token budget? Then a
    # request is charged once its body is read (its estimate needs the body),
    # and the model finder also reads the output cap.
    token_limited: bool
    # Plain flags for the hot path (a bool test, not a __bool__ call per request):
    # is any rate limit configured at all (global, per key or per route)?
    limited: bool
    keyed: bool  # are proxy keys configured?
    trusts_proxies: bool  # is server.trusted_proxies set?

    def plans_for(self, route: Route) -> tuple[UpstreamPlan, ...]:
        return tuple(self.plans[name] for name in route.upstreams)

    def origins(self) -> list[Origin]:
        """Where this configuration's upstreams are (what the pool keeps warm)."""
        return [plan.origin for plan in self.plans.values()]


def build_runtime(
    settings: Settings, discovered: Mapping[int, tuple[str, ...]] | None = None
) -> Runtime:
    route_limited = any(r.rate_limit is not None for r in settings.routes)
    blocks = [settings.rate_limit, *(r.rate_limit for r in settings.routes)]
    blocks += [k.rate_limit for k in settings.auth_keys]
    return Runtime(
        settings=settings,
        table=RouteTable(settings.routes, discovered),
        plans={name: _plan(u) for name, u in settings.upstreams.items()},
        keys=KeyTable(settings.auth_keys),
        trusted=trusted_networks(settings.server.trusted_proxies),
        route_limited=route_limited,
        token_limited=any(b is not None and b.tokens is not None for b in blocks),
        limited=route_limited
        or settings.rate_limit is not None
        or any(k.rate_limit is not None for k in settings.auth_keys),
        keyed=bool(settings.auth_keys),
        trusts_proxies=bool(settings.server.trusted_proxies),
    )


@dataclass(slots=True)
class RuntimeHolder:
    """The one mutable cell: ``current`` is replaced whole, never changed in place.

    ``on_swap`` is told of each new runtime (app.py: the upstream pool keeps
    the connections of the upstreams that stayed and drops the others)."""

    current: Runtime
    generation: int = field(default=0)
    on_swap: Callable[[Runtime], None] | None = None

    def swap(self, runtime: Runtime) -> None:
        self.current = runtime
        self.generation += 1
        if self.on_swap is not None:
            self.on_swap(runtime)
