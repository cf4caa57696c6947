"""Who is asking, and may they: client identity, proxy keys, the rate limit.

Every request except ``GET /healthz`` and ``GET /metrics`` passes here once,
and takes exactly one token from exactly one bucket:

- the route's own ``rate_limit`` when the route has one (bucket per client and
  route), otherwise
- the key's own ``rate_limit`` when the caller's proxy key has one, otherwise
- the global ``rate_limit``.

The client is the proxy key's name when proxy keys are configured and the
caller presented a valid one; otherwise the client address (see clientip.py),
IPv6 per /64. A failed key check is charged to the caller's address, so
guessing keys is rate limited too.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from aiohttp import web

from .auth import presented_key
from .clientip import client_address, limit_key
from .config import AuthKey, RateLimitSettings, Route
from .errors import RateLimited, ServiceUnavailable, Unauthorized
from .ratelimit import RateLimiter, StorageUnavailable
from .runtime import Runtime

__all__ = ["Caller", "charge", "identify", "openai_duration", "unauthorized"]

log = logging.getLogger("oaimux.ratelimit")


@dataclass(frozen=True, slots=True)
class Caller:
    address: str  # as the limiter sees it (after trusted X-Forwarded-For)
    key: AuthKey | None
    authenticated: bool  # False when keys are configured and none valid was shown

    @property
    def bucket(self) -> str:
        if self.key is not None:
            return f"key:{self.key.name}"
        return f"ip:{limit_key(self.address)}"


def identify(request: web.BaseRequest, runtime: Runtime) -> Caller:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    host = peer[0] if isinstance(peer, tuple) and peer else None
    trusted = runtime.settings.server.trusted_proxies
    forwarded = request.headers.getall("X-Forwarded-For", ()) if trusted else ()
    address = client_address(host, forwarded, trusted)
    keys = runtime.keys
    if not keys:
        return Caller(address, None, True)
    key = keys.authenticate(presented_key(request.headers))
    return Caller(address, key, key is not None)


def openai_duration(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``1h2m3s``, ``250ms``."""
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    total = math.ceil(seconds)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


_last_storage_warning = 0.0


async def charge(
    limiter: RateLimiter | None,
    runtime: Runtime,
    caller: Caller,
    route: Route | None,
) -> None:
    """Take one token for this request, or raise :class:`RateLimited`."""
    settings = runtime.settings
    limit: RateLimitSettings | None
    if route is not None and route.rate_limit is not None:
        limit, scope = route.rate_limit, f"route:{route.describe()}"
    elif caller.key is not None and caller.key.rate_limit is not None:
        limit, scope = caller.key.rate_limit, "key"
    else:
        limit, scope = settings.rate_limit, "global"
    if limit is None or limiter is None:
        return
    try:
        decision = await limiter.acquire(f"{caller.bucket}|{scope}", limit)
    except StorageUnavailable:
        global _last_storage_warning
        now = time.monotonic()
        if now - _last_storage_warning > 10:
            _last_storage_warning = now
            log.warning(
                "rate-limit storage unreachable; failing %s",
                "open (requests are let through)"
                if settings.rate_limit_fail_open
                else "closed (503)",
            )
        if settings.rate_limit_fail_open:
            return
        raise ServiceUnavailable(
            "The rate limiter's storage is unreachable; try again shortly.",
            code="rate_limiter_unavailable",
        ) from None
    if decision.allowed:
        return
    wait = max(decision.retry_after, 0.001)
    seconds = max(1, math.ceil(wait))
    raise RateLimited(
        f"Rate limit reached for requests: limit {limit.burst} requests, "
        f"{limit.requests_per_minute:g} per minute. Please try again in {seconds}s.",
        headers={
            "Retry-After": str(seconds),
            "retry-after-ms": str(max(1, math.ceil(wait * 1000))),
            "x-ratelimit-limit-requests": str(limit.burst),
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": openai_duration(decision.reset_after),
        },
    )


def unauthorized() -> Unauthorized:
    return Unauthorized(
        "Incorrect API key provided. Send 'Authorization: Bearer <key>' with a key "
        "this proxy knows."
    )
