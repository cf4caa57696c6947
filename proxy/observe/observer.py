"""The Observer: what the request path reports, turned into the access log and metrics.

An :class:`Observer` receives each :class:`~.exchange.Exchange` at the
moments that matter (begun, stream opened, finished, refused) and the
events of an upstream walk (failure, fallback, breaker change). When the
response has *ended* (streams included, however they ended) it writes one
access-log line (access_log.py) and counts the request in the metrics
(metrics.py). Nothing here runs per chunk: the relay only keeps a
reference to the last two chunks, read for the token usage (usage.py) once
the response is over.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from .. import SERVER
from ..config.settings import LogSettings, Settings
from ..errors import ProxyError, TokensLimited, error_response, from_http_exception
from .access_log import AccessLines, AccessRecord, access_logger, direct_sink
from .charge import Charge
from .exchange import EXCHANGE, OUR_REQUEST_ID_HEADER, Exchange, Outcome, request_id_for
from .metrics import Metrics
from .usage import billable_tokens, usage_from_stream, usage_from_tail

__all__ = ["Observer", "View", "make_observer"]

# Outcomes of an upstream that broke off mid-body: also counted as its failure
# (typed, so a misspelt name fails mypy rather than never matching).
_UPSTREAM_CUT: tuple[Outcome, ...] = ("upstream_reset", "idle_timeout")

View = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger("oaimux")


def _produced(ex: Exchange) -> bool:
    """Whether an upstream may have produced tokens for ``ex``'s answer: not
    when the proxy answered with an error of its own (but a response timeout:
    the upstream may be generating still), nor when the upstream answered
    whole with an error status."""
    outcome = ex.outcome
    return not (
        (outcome == "error" and ex.error_code != "upstream_timeout")
        or (outcome == "complete" and ex.status >= 400)
    )


class Observer:
    """Receives exchanges: writes the access log and keeps the metrics.

    ``metrics`` is ``None`` when ``metrics.enabled`` is false; then the hooks
    only log. Every method is cheap and never raises into the request.
    """

    def __init__(
        self,
        log: LogSettings,
        metrics: Metrics | None = None,
        sink: Callable[[str], None] | None = None,
    ) -> None:
        self.log = log
        self.metrics = metrics
        self.sink = sink  # see direct_sink; None: through the oaimux.access logger
        self.lines = AccessLines()
        # Chosen once: the line's format is fixed for the observer's life.
        self.format_line = (
            self.lines.format_json if log.format == "json" else self.lines.format_text
        )

    # -- the life of one request

    def begin(self, ex: Exchange) -> None:
        """A request started being handled (counts it in flight)."""
        if self.metrics is not None:
            self.metrics.in_flight_now += 1
            ex.in_flight = True

    def stream_opened(self, ex: Exchange) -> None:
        """A streamed response's headers were sent; its body is being relayed."""
        if self.metrics is not None:
            self.metrics.open_streams_now += 1
            ex.stream_open = True

    def finished(self, ex: Exchange) -> None:
        """The response has ended (or never started): log it once, count it once."""
        ex.duration = time.perf_counter() - ex.started
        metrics = self.metrics
        logging_on = self.log.access and access_logger.isEnabledFor(logging.INFO)
        charge = ex.charge
        reserved = charge is not None and charge.budget is not None
        if ex.tail and (metrics is not None or logging_on or reserved):
            self._read_usage(ex)
        if reserved:
            assert charge is not None
            self._reconcile(ex, charge)
        if metrics is not None:
            if ex.in_flight:
                metrics.in_flight_now -= 1
                ex.in_flight = False
            if ex.stream_open:
                metrics.open_streams_now -= 1
                ex.stream_open = False
            upstream = ex.upstream or ""
            metrics.request_finished(ex.metric_model, upstream, ex.status, ex.duration, ex.ttfb)
            if ex.error_code is not None:
                metrics.count_error(ex.status, ex.error_code)
            outcome = ex.outcome
            if outcome in _UPSTREAM_CUT and ex.upstream is not None:
                metrics.upstream_failures.labels(upstream, outcome).inc()
            elif outcome == "client_stalled":
                metrics.client_stalls.labels(upstream).inc()
            if ex.usage is not None:
                metrics.count_tokens(ex.metric_model, upstream, ex.key_name or "", ex.usage)
        if logging_on:
            line = self.format_line(ex)
            if self.sink is not None:
                self.sink(line)
            else:
                access_logger.handle(AccessRecord(line))

    def _read_usage(self, ex: Exchange) -> None:
        if not 200 <= ex.status < 300 or ex.content_encoding not in (None, "identity"):
            return
        content_type = ex.content_type
        if "json" in content_type:
            ex.usage = usage_from_tail(ex.tail_previous, ex.tail)
        elif content_type.startswith("text/event-stream"):
            ex.usage = usage_from_stream(ex.head, ex.tail_previous, ex.tail)

    def _reconcile(self, ex: Exchange, charge: Charge) -> None:
        """The answer has ended: settle its token reservation (charge.py) to
        the tokens its usage bills (README, "Token budgets"); with no usage,
        keep it when an upstream may have produced tokens, else refund it."""
        metrics = self.metrics
        if metrics is not None and charge.shadowed is not None:  # passed as enforce is false
            metrics.token_limit_not_enforced.labels(
                ex.key_name or "", ex.metric_model, charge.shadowed
            ).inc()
        usage = ex.usage
        billable = None if usage is None else billable_tokens(usage)
        if billable is None:
            if _produced(ex):  # kept, for want of a count
                ex.charged_tokens = charge.estimate
                if metrics is not None:
                    reason = "no_usage" if ex.outcome == "complete" else "cut_short"
                    labels = (ex.key_name or "", ex.metric_model, reason)
                    metrics.tokens_unreconciled.labels(*labels).inc()
                return
            billable = 0
        charge.reconcile(billable)
        ex.charged_tokens = billable

    def refused(self, ex: Exchange, err: ProxyError, bytes_out: int) -> None:
        """A request the server refused before any view ran (the HTTP parser,
        the header deadline, ``Expect``), answered with ``err``."""
        ex.status = err.status
        ex.error_code = err.code
        ex.outcome = "error"
        ex.bytes_out = bytes_out
        self.finished(ex)

    # -- hooks called from admission, forward and health

    def rate_limited(self, ex: Exchange, err: ProxyError | None = None) -> None:
        """A request refused by the limiter (``err``: the refusal, when at hand)."""
        if self.metrics is not None:
            self.metrics.rate_limited_total.labels(ex.metric_model).inc()
            if isinstance(err, TokensLimited):
                self.metrics.token_limited.labels(
                    ex.key_name or "", ex.metric_model, err.window
                ).inc()

    def upstream_failure(self, upstream: str, kind: str) -> None:
        """An attempt at ``upstream`` failed before any response byte."""
        if self.metrics is not None:
            self.metrics.upstream_failures.labels(upstream, kind).inc()

    def fallback(self, from_upstream: str, to_upstream: str) -> None:
        """A request moved on from one upstream to the next."""
        if self.metrics is not None:
            self.metrics.fallbacks.labels(from_upstream, to_upstream).inc()

    def breaker_changed(self, upstream: str, state: str) -> None:
        """A circuit breaker changed state."""
        if self.metrics is not None:
            self.metrics.set_breaker(upstream, state)

    # -- answers the proxy makes up

    def render_error(self, err: ProxyError, ex: Exchange) -> web.Response:
        """The answer to ``err`` (in the dialect of the request's path) with the request id in
        ``x-oaimux-request-id`` and ``x-request-id``, noted on ``ex`` (status,
        code, bytes) and counted (a 429 as rate limited)."""
        ex.failed_before_response(err)
        resp = error_response(err, ex.path)
        resp.headers[OUR_REQUEST_ID_HEADER] = ex.request_id
        resp.headers["x-request-id"] = ex.request_id
        body = resp.body
        if isinstance(body, bytes):
            ex.bytes_out = len(body)
        if ex.charge is not None:  # the proxy's own budgets (README: Token budgets)
            ex.charge.add_headers(resp.headers)
        if err.status == 429:
            self.rate_limited(ex, err)
        return resp

    def render_failure(self, exc: Exception, ex: Exchange) -> web.Response:
        """The error boundary: the answer to ``exc``, which is not a
        :class:`ProxyError` (those go to :meth:`render_error`) and which a view
        raised before it answered, noted on ``ex``. An aiohttp ``HTTPException``
        of 400 or more becomes our error JSON (in the dialect of the request's
        path); any other exception is logged once, with its traceback, and
        answered 500, never shown to the client. What is not an error to
        answer is raised again: an ``HTTPException`` below 400 (aiohttp sends
        it as the response), a client that went away, a timeout.

        Call it from the view's ``except`` block (the log line takes the
        traceback from there). Each view holds the boundary, not a middleware,
        so that aiohttp runs no middleware chain per request (docs/decisions.md,
        "The error boundary is in the views").
        """
        ex.failed_before_response(exc)
        if isinstance(exc, web.HTTPException):
            if exc.status < 400:
                raise exc
            return error_response(from_http_exception(exc), ex.path)
        if isinstance(exc, ConnectionError | TimeoutError):
            raise exc
        log.exception("unexpected error handling %s %s", ex.method, ex.path[:200])
        return error_response(ProxyError("The proxy failed to handle the request."), ex.path)

    # -- the proxy's own endpoints

    def observed(self, view: View) -> View:
        """Wrap one of the proxy's own views (``/v1/models``, ``/about``) so it is
        logged and counted like a proxied request, its errors answered as ours
        (:meth:`render_failure`) and its answer named ``Server: oaimux``. The
        view may fill in the caller through ``request[EXCHANGE]``."""

        async def observed_view(request: web.Request) -> web.StreamResponse:
            ex = Exchange(
                request_id=request_id_for(request),
                method=request.method,
                # Never the query string: it can carry a key (?api-key=...).
                path=request.raw_path.partition("?")[0][:512],
                client="-",
            )
            request[EXCHANGE] = ex
            self.begin(ex)
            try:
                try:
                    resp = await view(request)
                except ProxyError as err:
                    return self.render_error(err, ex)
                except Exception as exc:  # noqa: BLE001 - the boundary; see render_failure
                    return self.render_failure(exc, ex)
                ex.status = resp.status
                resp.headers["Server"] = SERVER
                body = resp.body if isinstance(resp, web.Response) else None
                if isinstance(body, bytes):
                    ex.bytes_out = len(body)
                resp.headers[OUR_REQUEST_ID_HEADER] = ex.request_id
                resp.headers.setdefault("x-request-id", ex.request_id)
                if ex.charge is not None:
                    ex.charge.add_headers(resp.headers)
                return resp
            except BaseException as exc:  # cancelled: the client went away
                ex.failed_before_response(exc)
                raise
            finally:
                self.finished(ex)

        return observed_view


def make_observer(settings: Settings) -> Observer:
    """The observer for ``settings``: the access log, and metrics unless disabled."""
    metrics = Metrics(settings.upstreams) if settings.metrics.enabled else None
    return Observer(settings.log, metrics, direct_sink())
