"""The configuration as the proxy uses it: frozen, typed, secrets masked.

Built only by :func:`proxy.config.load_settings` (or ``parse_settings``), which
validates ``routes.yaml`` into these objects once; the request path reads
them and never touches YAML or dicts of settings. Secrets (expanded header
values, proxy keys) live in fields whose ``repr`` is masked, so a settings
object can be logged or printed safely.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from yarl import URL

__all__ = [
    "BUILTIN_KINDS",
    "CREDENTIAL_HEADERS",
    "AuthKey",
    "Balance",
    "CircuitBreakerSettings",
    "ConfigError",
    "CorsSettings",
    "EnvSubstitution",
    "HeaderRewrite",
    "Limits",
    "LogSettings",
    "MetricsSettings",
    "RateLimitSettings",
    "RetrySettings",
    "Route",
    "Secret",
    "ServerSettings",
    "Settings",
    "Timeouts",
    "TokenBudget",
    "Upstream",
]


# Upstreams oaimux serves itself (``upstreams.<name>.builtin``); see demo.py.
BUILTIN_KINDS = ("demo",)


# Headers that carry an upstream's credential (lower case).
CREDENTIAL_HEADERS = frozenset(("authorization", "api-key", "x-api-key", "x-goog-api-key"))


class ConfigError(Exception):
    """The configuration cannot be used; the message names file, key path and value."""


@dataclass(frozen=True, slots=True)
class Secret:
    """A string that must never be printed: its repr is masked."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('****')"


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    """A token bucket: ``burst`` tokens of capacity, refilled at ``requests_per_minute``."""

    requests_per_minute: float
    burst: int

    @property
    def refill_per_second(self) -> float:
        return self.requests_per_minute / 60.0


@dataclass(frozen=True, slots=True)
class TokenBudget:
    """Token buckets: ``per_minute`` tokens refilled continuously over a minute,
    ``per_day`` over 24 hours (``None``: that window is not limited).

    A request reserves an estimate before it is sent (README: Token budgets):
    its output part is the request's own output cap, else
    ``default_output_tokens``, and never more than ``max_output_reservation``
    (``None``: no cap). ``enforce`` false counts without ever refusing.
    """

    per_minute: int | None
    per_day: int | None
    default_output_tokens: int = 1024
    max_output_reservation: int | None = 4096
    enforce: bool = True
    # Derived once, for the request path (admission/buckets_memory.py), which reads
    # only these: each window's capacity (0: not limited) and the smaller of
    # the limited ones (an estimate up to it is charged whole to each
    # window), the tokens a window drains a nanosecond, the nanoseconds one
    # token takes to drain (0.0 when not limited), and the output
    # reservation's ceiling.
    cap_minute: int = field(init=False, repr=False, compare=False)
    cap_day: int = field(init=False, repr=False, compare=False)
    cap_smallest: int = field(init=False, repr=False, compare=False)
    # The capacities as floats: what a window owes is one, and comparing a float
    # with an int above 2**30 converts the int each time (CPython 3.11).
    room_minute: float = field(init=False, repr=False, compare=False)
    room_day: float = field(init=False, repr=False, compare=False)
    drain_minute: float = field(init=False, repr=False, compare=False)
    drain_day: float = field(init=False, repr=False, compare=False)
    ns_minute: float = field(init=False, repr=False, compare=False)
    ns_day: float = field(init=False, repr=False, compare=False)
    output_ceiling: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        minute_ns, day_ns = 60 * 10**9, 86_400 * 10**9
        derived = {
            "cap_minute": self.per_minute or 0,
            "cap_day": self.per_day or 0,
            "cap_smallest": min(cap for cap in (self.per_minute, self.per_day, 1 << 62) if cap),
            "room_minute": float(self.per_minute or 0),
            "room_day": float(self.per_day or 0),
            "drain_minute": self.per_minute / minute_ns if self.per_minute else 0.0,
            "drain_day": self.per_day / day_ns if self.per_day else 0.0,
            "ns_minute": minute_ns / self.per_minute if self.per_minute else 0.0,
            "ns_day": day_ns / self.per_day if self.per_day else 0.0,
            "output_ceiling": (
                self.max_output_reservation if self.max_output_reservation is not None else 1 << 62
            ),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)


@dataclass(frozen=True, slots=True)
class Limits:
    """One ``rate_limit`` block: a request bucket, token buckets, or both."""

    requests: RateLimitSettings | None
    tokens: TokenBudget | None = None


@dataclass(frozen=True, slots=True)
class CorsSettings:
    """CORS for browser apps; ``allow_origins`` is ``("*",)`` for any origin."""

    allow_origins: tuple[str, ...]
    max_age: int = 600


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int | None = None
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_body_bytes: int = 32 * 1024 * 1024
    shutdown_grace_seconds: float = 30.0
    # Slow clients (README "Slow and oversized clients"): time allowed to send
    # the request headers, and the longest silence while the request body is
    # being read.
    header_timeout: float = 30.0
    body_idle_timeout: float = 60.0
    # The longest a whole request body may take to arrive, however steadily
    # (a body trickling a byte a minute is never silent for long).
    body_timeout: float = 300.0
    # The longest a response write may wait for a client that takes no bytes
    # (nginx's send_timeout); a reader that makes progress is never cut.
    send_timeout: float = 60.0
    # Longest idle time between two requests on one connection; also bounds the
    # time for a later request head to arrive. Keep it above the idle timeout of
    # any proxy in front (nginx's upstream keepalive_timeout is 60 s).
    keepalive_timeout: float = 75.0
    cors: CorsSettings | None = None


@dataclass(frozen=True, slots=True)
class LogSettings:
    format: Literal["text", "json"] = "text"
    level: str = "INFO"
    access: bool = True


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    enabled: bool = True
    path: str = "/metrics"
    # "host:port" to serve /metrics on its own listener instead of the main one.
    listen: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class HeaderRewrite:
    """Headers an upstream gets set (after the client's were vetted) and removed."""

    set: tuple[tuple[str, Secret], ...] = ()
    remove: frozenset[str] = frozenset()  # lower-case names

    @property
    def sets_authorization(self) -> bool:
        return any(name.lower() in CREDENTIAL_HEADERS for name, _ in self.set)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds: to connect; until response headers; longest silence between body chunks.

    There is deliberately no total timeout: a stream that keeps producing is never cut.
    """

    connect: float = 10.0
    response: float = 600.0
    idle: float = 300.0


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """Re-tries of the same upstream, only for failures before any response byte."""

    attempts: int = 0
    backoff: float = 0.2  # seconds, doubled each time, with full jitter


@dataclass(frozen=True, slots=True)
class CircuitBreakerSettings:
    """After ``failures`` consecutive failures skip the upstream for ``cooldown`` seconds."""

    failures: int = 5
    cooldown: float = 30.0


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: URL  # base URL without a trailing slash, as the SDKs' base_url
    headers: HeaderRewrite = HeaderRewrite()
    timeouts: Timeouts = Timeouts()
    pass_client_auth: bool = False
    # Response headers that identify the upstream account are stripped unless kept here.
    keep_response_headers: frozenset[str] = frozenset()
    retries: RetrySettings = RetrySettings()
    circuit_breaker: CircuitBreakerSettings = CircuitBreakerSettings()
    # ``builtin: demo``: served by oaimux itself (demo.py); ``url`` is a
    # placeholder until the listener is bound (BuiltinUpstreams.bind).
    builtin: str | None = None
    # Query parameters added to every request to this upstream (Azure's
    # ``api-version``), replacing the client's of the same name; values are
    # secrets (README, "Azure OpenAI").
    query: tuple[tuple[str, Secret], ...] = ()
    # It takes the Responses API over a WebSocket (``GET /v1/responses``).
    responses_websocket: bool = False

    @property
    def injects_credential(self) -> bool:
        return self.headers.sets_authorization


@dataclass(frozen=True, slots=True)
class Balance:
    """Weighted choice among upstreams; the others remain fallbacks."""

    weights: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Route:
    """One line of the routing table. Exactly one of model/path/default selects it."""

    index: int
    upstreams: tuple[str, ...]  # ordered fallback list (the balance members, for a balance)
    model: str | None = None  # glob over the request's model
    path: str | None = None  # glob over the path after /v1/
    default: bool = False
    balance: Balance | None = None
    rewrite_model: str | None = None
    rate_limit: Limits | None = None
    # Move on to the next upstream after a response timeout (it may bill twice).
    fallback_on_timeout: bool = False
    discover: bool = False  # models: discover
    prefix: str = ""  # for discovered ids: public id = prefix + upstream id

    @property
    def is_glob(self) -> bool:
        return self.model is not None and any(c in self.model for c in "*?[")

    def describe(self) -> str:
        if self.model is not None:
            return f"model {self.model}"
        if self.path is not None:
            return f"path {self.path}"
        if self.discover:
            return f"discover {self.prefix}*"
        return "default"


@dataclass(frozen=True, slots=True)
class AuthKey:
    """A proxy key: only its SHA-256 digest is kept in memory."""

    name: str
    sha256: bytes = field(repr=False)
    models: tuple[str, ...] | None = None  # globs; None means every model
    rate_limit: Limits | None = None


@dataclass(frozen=True, slots=True)
class EnvSubstitution:
    """A ``${VAR}`` whose expansion deserves a second look (``oaimux check`` warns).

    Recorded only when the text put in was empty, or came from the
    ``${VAR:-default}`` because ``VAR`` is unset. Never holds the value.
    """

    path: str  # the key path, e.g. upstreams.openai.headers.set.Authorization
    variable: str
    empty: bool  # the expansion is the empty string
    from_default: bool  # VAR is unset: the default written in the file was used


@dataclass(frozen=True, slots=True)
class Settings:
    source: str
    server: ServerSettings
    log: LogSettings
    metrics: MetricsSettings
    rate_limit: Limits | None
    rate_limit_storage: str | None  # None: in memory; else a redis:// URL
    rate_limit_fail_open: bool
    upstreams: Mapping[str, Upstream]
    routes: tuple[Route, ...]
    auth_keys: tuple[AuthKey, ...]
    env_substitutions: tuple[EnvSubstitution, ...] = ()

    def summary(self) -> str:
        return (
            f"{self.source}: {len(self.upstreams)} upstreams "
            f"({', '.join(self.upstreams)}), {len(self.routes)} routes"
        )
