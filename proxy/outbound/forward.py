"""The hot path: send the request to an upstream until one answers.

Contract of :meth:`Forwarder.forward`:

- Before the client's response is prepared, every failure becomes a
  :class:`~proxy.errors.ProxyError` (rendered as OpenAI JSON by the middleware).
  Upstreams are tried in the route's order (fallback list, or weighted
  balance then the rest), skipping those whose circuit breaker is open
  (health.py); when all are open the answer is 503 with ``Retry-After``.
  The walk itself (order, breakers, retries and their backoff, the error
  left at the end) is attempts.py's, shared with the realtime handshake;
  which failure is worth another try, and which answer is the client's, is
  HTTP's and decided here.
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
- The body is an :class:`~proxy.inbound.body.BodyStream` for large path-routed
  uploads: sent as it arrives, so once a byte of it went out there is no
  retry and no fallback, and a failure the stream blames on the client is
  answered as the client's.
- The answer is relayed by relay.py, once this frame is gone.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from ..client import UpstreamFailure, UpstreamPool, UpstreamResponse
from ..inbound.body import BodyStream
from ..inbound.route import Outbound
from ..observe import Exchange
from ..observe.observer import Observer
from ..runtime.runtime import Runtime, UpstreamPlan
from .attempts import Attempts, Ending, answered, no_headers_within
from .health import Health

__all__ = ["Answered", "Forwarder"]

log = logging.getLogger("oaimux.forward")


@dataclass(frozen=True, slots=True)
class Answered:
    """An upstream's response head, ready for relay.py.

    :meth:`Forwarder.forward` returns this instead of relaying itself, so that
    its frame (and the caller's, holding the request body) is gone while a
    stream runs: a long stream then holds neither the prompt nor the retry
    state (docs/decisions.md, "A stream holds neither the request body nor the
    retry state").
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


class Forwarder:
    """Sends routed requests to their upstreams; one per app (Go's
    ``ReverseProxy{Transport, ErrorHandler}``): the pooled client, the
    breakers and the observer are its own, a call carries only the request."""

    __slots__ = ("_health", "_observer", "_pool")

    def __init__(self, pool: UpstreamPool, health: Health, observer: Observer) -> None:
        self._pool = pool
        self._health = health
        self._observer = observer

    async def forward(self, outbound: Outbound, runtime: Runtime, ex: Exchange) -> Answered:
        """Send ``outbound`` along its route until an upstream answers (see the
        module docstring for the contract); relay.py relays the answer."""
        attempts = Attempts(ex, self._health, self._observer)
        body = outbound.body
        for plan in attempts.walk(outbound.route, runtime):
            try:
                if attempts.delay:  # a retry of the same upstream
                    await asyncio.sleep(attempts.delay)
                if attempts.ending is not None and _spent(body):
                    # Something failed, and a streamed body cannot be sent twice.
                    raise attempts.exhausted()
                attempts.start(plan)
                response = await self._open(plan, outbound, ex)
            except _Refused as refused:
                if isinstance(body, BodyStream) and body.failure is not None:
                    attempts.abandon(plan, body.failure)
                    raise body.failure from None  # the client's fault, not the upstream's
                fallback_on_timeout = outbound.route.fallback_on_timeout
                _no_response(refused, plan, attempts, fallback_on_timeout=fallback_on_timeout)
                continue
            except BaseException as exc:
                attempts.abandon(plan, exc)
                raise
            if response.status < 400:  # the common case first
                attempts.answered_by(plan)
            elif not _answers_client(response, plan, attempts, spent=_spent(body)):
                continue
            return Answered(response, plan, body if isinstance(body, BodyStream) else None)
        raise attempts.exhausted()

    async def _open(self, plan: UpstreamPlan, outbound: Outbound, ex: Exchange) -> UpstreamResponse:
        """Send the request; return the upstream's response once its headers are in.

        The response timeout runs from the start of the attempt (connecting
        included) to the response headers; the upstream's ``connect`` timeout
        bounds the connection set-up alone. There is no total: a long body is
        never cut.
        """
        headers = plan.request_headers.build(
            outbound.headers, ex.request_id, outbound.client_authorization
        )
        body = outbound.body
        length = body.length if isinstance(body, BodyStream) else None
        destination = plan.destination
        try:
            return await self._pool.request(
                destination,
                outbound.method,
                plan.target_for(outbound.path, outbound.query),
                headers,
                body,
                length,
            )
        except TimeoutError:
            raise _Refused("timeout", no_headers_within(destination.response_timeout)) from None
        except UpstreamFailure as failure:
            # Its words, never the exception's repr: that can carry request headers (our key).
            raise _Refused(failure.kind, failure.detail) from None


def _spent(body: bytes | bytearray | BodyStream) -> bool:
    """Has a streamed body begun to go out (so it cannot be sent again)?"""
    return isinstance(body, BodyStream) and body.started


def _no_response(
    refused: _Refused, plan: UpstreamPlan, attempts: Attempts, *, fallback_on_timeout: bool
) -> None:
    """Note an attempt that got no response: the walk tries the upstream again
    (its retries allowing) or moves on; after a response timeout it moves on
    only where the route allows it, else this raises the walk's error."""
    if refused.kind != "timeout":
        attempts.failed(plan, refused.kind, refused.what, ending=Ending.UNAVAILABLE, again=True)
        return
    attempts.failed(plan, refused.kind, refused.what, ending=Ending.TIMEOUT)
    if not fallback_on_timeout:
        # The request was sent whole: the upstream may be generating already.
        # Another try could run (and bill) it twice, so only an opted-in route
        # moves on, and never to the same upstream.
        raise attempts.exhausted() from None


def _answers_client(
    response: UpstreamResponse, plan: UpstreamPlan, attempts: Attempts, *, spent: bool
) -> bool:
    """Is this 4xx or 5xx the client's answer? If not, it is noted and dropped,
    and the walk tries the upstream again or moves on."""
    status = response.status
    if attempts.refuses_credential(plan, status):
        _log_auth_failure(response, plan.name)
        attempts.credential_refused(plan, status)
        return False  # the same key would be refused again
    if status != 429 and status < 500:
        attempts.answered_by(plan)
        return True
    # A 429 says "wait": retrying the same upstream at once is pointless, so
    # it only moves on. A 5xx may be retried.
    again = status != 429 and attempts.may_retry(plan)
    if not spent and (again or attempts.another_after(plan)):
        what = answered(status)
        attempts.failed(plan, f"status_{status}", what, ending=Ending.UNAVAILABLE, again=again)
        response.close()
        return False
    # Nothing left to try: the client gets the upstream's own answer.
    attempts.answered_by(plan, healthy=False)
    return True


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
