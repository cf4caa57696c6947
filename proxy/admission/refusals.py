"""The limiter's refusals: the 429s for a request bucket and for a token
window with no room, with the headers OpenAI's SDKs read (README, "Rate
limiting" and "Token budgets"), and the 401 for a missing or unknown key.
admission.py raises them; errors.py renders them in the client's dialect.
"""

from __future__ import annotations

import math

from ..config.settings import RateLimitSettings, Route
from ..errors import RateLimited, TokensLimited, Unauthorized
from .buckets import Decision
from .budget import REMAINING_TOKENS, RESET_TOKENS, openai_duration
from .token_buckets import TokenDecision

__all__ = ["rate_limited", "tokens_limited", "unauthorized"]

_WINDOW_NAMES = {"minute": "tokens per min (TPM)", "day": "tokens per day (TPD)"}


def tokens_limited(decision: TokenDecision, estimate: int, route: Route | None) -> TokensLimited:
    """The 429 for a reservation a token bucket had no room for, with the
    headers OpenAI's SDKs read (``Retry-After`` as in :func:`rate_limited`:
    until the estimate fits in every window)."""
    wait = max(decision.retry_after, 0.001)
    seconds = max(1, math.ceil(wait))
    remaining = str(decision.remaining)
    reset = openai_duration(decision.reset_after)
    return TokensLimited(
        f"Rate limit reached for {_WINDOW_NAMES[decision.window]}{_where(route)}: "
        f"Limit {decision.limit}, Used {decision.used}, Requested {estimate}. "
        f"Please try again in {seconds}s.",
        window=decision.window,
        headers={
            "Retry-After": str(seconds),
            "retry-after-ms": str(math.ceil(wait * 1000)),
            "x-ratelimit-limit-tokens": str(decision.limit),
            "x-ratelimit-remaining-tokens": remaining,
            "x-ratelimit-reset-tokens": reset,
            REMAINING_TOKENS: remaining,
            RESET_TOKENS: reset,
        },
    )


def _where(route: Route | None) -> str:
    if route is not None and route.rate_limit is not None:
        return " to this model" if route.model is not None else " to this endpoint"
    return ""


def rate_limited(decision: Decision, limit: RateLimitSettings, route: Route | None) -> RateLimited:
    """The 429 for a refused request, with the headers OpenAI's SDKs read.

    ``Retry-After`` is whole seconds (RFC 9110 §10.2.3), at least 1, rounded
    up so a client that honours it is never refused again for waiting too
    little; ``retry-after-ms`` is the precise wait, which the SDKs prefer.
    """
    wait = max(decision.retry_after, 0.001)
    seconds = max(1, math.ceil(wait))
    return RateLimited(
        f"Rate limit reached for requests{_where(route)}: limit {limit.burst} requests, "
        "refilled at "
        f"{limit.requests_per_minute:g} per minute. Please try again in {seconds}s.",
        headers={
            "Retry-After": str(seconds),
            "retry-after-ms": str(math.ceil(wait * 1000)),
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
