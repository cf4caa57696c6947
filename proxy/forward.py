"""The hot path: send the request to an upstream and pump the response back.

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
- After the response is prepared, the response is the client's. A failure
  can only abort the client's connection, so no terminating chunk is written
  and the client library raises instead of taking a truncated body as whole
  (Go's ReverseProxy does the same: "all we can do is abort the request").
  No byte the upstream did not send is ever written.
- The client going away cancels the handler (``handler_cancellation=True``);
  the ``finally`` below then closes the upstream connection at once, so an
  abandoned generation stops costing tokens. So does a client that stops
  reading: the connection's send bound (connections.py, ``server.send_timeout``)
  aborts it, and the access log says ``client_stalled``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy, istr

from .bodies import BodyStream
from .connections import client_outcome
from .errors import (
    ProxyError,
    UpstreamAuthFailed,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .health import Health, backoff_delay, order_upstreams
from .observe import OUR_REQUEST_ID_HEADER, Exchange, Observer
from .pipe import BodyPipe
from .runtime import Runtime, UpstreamPlan
from .settings import Route
from .upstream import UpstreamFailure, UpstreamPool, UpstreamResponse

__all__ = ["OUR_REQUEST_ID_HEADER", "Answered", "abort_client", "forward", "relay"]

log = logging.getLogger("oaimux.forward")

_SSE = "text/event-stream"
# Header names made once: a str name would become a new istr per response,
# kept by the response for the life of a stream (issue 8, memory per stream).
_X_REQUEST_ID = istr("x-request-id")
_X_ACCEL_BUFFERING = istr("X-Accel-Buffering")


@dataclass(frozen=True, slots=True)
class Answered:
    """An upstream's response head, ready for :func:`relay`.

    :func:`forward` returns this instead of relaying itself, so that its frame
    (and the caller's, holding the request body) is gone while a stream runs:
    a long stream then holds neither the prompt nor the retry state (memory
    per open stream, issue 8).
    """

    response: UpstreamResponse
    plan: UpstreamPlan
    upload: BodyStream | None  # a streamed request body, still counting bytes


class _Refused(Exception):
    """An upstream answer we will not relay; try the next one."""

    def __init__(self, error: ProxyError, kind: str) -> None:
        super().__init__(kind)
        self.error = error
        self.kind = kind


def abort_client(request: web.BaseRequest) -> None:
    """Close the client's connection without ending the response cleanly.

    The handler then returns the prepared response; aiohttp's ``write_eof`` on a
    closing transport raises ``ConnectionError``, which aiohttp treats as a
    client disconnect: nothing more is written, nothing is logged as an error.
    """
    transport = request.transport
    if transport is not None:
        transport.abort()


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
    last_error: ProxyError | None = None
    previous: str | None = None
    for position, name in enumerate(order):
        plan = plans[name]
        upstream = plan.upstream
        if not health.available(upstream):
            continue  # breaker open (or its one probe is out): skip, don't wait
        if previous is not None:
            observer.fallback(previous, name)
        previous = name
        attempts = upstream.retries.attempts + 1
        try:
            for attempt in range(attempts):
                if attempt:
                    await asyncio.sleep(backoff_delay(upstream.retries.backoff, attempt))
                if last_error is not None and _spent(body):
                    raise last_error  # a streamed body cannot be sent twice
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
                    last_error = refused.error
                    if refused.kind == "timeout":
                        if not route.fallback_on_timeout:
                            # The request was sent whole: the upstream may be
                            # generating already. Another try could run (and
                            # bill) it twice, so only an opted-in route moves on,
                            # and never to the same upstream.
                            raise refused.error from None
                        break
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
                    last_error = UpstreamAuthFailed(
                        f"The upstream '{name}' refused the proxy's credential. "
                        "This is a configuration problem of the proxy, not of your request."
                    )
                    break  # the same key would be refused again
                if status == 429 or status >= 500:
                    health.failure(upstream)
                    # A 429 says "wait": retrying the same upstream at once is
                    # pointless, so it only moves on. A 5xx may be retried.
                    retry_here = status != 429 and attempt + 1 < attempts
                    if not _spent(body) and (
                        retry_here or _another(order, position, plans, health)
                    ):
                        upstream_resp.close()
                        observer.upstream_failure(name, f"status_{status}")
                        last_error = UpstreamUnavailable(
                            f"The upstream '{name}' answered {status}."
                        )
                        if retry_here:
                            continue
                        break
                    # Nothing left to try: the client gets the upstream's own answer.
                else:
                    health.success(upstream)
                ex.tried.pop()
                ex.upstream = name
                upload = body if isinstance(body, BodyStream) else None
                return Answered(upstream_resp, plan, upload)
        except asyncio.CancelledError:
            ex.outcome = "client_gone"
            health.release_probe(upstream)
            raise
        except BaseException:
            health.release_probe(upstream)
            raise
    if last_error is None:
        # Every breaker is open: fail fast, and say when to come back.
        raise health.all_paused(plans[n].upstream for n in route.upstreams)
    raise last_error


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
        raise _Refused(
            UpstreamTimeout(
                f"The upstream '{plan.name}' sent no response headers within "
                f"{timeouts.response:g} seconds."
            ),
            "timeout",
        ) from None
    except UpstreamFailure as failure:
        kind = failure.kind
    # Never include the exception: its repr can carry request headers (our key).
    log.warning(
        "upstream %s failed before responding (%s) [request %s]", plan.name, kind, ex.request_id
    )
    raise _Refused(
        UpstreamUnavailable(f"The upstream '{plan.name}' could not be reached ({kind})."), kind
    )


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


async def relay(
    request: web.Request, answered: Answered, ex: Exchange, observer: Observer
) -> web.StreamResponse:
    """Stream the upstream's response to the client, chunk by chunk, as it arrives.

    A body that arrived whole with its head (most non-stream answers) goes out
    in one write together with the response head.
    """
    upstream_resp, plan = answered.response, answered.plan
    completed = False
    resp: web.StreamResponse | None = None
    try:
        headers = plan.response_headers.build(upstream_resp.headers)
        # The upstream's own x-request-id (OpenAI support asks for it) passes
        # unchanged; ours is always in x-oaimux-request-id, and in x-request-id
        # when the upstream sent none.
        headers[OUR_REQUEST_ID_HEADER] = ex.request_id
        if _X_REQUEST_ID not in headers:
            headers[_X_REQUEST_ID] = ex.request_id
        if ex.budget is not None:  # the proxy's own budgets (README: Token budgets)
            ex.budget.add_headers(headers)
        length = upstream_resp.content_length
        content_type = upstream_resp.headers.get("Content-Type", "")
        ex.streaming = length is None or content_type.startswith(_SSE)
        ex.content_type = content_type
        ex.content_encoding = upstream_resp.headers.get("Content-Encoding")
        content = upstream_resp.content
        whole: bytes | None = None
        if not ex.streaming and content.is_eof() and content.total_bytes == length:
            # (A HEAD answer or a 304 declares a length it does not carry:
            # total_bytes differs, and it takes the general path.)
            whole = content.read_nowait()
        if whole is not None:
            # Its head is held back and written with the body (aiohttp's Response).
            resp = web.Response(
                status=upstream_resp.status, reason=upstream_resp.reason, headers=headers
            )
            resp.body = whole
        else:
            resp = web.StreamResponse(
                status=upstream_resp.status, reason=upstream_resp.reason, headers=headers
            )
            if length is not None:
                resp.content_length = length
        del headers  # copied into the response; not held for the stream's life
        if ex.streaming:
            # Keep an nginx in front from buffering the stream.
            resp.headers[_X_ACCEL_BUFFERING] = "no"
        ex.status = upstream_resp.status
        try:
            await resp.prepare(request)
        except ValueError:
            # aiohttp's writer refuses control characters in a header value that
            # its lenient response parser let through: never relay such a header
            # (reliability.md C.37). Nothing has been written yet.
            log.warning(
                "upstream %s sent a response header that cannot be relayed [request %s]",
                plan.name,
                ex.request_id,
            )
            raise UpstreamUnavailable(
                f"The upstream '{plan.name}' sent a malformed response (bad_response)."
            ) from None
        if whole is not None:
            ex.ttfb = time.perf_counter() - ex.started
            try:
                await resp.write_eof()
            finally:
                ex.bytes_out = len(whole)
                ex.tail = whole
            completed = True
            return resp
        ex.ttfb = time.perf_counter() - ex.started
        # From here on, bound the silence between two body chunks.
        upstream_resp.arm_idle_timeout(plan.upstream.timeouts.idle)
        upstream_resp.forget_head()
        if ex.streaming:
            observer.stream_opened(ex)
        pipe = BodyPipe(upstream_resp, request, resp)
        try:
            failure = await pipe.run()
        finally:
            # Also when the client left mid-body: the log shows what it got.
            ex.bytes_out = pipe.sent
            ex.tail = pipe.tail
            ex.tail_previous = pipe.previous
        if isinstance(failure, aiohttp.SocketTimeoutError):
            ex.outcome = "idle_timeout"
        elif failure is not None:
            ex.outcome = "upstream_reset"  # reset, cut short, or broken framing
        if ex.outcome != "complete":
            log.warning(
                "upstream %s failed mid-body (%s) after %d bytes; aborting the client's "
                "connection [request %s]",
                plan.name,
                ex.outcome,
                pipe.sent,
                ex.request_id,
            )
            abort_client(request)
            return resp
        await resp.write_eof()
        completed = True
        return resp
    except asyncio.CancelledError:
        ex.outcome = client_outcome(request)
        raise
    except ConnectionError:
        # The client's socket closed under a write (it hung up in the same
        # loop turn the answer came in, before aiohttp cancelled this handler).
        # Raising would have aiohttp log a traceback for an ordinary hang-up;
        # returning the prepared response lets its own write_eof meet the
        # closed socket, which it takes quietly as a client disconnect.
        ex.outcome = client_outcome(request)
        if resp is None:
            raise
        return resp
    finally:
        if completed:
            upstream_resp.release()
        else:
            # Close, never pool: the connection is mid-body.
            upstream_resp.close()
