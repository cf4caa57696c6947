"""Who is asking, and may they: client identity, proxy keys, the rate limit.

Every request except ``GET /healthz`` and ``GET /metrics`` passes here once,
and is charged to exactly one ``rate_limit`` block (:func:`choose_limit`):

- the route's own ``rate_limit`` when the request matched a route that has
  one: buckets per client *and* route, separate from the client's general
  ones (an expensive model gets its own, usually smaller, budget);
- otherwise the key's own ``rate_limit`` when the caller's proxy key has one;
- otherwise the global ``rate_limit`` (no limit at all when there is none).

The block's request bucket gives one token. When the block has a token budget
and the request is one that produces tokens (a model request, whose body was
read), its estimated tokens are reserved in the same atomic step
(:func:`estimate_tokens`; README: Token budgets), and reconciled when its
answer ends (budget.py).

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
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from ..config.settings import AuthKey, Limits, Route, Settings, TokenBudget
from ..errors import ServiceUnavailable
from ..observe.failurelog import TEN_MINUTES, FailureLog
from .buckets import RateLimiter, Reserved, StorageUnavailable
from .buckets_memory import MemoryRateLimiter
from .budget import Charged, Reservation, reservation
from .clientip import limit_key
from .refusals import rate_limited, tokens_limited
from .token_buckets import TokenDecision, TokenState, token_decision

# A Charged made from a tuple of its fields, without the NamedTuple's generated
# __new__ (a Python frame per charged request); a Reservation without a frame
# at all (its slots filled in by charge_now).
_new_charged = tuple.__new__
_new_reservation = object.__new__

__all__ = [
    "Admission",
    "Caller",
    "Priced",
    "choose_limit",
    "counts_tokens",
    "estimate_tokens",
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
) -> tuple[Limits, str] | None:
    """The one block this request is charged to, and its buckets' key.

    ``None`` when no limit applies. The route's bucket is named by the route's
    selector (``model gpt-4*``), which survives a reload that reorders routes.
    """
    if route is not None and route.rate_limit is not None:
        return route.rate_limit, f"{caller.bucket}|route:{route.describe()}"
    if caller.key is not None and caller.key.rate_limit is not None:
        return caller.key.rate_limit, f"{caller.bucket}|key"
    if settings.rate_limit is not None:
        if caller.key is None:
            return settings.rate_limit, _global_key(caller.address)
        return settings.rate_limit, f"{caller.bucket}|global"
    return None


@lru_cache(maxsize=8192)
def _global_key(address: str) -> str:
    """The global bucket's key of a caller without a proxy key, made once per
    address (bounded, as inbound/head.py's anonymous callers: an IPv6
    address is parsed for its /64)."""
    return f"ip:{limit_key(address)}|global"


class Priced(Protocol):
    """A model request, which can say what it may reserve (inbound/route.py's
    ``ModelRoute``). Asked only when the request's block has a token budget."""

    def estimate(self, budget: TokenBudget) -> int:
        """The tokens to reserve for it under ``budget`` (:func:`estimate_tokens`)."""
        ...


def counts_tokens(settings: Settings, caller: Caller) -> bool:
    """Whether the block a request is charged to when no route has a limit of
    its own (the caller's key's, else the global one) has a token budget: then
    the request is charged once its body is read (its estimate needs the body)."""
    key = caller.key
    limits = settings.rate_limit if key is None or key.rate_limit is None else key.rate_limit
    return limits is not None and limits.tokens is not None


def estimate_tokens(prompt_bytes: int, output_cap: int | None, budget: TokenBudget) -> int:
    """The tokens reserved for a request: its prompt as ``ceil(bytes / 4)`` (no
    tokenizer on the hot path) and its output cap (``None``: none given), else
    the default, the output part never above ``max_output_reservation``."""
    output = budget.default_output_tokens if output_cap is None else output_cap
    ceiling = budget.output_ceiling
    return -(-prompt_bytes // 4) + (output if output < ceiling else ceiling)


class Admission:
    """Charges requests to buckets in ``storage``; owns it and its failure policy.

    When the storage raises :class:`StorageUnavailable`, the request is let
    through (``on_storage_error: open``, the default) or refused with 503
    ``rate_limiter_unavailable`` (``closed``). Either way the outage is logged
    when it starts, when its reason changes and every ``warn_every`` seconds
    (10 minutes) while it lasts, with the number of requests affected; not once
    per request. Recovery is logged once (observe/failurelog.py).

    ``memory``: the storage when it is this process's memory, which answers
    at once (:meth:`charge_now`); else ``None``.
    """

    memory: MemoryRateLimiter | None

    def __init__(
        self,
        storage: RateLimiter,
        *,
        warn_every: float = TEN_MINUTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.storage = storage
        self._outage = FailureLog(log, "rate-limit storage", every=warn_every, clock=clock)
        self._warn_every = warn_every
        self._clock = clock
        self._shadowed = 0  # requests let through by enforce: false, since the last line
        self._next_shadow_line = 0.0

    @property
    def storage(self) -> RateLimiter:
        return self._storage

    @storage.setter
    def storage(self, storage: RateLimiter) -> None:
        self._storage = storage
        # A store in this process answers at once: requests are charged by
        # charge_now, with no coroutine (one per request otherwise).
        self.memory = storage if type(storage) is MemoryRateLimiter else None

    def start(self) -> None:
        self.storage.start()

    async def close(self) -> None:
        await self.storage.close()

    async def charge(
        self,
        settings: Settings,
        caller: Caller,
        route: Route | None,
        model: Priced | None = None,
    ) -> Charged | Reservation | None:
        """Charge this request: one token of its block's request bucket, and, for
        a model request (``model``) under a token budget, its estimated tokens.

        Returns what was charged (``None``: no limit applies, or the storage is
        down and the policy is open), or raises :class:`RateLimited` /
        :class:`TokensLimited` (or :class:`ServiceUnavailable` when the storage
        is down and the policy is closed). With the buckets in memory this is
        :meth:`charge_now`, which callers on the request path call directly."""
        if self.memory is not None:
            return self.charge_now(settings, caller, route, model)
        chosen = choose_limit(settings, caller, route)
        if chosen is None:
            return None
        limits, key = chosen
        requests, budget = limits.requests, limits.tokens
        try:
            if budget is None or model is None:
                if requests is None:
                    return None
                decision = await self.storage.acquire(key, requests)
                reserved = None
            else:
                estimate = model.estimate(budget)
                reserved = await self.storage.reserve(key, requests, budget, estimate)
        except StorageUnavailable as exc:
            self._storage_failed(exc, settings.rate_limit_fail_open)  # raises when closed
            return None
        if self._outage.failing:
            self._outage.recovered()
        if reserved is None:
            if not decision[0]:  # (Decision.allowed)
                assert requests is not None  # a request decision comes from a request bucket
                raise rate_limited(decision, requests, route)
            return _new_charged(Charged, (decision, None, 0, None, None))
        return self._reserved(reserved, limits, estimate, key, caller, route)

    def charge_now(
        self,
        settings: Settings,
        caller: Caller,
        route: Route | None,
        model: Priced | None = None,
    ) -> Charged | Reservation | None:
        """:meth:`charge` with the buckets in memory (:attr:`memory` is set):
        nothing to await, nothing to fail."""
        chosen = choose_limit(settings, caller, route)
        if chosen is None:
            return None
        limits, key = chosen
        requests, budget = limits.requests, limits.tokens
        memory = self.memory
        assert memory is not None
        if budget is None or model is None:
            if requests is None:
                return None
            decision = memory.acquire_now(key, requests)
            if not decision[0]:  # (Decision.allowed)
                raise rate_limited(decision, requests, route)
            return _new_charged(Charged, (decision, None, 0, None, None))
        estimate = model.estimate(budget)
        if requests is None:  # tokens alone: the usual reservation in one call
            state = memory.take_tokens_now(key, budget, estimate)
            if state is not None:  # (budget.reservation, its slots filled in here)
                made = _new_reservation(Reservation)
                made.budget = budget
                made.estimate = estimate
                made.state = state
                made.storage = memory
                made.key = key
                return made
        reserved = memory.reserve_now(key, requests, budget, estimate)
        return self._reserved(reserved, limits, estimate, key, caller, route)

    def _reserved(
        self,
        reserved: Reserved,
        limits: Limits,
        estimate: int,
        key: str,
        caller: Caller,
        route: Route | None,
    ) -> Charged:
        """What a reservation under ``limits`` charged (the store's answer,
        ``reserved``); raises when its request bucket or a token window had no
        room (see :meth:`_over_budget`)."""
        decision, _, _, owed_m, owed_d, fits, state = reserved
        if decision is not None and not decision[0]:  # (Decision.allowed)
            assert limits.requests is not None  # a request decision comes from a request bucket
            raise rate_limited(decision, limits.requests, route)
        budget = limits.tokens
        assert budget is not None  # a reservation is made only under a token budget
        shadowed = None if fits else self._over_budget(reserved, budget, estimate, caller, route)
        if state is None:  # from Redis: its figures, in a state of their own
            state = TokenState(owed_m, owed_d, 0, budget)
        made = reservation(budget, estimate, state, self.storage, key)
        return _new_charged(Charged, (decision, budget, estimate, made, shadowed))

    def _over_budget(
        self,
        reserved: Reserved,
        budget: TokenBudget,
        estimate: int,
        caller: Caller,
        route: Route | None,
    ) -> str:
        """A reservation a token window had no room for: refused (429), or, with
        ``enforce: false``, let through and noted as shadowed (the window that
        would have refused it is returned)."""
        _, before_m, before_d, after_m, after_d, _, _ = reserved
        cap_m, cap_d = budget.cap_minute, budget.cap_day
        costs = (estimate if estimate < cap_m else cap_m, estimate if estimate < cap_d else cap_d)
        tokens = token_decision(budget, (before_m, before_d), (after_m, after_d), costs, False)
        if budget.enforce:
            raise tokens_limited(tokens, estimate, route)
        self._would_refuse(caller, tokens)
        return tokens.window

    def _would_refuse(self, caller: Caller, tokens: TokenDecision) -> None:
        """``enforce: false``: a request a token budget would have refused passed.
        Logged once per ``warn_every`` seconds with the count since the last line
        (the metrics count each one; observe/observer.py)."""
        self._shadowed += 1
        now = self._clock()
        if now < self._next_shadow_line:
            return
        self._next_shadow_line = now + self._warn_every
        log.info(
            "token budget not enforced (enforce: false): %d request(s) passed that it "
            "would have refused since the last line; the latest: client %s, tokens per "
            "%s, limit %d",
            self._shadowed,
            caller.bucket,
            tokens.window,
            tokens.limit,
        )
        self._shadowed = 0

    def _storage_failed(self, exc: StorageUnavailable, fail_open: bool) -> None:
        """The storage is down: logged (see the class docstring); with
        ``on_storage_error: closed``, the request is refused with 503."""
        self._outage.failed(
            f"unavailable ({exc}); failing "
            + ("open: requests pass unlimited" if fail_open else "closed: requests get 503")
        )
        if not fail_open:
            raise ServiceUnavailable(
                "The rate limiter's storage is unreachable, so requests are refused; "
                "try again shortly.",
                code="rate_limiter_unavailable",
                headers={"Retry-After": "1"},
            ) from None
