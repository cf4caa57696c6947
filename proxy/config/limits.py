"""Rate-limit settings: a token bucket wherever one is written, and the top-level section.

A ``rate_limit`` mapping may stand at the top of the file (the default for
every caller, with its storage and failure policy), on a route or on a proxy
key; README "Rate limiting" says which one applies.
"""

from __future__ import annotations

from .fields import Node, int_in, nonempty_string, positive_number, show, string
from .settings import RateLimitSettings

__all__ = ["rate_limit", "rate_limit_section"]


def rate_limit(node: Node) -> RateLimitSettings:
    m = node.mapping(("requests_per_minute", "burst", "storage", "on_storage_error"))
    for key in ("requests_per_minute", "burst"):
        if key not in m:
            raise node.error(f"missing key {key!r}")
    return RateLimitSettings(
        requests_per_minute=positive_number(node.child("requests_per_minute")),
        burst=int_in(1, 10**9)(node.child("burst")),
    )


def rate_limit_section(node: Node) -> tuple[RateLimitSettings | None, str | None, bool]:
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
