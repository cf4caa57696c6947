"""Who is asking, and may they: client identity, proxy keys, the rate limit.

Every request except ``GET /healthz`` and ``GET /metrics`` passes here once,
and takes exactly one token from exactly one bucket (:func:`choose_limit`):

- the route's own ``rate_limit`` when the request matched a route that has
  one: a bucket per client *and* route, separate from the client's general
  bucket (an expensive model gets its own, usually smaller, budget);
- otherwise the key's own ``rate_limit`` when the caller's proxy key has one;
- otherwise the global ``rate_limit`` (no limit at all when there is none).

The client (a :class:`Caller`, made by inbound/head.py's ``identify``) is the
proxy key's name when proxy keys are configured and the caller presented a
valid one; otherwise the client address (see clientip.py), IPv6 per /64. A
failed key check is charged to the caller's address under the global limit,
so guessing keys is rate limited too.

:class:`Admission` owns the bucket storage and what happens when the storage
cannot be reached (``rate_limit.on_storage_error``: let requests through with
a warning that does not repeat itself, or answer 503).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..config.settings import AuthKey, RateLimitSettings, Route, Settings
from ..errors import RateLimited, ServiceUnavailable, Unauthorized
from ..observe.failurelog import TEN_MINUTES, FailureLog
from .buckets import Decision, RateLimiter, StorageUnavailable
from .clientip import limit_key

__all__ = [
    "Admission",
    "Caller",
    "choose_limit",
    "openai_duration",
    "rate_limited",
    "unauthorized",
]

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


def choose_limit(
    settings: Settings, caller: Caller, route: Route | None
) -> tuple[RateLimitSettings, str] | None:
    """The one limit this request is charged to, and the bucket's full key.

    ``None`` when no limit applies. The route's bucket is named by the route's
    selector (``model gpt-4*``), which survives a reload that reorders routes.
    """
    if route is not None and route.rate_limit is not None:
        return route.rate_limit, f"{caller.bucket}|route:{route.describe()}"
    if caller.key is not None and caller.key.rate_limit is not None:
        return caller.key.rate_limit, f"{caller.bucket}|key"
    if settings.rate_limit is not None:
        return settings.rate_limit, f"{caller.bucket}|global"
    return None


def openai_duration(seconds: float) -> str:
    """OpenAI's reset format (Go's duration): ``250ms``, ``1s``, ``6m0s``, ``1h2m3s``.

    Rounded up, to whole milliseconds below one second and to whole seconds above.
    """
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


def rate_limited(decision: Decision, limit: RateLimitSettings, route: Route | None) -> RateLimited:
    """The 429 for a refused request, with the headers OpenAI's SDKs read.

    ``Retry-After`` is whole seconds (RFC 9110 §10.2.3), at least 1, rounded
    up so a client that honours it is never refused again for waiting too
    little; ``retry-after-ms`` is the precise wait, which the SDKs prefer.
    """
    wait = max(decision.retry_after, 0.001)
    seconds = max(1, math.ceil(wait))
    where = ""
    if route is not None and route.rate_limit is not None:
        where = " to this model" if route.model is not None else " to this endpoint"
    return RateLimited(
        f"Rate limit reached for requests{where}: limit {limit.burst} requests, refilled at "
        f"{limit.requests_per_minute:g} per minute. Please try again in {seconds}s.",
        headers={
            "Retry-After": str(seconds),
            "retry-after-ms": str(math.ceil(wait * 1000)),
            "x-ratelimit-limit-requests": str(limit.burst),
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": openai_duration(decision.reset_after),
        },
    )


class Admission:
    """Charges requests to buckets in ``storage``; owns it and its failure policy.

    When the storage raises :class:`StorageUnavailable`, the request is let
    through (``on_storage_error: open``, the default) or refused with 503
    ``rate_limiter_unavailable`` (``closed``). Either way the outage is logged
    when it starts, when its reason changes and every ``warn_every`` seconds
    (10 minutes) while it lasts, with the number of requests affected; not once
    per request. Recovery is logged once (observe/failurelog.py).
    """

    def __init__(
        self,
        storage: RateLimiter,
        *,
        warn_every: float = TEN_MINUTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.storage = storage
        self._outage = FailureLog(log, "rate-limit storage", every=warn_every, clock=clock)

    def start(self) -> None:
        self.storage.start()

    async def close(self) -> None:
        await self.storage.close()

    async def charge(self, settings: Settings, caller: Caller, route: Route | None) -> None:
        """Take one token for this request, or raise :class:`RateLimited`
        (or :class:`ServiceUnavailable` when the storage is down and policy is closed)."""
        chosen = choose_limit(settings, caller, route)
        if chosen is None:
            return
        limit, key = chosen
        try:
            decision = await self.storage.acquire(key, limit)
        except StorageUnavailable as exc:
            fail_open = settings.rate_limit_fail_open
            self._storage_failed(exc, fail_open)
            if fail_open:
                return
            raise ServiceUnavailable(
                "The rate limiter's storage is unreachable, so requests are refused; "
                "try again shortly.",
                code="rate_limiter_unavailable",
                headers={"Retry-After": "1"},
            ) from None
        if self._outage.failing:
            self._outage.recovered()
        if not decision.allowed:
            raise rate_limited(decision, limit, route)

    def _storage_failed(self, exc: StorageUnavailable, fail_open: bool) -> None:
        self._outage.failed(
            f"unavailable ({exc}); failing "
            + ("open: requests pass unlimited" if fail_open else "closed: requests get 503")
        )


def unauthorized() -> Unauthorized:
    return Unauthorized(
        "Incorrect API key provided. Send 'Authorization: Bearer <key>' with a key "
        "this proxy knows."
    )
