"""The hot path: send the request to an upstream until one answers.

Contract of :func:`forward`:

- Before the client's response is prepared, every failure becomes a
  :class:`~proxy.errors.ProxyError` (rendered as OpenAI JSON by the middleware).
  Upstreams are tried in the route's order (fallback list, or weighted
  balance then the rest), skipping those whose circuit breaker is open
  (health.py); when all are open the answer is 503 with ``Retry-After``.
- An upstream is retried (``retries.attempts``, jittered backoff) or left for
  the next only on a failure before any response byte reached the client:
  cannot connect (refused, connect timeout, reset, disconnected, garbage
  instead of HTTP) and 5xx are retried, then moved on from; a 429 or the
  proxy's own credential refused moves on at once. The body is re-sent from
  memory, the same bytes each time. A response timeout (no headers in time)
  is never retried, and moves on only when the route sets
  ``fallback_on_timeout``: the upstream may be generating already, and a
  second try could run and bill the request twice. A 429/5xx from the last
  upstream with nothing left to try is relayed to the client as it came.
  Otherwise the error that ends the walk says what happened at each upstream,
  in order (attempts.py), and the server log gets the same words once.
- The answer is relayed by relay.py, once this frame is gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDictProxy

from ..bodies import BodyStream
from ..config.settings import Route
from ..observe import Exchange
from ..observe.observer import Observer
from ..runtime import Runtime, UpstreamPlan
from ..upstream import UpstreamFailure, UpstreamPool, UpstreamResponse
from .attempts import CIRCUIT_OPEN, Attempts, Ending, answered, no_headers_within
from .health import Health, backoff_delay, order_upstreams

__all__ = ["Answered", "forward"]

log = logging.getLogger("oaimux.forward")


@dataclass(frozen=True, slots=True)
class Answered:
    """An upstream's response head, ready for :func:`relay`.

    :func:`forward` returns this instead of relaying itself, so that its frame
    (and the caller's, holding the request body) is gone while a stream runs:
    a long stream then holds neither the prompt nor the retry state
    (docs/decisions.md, "A stream holds neither the request body nor the retry
    state").
    """

    response: UpstreamResponse
    plan: UpstreamPlan
    upload: BodyStream | None  # a streamed request body, still counting bytes


class _Refused(Exception):
    """An attempt that got no response: ``kind`` for the metrics, ``what`` in
    words (attempts.py)."""

    def __init__(self, kind: str, what: str) -> None:
        super().__init__(kind)
        self.kind = kind
        self.what = what


async def forward(
    request: web.Request,
    inbound: CIMultiDictProxy[str],
    runtime: Runtime,
    route: Route,
    path: str,
    query_string: str,
    body: bytes | bytearray | BodyStream,
    ex: Exchange,
    client_authorization: str | None,
    pool: UpstreamPool,
    health: Health,
    observer: Observer,
) -> Answered:
    """Send one request along ``route`` until an upstream answers (see the module
    docstring for the contract); the caller relays the answer with :func:`relay`.

    ``body`` is the whole request body, already read (bounded by
    ``max_body_bytes``): every attempt re-sends these same bytes. Or it is a
    :class:`~proxy.bodies.BodyStream` (large path-routed uploads): sent as it
    arrives, so once a byte of it went out there is no retry and no fallback;
    a failure the stream blames on the client is answered as the client's.
    """
    order = order_upstreams(route.upstreams, route.balance)
    plans = runtime.plans
    # Made at the first failure or skip: nothing is noted for a first-try answer.
    attempts: Attempts | None = None
    ending: Ending | None = None  # set once an attempt failed
    previous: str | None = None
    for position, name in enumerate(order):
        plan = plans[name]
        upstream = plan.upstream
        if not health.available(upstream):
            # Breaker open (or its one probe is out): skip, don't wait.
            attempts = attempts or Attempts()
            attempts.note(name, CIRCUIT_OPEN)
            continue
        if previous is not None:
            observer.fallback(previous, name)
        previous = name
        tries = upstream.retries.attempts + 1
        try:
            for attempt in range(tries):
                if attempt:
                    await asyncio.sleep(backoff_delay(upstream.retries.backoff, attempt))
                if ending is not None and attempts is not None and _spent(body):
                    # A streamed body cannot be sent twice.
                    raise attempts.error(ending, ex.request_id)
                ex.tried.append(name)
                try:
                    upstream_resp = await _open(
                        request.method,
                        inbound,
                        plan,
                        path,
                        query_string,
                        body,
                        ex,
                        client_authorization,
                        pool,
                    )
                except _Refused as refused:
                    if isinstance(body, BodyStream) and body.failure is not None:
                        raise body.failure from None  # the client's fault, not the upstream's
                    health.failure(upstream)
                    observer.upstream_failure(name, refused.kind)
                    attempts = attempts or Attempts()
                    attempts.note(name, refused.what)
                    if refused.kind == "timeout":
                        ending = Ending.TIMEOUT
                        if not route.fallback_on_timeout:
                            # The request was sent whole: the upstream may be
                            # generating already. Another try could run (and
                            # bill) it twice, so only an opted-in route moves on,
                            # and never to the same upstream.
                            raise attempts.error(ending, ex.request_id) from None
                        break
                    ending = Ending.UNAVAILABLE
                    continue
                status = upstream_resp.status
                if (
                    status in (401, 403)
                    and upstream.injects_credential
                    and not upstream.pass_client_auth
                ):
                    _log_auth_failure(upstream_resp, name)
                    health.failure(upstream)
                    observer.upstream_failure(name, "auth")
                    attempts = attempts or Attempts()
                    attempts.note(name, answered(status, credential_refused=True))
                    ending = Ending.CREDENTIAL_REFUSED
                    break  # the same key would be refused again
                if status == 429 or status >= 500:
                    health.failure(upstream)
                    # A 429 says "wait": retrying the same upstream at once is
                    # pointless, so it only moves on. A 5xx may be retried.
                    retry_here = status != 429 and attempt + 1 < tries
                    if not _spent(body) and (
                        retry_here or _another(order, position, plans, health)
                    ):
                        upstream_resp.close()
                        observer.upstream_failure(name, f"status_{status}")
                        attempts = attempts or Attempts()
                        attempts.note(name, answered(status))
                        ending = Ending.UNAVAILABLE
                        if retry_here:
                            continue
                        break
                    # Nothing left to try: the client gets the upstream's own answer.
                else:
                    health.success(upstream)
                ex.tried.pop()
                ex.upstream = name
                if attempts is not None and attempts.failed:
                    log.warning(
                        "answered by %s after: %s [request %s]",
                        name,
                        attempts.summary(),
                        ex.request_id,
                    )
                upload = body if isinstance(body, BodyStream) else None
                return Answered(upstream_resp, plan, upload)
        except asyncio.CancelledError:
            ex.outcome = "client_gone"
            health.release_probe(upstream)
            raise
        except BaseException:
            health.release_probe(upstream)
            raise
    if ending is None or attempts is None:
        # Every breaker is open: fail fast, and say when to come back.
        raise health.all_paused(plans[n].upstream for n in route.upstreams)
    raise attempts.error(ending, ex.request_id)


def _spent(body: bytes | bytearray | BodyStream) -> bool:
    """Has a streamed body begun to go out (so it cannot be sent again)?"""
    return isinstance(body, BodyStream) and body.started


def _another(
    order: Sequence[str], position: int, plans: Mapping[str, UpstreamPlan], health: Health
) -> bool:
    """Is there an upstream after ``position`` whose breaker would let a request in?"""
    for name in order[position + 1 :]:
        if health.could_try(plans[name].upstream):
            return True
    return False


async def _open(
    method: str,
    inbound: CIMultiDictProxy[str],
    plan: UpstreamPlan,
    path: str,
    query_string: str,
    body: bytes | bytearray | BodyStream,
    ex: Exchange,
    client_authorization: str | None,
    pool: UpstreamPool,
) -> UpstreamResponse:
    """Send the request; return the upstream's response once its headers are in.

    The response timeout runs from the start of the attempt (connecting
    included) to the response headers; the upstream's ``connect`` timeout
    bounds the connection set-up alone. There is no total: a long body is
    never cut.
    """
    headers = plan.request_headers.build(inbound, ex.request_id, client_authorization)
    timeouts = plan.upstream.timeouts
    length = body.length if isinstance(body, BodyStream) else None
    try:
        return await pool.request(
            plan.origin,
            method,
            plan.target_for(path, query_string),
            headers,
            body,
            length,
            timeouts.connect,
            timeouts.response,
        )
    except TimeoutError:
        raise _Refused("timeout", no_headers_within(timeouts.response)) from None
    except UpstreamFailure as failure:
        # Its words, never the exception's repr: that can carry request headers (our key).
        raise _Refused(failure.kind, failure.detail) from None


def _log_auth_failure(upstream_resp: UpstreamResponse, name: str) -> None:
    """Log that an upstream refused our credential, without its body (which can
    quote part of the key), then drop the response."""
    log.error(
        "upstream %s answered %d to the proxy's own credential; check its key "
        "(response body withheld: it can quote the key)",
        name,
        upstream_resp.status,
    )
    upstream_resp.close()
