"""The proxy's metric families, declared once: name, help text and labels.

These are the metrics' contract with dashboards and alerts (README,
"Metrics"): changing a name or a label breaks someone's queries. metrics.py
makes them with prometheus_client, which adds ``_total`` to a counter's name
in the exposition. Label values are bounded by the configuration (see the
docstring of metrics.py).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

__all__ = [
    "BREAKER_STATE",
    "CLIENT_STALLS",
    "DURATION",
    "ERRORS",
    "FALLBACKS",
    "IN_FLIGHT",
    "KEY_TOKENS",
    "OPEN_STREAMS",
    "RATE_LIMITED",
    "REQUESTS",
    "TOKENS",
    "TOKENS_UNRECONCILED",
    "TOKEN_LIMITED",
    "TOKEN_LIMIT_NOT_ENFORCED",
    "TTFB",
    "UPSTREAM_FAILURES",
    "Family",
]

# The prometheus_client multiprocess modes used here (its Gauge takes these names).
GaugeMode = Literal["all", "livesum", "livemax"]


class Family(NamedTuple):
    """One metric: its name, help text and label names."""

    name: str
    help: str
    labels: tuple[str, ...] = ()
    # A gauge's value with several workers (prometheus_client's multiprocess_mode).
    multiprocess_mode: GaugeMode = "all"


# Counters.
REQUESTS = Family(
    "oaimux_requests",
    "Requests answered, by routing-table model, upstream and status class.",
    ("model", "upstream", "status_class"),
)
RATE_LIMITED = Family(
    "oaimux_rate_limited",
    "Requests refused by the rate limiter, by routing-table model.",
    ("model",),
)
UPSTREAM_FAILURES = Family(
    "oaimux_upstream_failures",
    "Failed attempts at an upstream, by kind (connect, timeout, status_503, "
    "upstream_reset, idle_timeout, ...).",
    ("upstream", "kind"),
)
CLIENT_STALLS = Family(
    "oaimux_client_stalls",
    "Responses cut because the client took no bytes for server.send_timeout, by upstream.",
    ("upstream",),
)
FALLBACKS = Family(
    "oaimux_fallbacks",
    "Requests moved on from one upstream to the next.",
    ("from_upstream", "to_upstream"),
)
ERRORS = Family(
    "oaimux_errors",
    "Errors the proxy answered itself (OpenAI error JSON with x-oaimux-error), "
    "by status and error code; also the requests refused before a handler ran.",
    ("status", "code"),
)
TOKENS = Family(
    "oaimux_tokens",
    "Tokens reported in the upstream's usage object, by routing-table model, "
    "upstream and type (prompt, completion, cache_read, cache_creation).",
    ("model", "upstream", "type"),
)
# Token budgets (README, "Token budgets"): ``key`` is a proxy key's configured
# name, never the key ("" without proxy keys; a failed key check never
# reaches these).
KEY_TOKENS = Family(
    "oaimux_key_tokens",
    "Tokens reported in the upstream's usage object, by proxy key name, "
    "routing-table model and type (input: uncached input, cached: input read "
    "from the provider's cache, output).",
    ("key", "model", "type"),
)
TOKEN_LIMITED = Family(
    "oaimux_token_limited",
    "Requests refused by a token budget, by proxy key name, routing-table model "
    "and window (minute, day).",
    ("key", "model", "window"),
)
TOKEN_LIMIT_NOT_ENFORCED = Family(
    "oaimux_token_limit_not_enforced",
    "Requests a token budget with enforce: false let through that it would have "
    "refused, by proxy key name, routing-table model and window (minute, day).",
    ("key", "model", "window"),
)
TOKENS_UNRECONCILED = Family(
    "oaimux_tokens_unreconciled",
    "Answers whose token reservation was kept because they reported no usage, "
    "by proxy key name, routing-table model and reason (no_usage, cut_short).",
    ("key", "model", "reason"),
)

# Histograms (seconds; the buckets are in metrics.py).
DURATION = Family(
    "oaimux_request_duration_seconds",
    "Time from the request's arrival to the end of its response (streams included).",
    ("upstream",),
)
TTFB = Family(
    "oaimux_time_to_first_byte_seconds",
    "Time from the request's arrival until the upstream's response headers were sent on.",
    ("upstream",),
)

# Gauges: summed over the live workers, but a breaker is as open as its worst worker's.
IN_FLIGHT = Family(
    "oaimux_requests_in_flight",
    "Requests being handled now.",
    multiprocess_mode="livesum",
)
OPEN_STREAMS = Family(
    "oaimux_open_streams",
    "Streamed responses (SSE or chunked) being relayed now.",
    multiprocess_mode="livesum",
)
BREAKER_STATE = Family(
    "oaimux_circuit_breaker_state",
    "Circuit breaker per upstream: 0 closed, 1 half-open, 2 open "
    "(with several workers, the worst of them).",
    ("upstream",),
    multiprocess_mode="livemax",
)
