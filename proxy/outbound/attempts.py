"""The walk over a route's upstreams, and what happened at each, in words an
operator can act on.

:class:`Attempts` is the one fallback walk: the HTTP forward (forward.py) and
the WebSocket handshake (upstream_leg.py) both go through it. It notes every
attempt that did not end in an answer, in order, as
``<upstream>: <what happened>``::

    openai: answered 401 (credential refused); local: connection refused at 127.0.0.1:11434

and the error that ends a walk (``upstream_unavailable``, ``upstream_timeout``,
``upstream_auth_failed``) carries that list in its message; the server log
gets it once, as a warning. The words come from fixed phrases, upstream names,
status codes, configured timeouts, and the host and port the proxy connected
to (neither is a secret); never a header value, a key, a URL's path or query,
or an upstream's response body. The words for an upstream that gave no
response (refused, reset, not HTTP, ...) are the client's
(proxy/client/failures.py); those here are the walk's own.
"""

from __future__ import annotations

import asyncio
import logging
from enum import Enum

from ..config.settings import Route
from ..errors import (
    ProxyError,
    RateLimited,
    UpstreamAuthFailed,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..observe import Exchange
from ..observe.observer import Observer
from ..runtime.runtime import Runtime, UpstreamPlan
from .health import Health, backoff_delay, order_upstreams

__all__ = ["CIRCUIT_OPEN", "Attempts", "Ending", "answered", "no_headers_within"]

log = logging.getLogger("oaimux.upstream")

CIRCUIT_OPEN = "circuit open"


def answered(status: int, credential_refused: bool = False) -> str:
    return f"answered {status} (credential refused)" if credential_refused else f"answered {status}"


def no_headers_within(seconds: float) -> str:
    return f"no response headers within {seconds:g} s"


class Ending(Enum):
    """How a walk that found no answer ends: the error it answers with."""

    UNAVAILABLE = "unavailable"  # 502 upstream_unavailable
    TIMEOUT = "timeout"  # 504 upstream_timeout
    CREDENTIAL_REFUSED = "credential_refused"  # 502 upstream_auth_failed
    HANDSHAKE_REFUSED = "handshake_refused"  # 502 upstream_refused_handshake (realtime)
    HANDSHAKE_RATE_LIMITED = "handshake_rate_limited"  # 429 upstream_rate_limited (realtime)


class Attempts:
    """One request's walk over its route's upstreams (README, "Choosing an
    upstream"), for the HTTP forward and the realtime handshake alike.

    :meth:`walk` gives the tries, in the route's order (a fallback list, or a
    weighted draw then the rest): each upstream whose circuit breaker lets a
    request in (the others are skipped, and noted), reporting each move to a
    next one; and the same upstream again after ``failed(..., again=True)``
    while its ``retries.attempts`` allow, after :attr:`delay` (jittered
    backoff), which the caller waits out. For every try the caller tells the
    walk how it went: :meth:`start`, then :meth:`failed` (the walk moves on,
    or tries again), :meth:`answered_by` (the answer is the client's),
    :meth:`healthy` or :meth:`abandon`. When the walk runs out,
    :meth:`exhausted` is the error to raise: 503 when every breaker was open,
    otherwise what happened at each upstream, in order.

    Made per request, and most requests end at the first try: nothing is
    noted, and no list is made, until something failed or was skipped.
    """

    __slots__ = (
        "_again",
        "_current",
        "_health",
        "_last_failed",
        "_next",
        "_notes",
        "_observer",
        "_order",
        "_plans",
        "_route",
        "_tries",
        "delay",
        "ending",
        "ex",
    )
    # Set by __next__: tries of the current upstream so far, and the wait
    # before the try it gives (a retry's backoff; 0 for an upstream's first).
    _tries: int
    delay: float

    def __init__(self, ex: Exchange, health: Health, observer: Observer) -> None:
        self.ex = ex
        self._health = health
        self._observer = observer
        # What happened, in order; None until something failed or was skipped
        # (_last_failed is set with it).
        self._notes: list[tuple[str, str]] | None = None
        # How the walk ends if nothing answers; None while nothing failed.
        self.ending: Ending | None = None

    def walk(self, route: Route, runtime: Runtime) -> Attempts:
        """Iterate over the tries of ``route``'s upstreams, in order."""
        self._route = route
        self._plans = runtime.plans
        self._order = order_upstreams(route.upstreams, route.balance)
        self._next = 0
        self._current: UpstreamPlan | None = None
        self._again = False
        return self

    def __iter__(self) -> Attempts:
        return self

    def __next__(self) -> UpstreamPlan:
        # An iterator of its own rather than a generator: a request answered
        # at the first try leaves the walk unfinished, and closing a suspended
        # generator raises GeneratorExit into it (docs/decisions.md, "The
        # upstream walk costs little per request").
        current = self._current
        if self._again and current is not None:
            self._again = False
            retries = current.upstream.retries
            if self._tries <= retries.attempts:
                self.delay = backoff_delay(retries.backoff, self._tries)
                return current
        self.delay = 0.0
        order = self._order
        position = self._next
        while position < len(order):
            name = order[position]
            position += 1
            plan = self._plans[name]
            if not self._health.available(plan.upstream):
                # Breaker open (or its one probe is out): skip, don't wait.
                self._note(name, CIRCUIT_OPEN)
                continue
            if current is not None:
                self._observer.fallback(current.upstream.name, name)
            self._current = plan
            self._tries = 0
            self._next = position
            return plan
        self._next = position
        raise StopIteration

    def start(self, plan: UpstreamPlan) -> None:
        """A try of ``plan`` begins: the access log's ``tried`` names every try,
        a retried upstream twice; the one that answers is taken off again."""
        self._tries += 1
        self.ex.tried.append(plan.upstream.name)

    def may_retry(self, plan: UpstreamPlan) -> bool:
        """Would ``failed(..., again=True)`` try ``plan`` again (its retries allow)?"""
        return self._tries <= plan.upstream.retries.attempts

    def another_after(self, plan: UpstreamPlan) -> bool:
        """Is there an upstream after ``plan`` whose breaker would let a request
        in (claiming nothing)?"""
        plans, health, order = self._plans, self._health, self._order
        # A route names an upstream once (the configuration refuses it twice).
        for name in order[order.index(plan.upstream.name) + 1 :]:
            if health.could_try(plans[name].upstream):
                return True
        return False

    @staticmethod
    def refuses_credential(plan: UpstreamPlan, status: int) -> bool:
        """Is ``status`` the upstream refusing the proxy's own credential? Not when
        the client's credential went instead (``pass_client_auth``): that refusal
        is the client's answer. The same key would be refused again, so the walk
        moves on at once."""
        upstream = plan.upstream
        return (
            status in (401, 403) and upstream.injects_credential and not upstream.pass_client_auth
        )

    def credential_refused(self, plan: UpstreamPlan, status: int) -> None:
        """``plan``'s upstream refused the proxy's credential (after
        :meth:`refuses_credential`)."""
        what = answered(status, credential_refused=True)
        self.failed(plan, "auth", what, ending=Ending.CREDENTIAL_REFUSED)

    def failed(
        self, plan: UpstreamPlan, kind: str, what: str, *, ending: Ending, again: bool = False
    ) -> None:
        """A try of ``plan`` failed: ``kind`` for the metrics, ``what`` in words,
        ``ending`` the error if nothing answers after it. ``again``: a failure
        worth another try of the same upstream, if its retries allow; else the
        walk moves on."""
        self._health.failure(plan.upstream)
        self._observer.upstream_failure(plan.name, kind)
        self._note(plan.name, what)
        self.ending = ending
        self._again = again

    def healthy(self, plan: UpstreamPlan) -> None:
        """``plan``'s upstream answered for itself (its answer, even a refusal of
        this request, says nothing against it): close its breaker."""
        self._health.success(plan.upstream)

    def answered_by(self, plan: UpstreamPlan, *, healthy: bool = True) -> None:
        """``plan``'s answer is the client's. ``healthy=False``: a 429 or 5xx relayed
        as it came because nothing was left to try, which still counts against
        the upstream's breaker."""
        upstream = plan.upstream
        if healthy:
            self._health.success(upstream)
        else:
            self._health.failure(upstream)
        ex = self.ex
        ex.tried.pop()
        ex.upstream = upstream.name
        if self._notes is not None and self._last_failed is not None:
            log.warning(
                "answered by %s after: %s [request %s]",
                upstream.name,
                self._summary(),
                ex.request_id,
            )

    def abandon(self, plan: UpstreamPlan, exc: BaseException) -> None:
        """The try of ``plan`` ended without a verdict (``exc``: the client left, or a
        bug): free its breaker's probe, if it held it."""
        if isinstance(exc, asyncio.CancelledError):
            self.ex.outcome = "client_gone"
        self._health.release_probe(plan.upstream)

    def exhausted(self) -> ProxyError:
        """The error that ends a walk that found no answer: every breaker open
        (503, fail fast and say when to come back), or what happened at each
        upstream, in order; the same words go to the server log, once."""
        ending = self.ending
        if ending is None:
            plans = self._plans
            return self._health.all_paused(plans[n].upstream for n in self._route.upstreams)
        return self._error(ending)

    def _note(self, upstream: str, what: str) -> None:
        if self._notes is None:
            self._notes = []
            # The upstream whose attempt failed last (skips aside); None: only skips.
            self._last_failed: str | None = None
        self._notes.append((upstream, what))
        if what != CIRCUIT_OPEN:
            self._last_failed = upstream

    def _summary(self) -> str:
        """``a: what; b: what``; a retry that ended the same way is counted, not repeated."""
        parts: list[str] = []
        previous: tuple[str, str] | None = None
        times = 0
        for note in [*(self._notes or ()), None]:
            if note == previous:
                times += 1
                continue
            if previous is not None:
                text = f"{previous[0]}: {previous[1]}"
                parts.append(f"{text} ({times} tries)" if times > 1 else text)
            previous, times = note, 1
        return "; ".join(parts)

    def _error(self, ending: Ending) -> ProxyError:
        summary = self._summary()
        log.warning("no upstream answered: %s [request %s]", summary, self.ex.request_id)
        if ending is Ending.TIMEOUT:
            return UpstreamTimeout(f"No upstream answered in time: {summary}.")
        if ending is Ending.CREDENTIAL_REFUSED:
            return UpstreamAuthFailed(
                f"The upstream '{self._last_failed}' refused the proxy's credential: a "
                f"configuration problem of the proxy, not of your request. Tried: {summary}."
            )
        if ending is Ending.HANDSHAKE_RATE_LIMITED:
            return RateLimited(
                f"No upstream accepted the WebSocket handshake: {summary}.",
                code="upstream_rate_limited",
            )
        if ending is Ending.HANDSHAKE_REFUSED:
            return UpstreamUnavailable(
                f"No upstream accepted the WebSocket handshake: {summary}.",
                code="upstream_refused_handshake",
            )
        return UpstreamUnavailable(f"No upstream could answer: {summary}.")
