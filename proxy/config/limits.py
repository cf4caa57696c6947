"""Rate-limit settings: request and token buckets wherever written, and the top-level section.

A ``rate_limit`` mapping may stand at the top of the file (the default for
every caller, with its storage and failure policy), on a route or on a proxy
key; README "Rate limiting" says which one applies.
"""

from __future__ import annotations

from typing import Any

from .fields import Node, boolean, int_in, nonempty_string, positive_number, show, string
from .settings import Limits, RateLimitSettings, TokenBudget

__all__ = ["rate_limit", "rate_limit_section"]


_TOKEN_KEYS = (
    "tokens_per_minute",
    "tokens_per_day",
    "default_output_tokens",
    "max_output_reservation",
    "enforce",
)
# Far above any real budget, and small enough that token arithmetic in Redis's
# Lua numbers (doubles) stays exact to well below one token.
_MAX_TOKENS = 10**12


def rate_limit(node: Node) -> Limits:
    """One ``rate_limit`` block: requests, tokens, or both (README: Token budgets)."""
    m = node.mapping(("requests_per_minute", "burst", "storage", "on_storage_error", *_TOKEN_KEYS))
    requests = None
    if "requests_per_minute" in m or "burst" in m:
        for key in ("requests_per_minute", "burst"):
            if key not in m:
                raise node.error(f"missing key {key!r} (requests_per_minute and burst go together)")
        requests = RateLimitSettings(
            requests_per_minute=positive_number(node.child("requests_per_minute")),
            burst=int_in(1, 10**9)(node.child("burst")),
        )
    tokens = _token_budget(node, m)
    if requests is None and tokens is None:
        raise node.error(
            "set at least one of requests_per_minute (with burst), tokens_per_minute, "
            "tokens_per_day"
        )
    return Limits(requests, tokens)


def _token_budget(node: Node, m: dict[str, Any]) -> TokenBudget | None:
    count = int_in(1, _MAX_TOKENS)
    per_minute = node.opt("tokens_per_minute", count, None)
    per_day = node.opt("tokens_per_day", count, None)
    if per_minute is None and per_day is None:
        for key in _TOKEN_KEYS[2:]:
            if key in m:
                raise node.child(key).error("needs tokens_per_minute or tokens_per_day")
        return None
    d = TokenBudget(None, None)
    cap = d.max_output_reservation
    if "max_output_reservation" in m:  # present and null: no cap
        cap = node.opt("max_output_reservation", int_in(0, _MAX_TOKENS), None)
    return TokenBudget(
        per_minute=per_minute,
        per_day=per_day,
        default_output_tokens=node.opt(
            "default_output_tokens", int_in(0, _MAX_TOKENS), d.default_output_tokens
        ),
        max_output_reservation=cap,
        enforce=node.opt("enforce", boolean, d.enforce),
    )


def rate_limit_section(node: Node) -> tuple[Limits | None, str | None, bool]:
    """The top-level ``rate_limit``: its bucket, the Redis URL (None: in memory), fail open."""
    if node.value is None:
        return None, None, True
    limit = rate_limit(node)
    storage = node.opt("storage", nonempty_string, None)
    if storage is not None and storage != "memory":
        if not storage.startswith(("redis://", "rediss://", "unix://")):
            raise node.child("storage").error("expected 'memory' or a redis://host:port/db URL")
    else:
        storage = None
    mode = node.opt("on_storage_error", string, "open")
    if mode not in ("open", "closed"):
        raise node.child("on_storage_error").error(f"expected open or closed, got {show(mode)}")
    return limit, storage, mode == "open"
