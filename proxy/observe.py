"""What one exchange looked like, and where that record goes (access log, metrics).

:class:`Exchange` is filled in along the request path; :class:`Observer`
turns it into one access-log line when the response has *ended* (streams
included, however they ended) and into metrics. Nothing here runs per chunk:
the relay only keeps a reference to the last two chunks, read for the token
usage once the response is over.

Request ids: the client's ``X-Request-Id`` is kept when it is sane (1-128
characters from a safe set), otherwise the proxy makes one. That id goes to
the upstream as ``X-Request-Id``, into the access log, and back to the client
in ``x-oaimux-request-id`` (always) and in ``x-request-id`` when the upstream
sent none of its own; the upstream's ``x-request-id`` (OpenAI support asks
for it) reaches the client unchanged.

The record never holds a body, a header value or a key: the access log
cannot leak what it never saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _encode_string
from random import getrandbits as _random_bits
from typing import TextIO

from aiohttp import web
from multidict import istr

from .budget import Charged
from .errors import ProxyError, TokensLimited, error_response
from .metrics import Metrics
from .settings import LogSettings, Settings
from .usage import Usage, usage_from_tail

__all__ = [
    "EXCHANGE",
    "OUTCOMES",
    "OUR_REQUEST_ID_HEADER",
    "BufferedLineHandler",
    "Exchange",
    "Observer",
    "make_observer",
    "request_id_for",
    "send_access_log_to",
]

access_logger = logging.getLogger("oaimux.access")

OUR_REQUEST_ID_HEADER = istr("x-oaimux-request-id")
OUTCOMES = (
    "complete",
    "client_gone",
    "client_stalled",
    "upstream_reset",
    "idle_timeout",
    "error",
)

# Status logged for a client that left before any response was sent (nginx's 499).
CLIENT_CLOSED = 499

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
# Values written bare in the text format: printable ASCII without space, '"' or '\'.
_BARE = re.compile(r"[!#-\[\]-~]+")
_MAX_LOGGED = 200  # characters of a client-chosen string (path, model) in the log
_SEGMENTS = 1024  # remembered (client, key, method, path, model, target, upstream) parts


def request_id_for(request: web.BaseRequest) -> str:
    """The client's X-Request-Id when it is sane (length, characters), else a new one."""
    given = request.headers.get("X-Request-Id")
    if given is not None and _REQUEST_ID.match(given):
        return given
    # 128 random bits as 32 hex digits, like uuid4().hex (~4 us here) for
    # ~0.25 us (os.urandom's system call alone is ~0.6 us). An id needs to be
    # unique, not unguessable; the random module reseeds in a forked child
    # (--workers), so workers never share a sequence.
    return _random_bits(128).to_bytes(16).hex()


@dataclass(slots=True)
class Exchange:
    """The record of one request. Never holds a body, a header value or a key."""

    request_id: str
    method: str
    path: str
    client: str
    started: float = field(default_factory=time.perf_counter)
    started_wall: float = field(default_factory=time.time)
    key_name: str | None = None
    model: str | None = None  # as the client sent it (logged quoted and clipped)
    upstream_model: str | None = None  # the alias target sent upstream
    route: str | None = None
    # The routing-table entry that matched (exact id, glob, discovered id), the
    # only model value metrics may use; "" before a route matched.
    metric_model: str = ""
    upstream: str | None = None
    tried: list[str] = field(default_factory=list)
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    ttfb: float | None = None
    duration: float | None = None
    outcome: str = "complete"  # one of OUTCOMES
    error_code: str | None = None
    streaming: bool = False
    stream_open: bool = False
    in_flight: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int = 0
    usage: Usage | None = None  # as read, for the token budget's reconciliation
    # What admission charged (budget.py): headers for the answer, and the token
    # reservation reconciled when the answer has ended.
    budget: Charged | None = None
    # The last two response chunks, for the usage object; set after the body ended.
    tail: bytes = b""
    tail_previous: bytes = b""
    content_type: str = ""
    content_encoding: str | None = None

    def failed_before_response(self, exc: BaseException) -> None:
        """Note how a request ended that raised instead of answering."""
        if isinstance(exc, ProxyError):
            self.status = exc.status
            self.error_code = exc.code
            self.outcome = "error"
        elif isinstance(exc, web.HTTPException):
            self.status = exc.status
            self.outcome = "complete" if exc.status < 400 else "error"
        elif isinstance(exc, (asyncio.CancelledError, ConnectionError)):
            if self.outcome == "complete":
                self.outcome = "client_gone"
            if self.ttfb is None:  # no response head went out (prepare may have failed)
                self.status = CLIENT_CLOSED
        else:
            self.outcome = "error"
            if not self.status:
                self.status = 500


EXCHANGE = web.RequestKey("oaimux_exchange", Exchange)


class _AccessRecord(logging.LogRecord):
    """The log record of one access line, made cheaply.

    ``LogRecord.__init__`` (with ``Logger.info`` walking the stack for the
    caller) costs more than the whole line's formatting, once per request;
    an access line has no caller, thread or exception to record, so the
    attributes are copied from a prepared dict (formatters read the instance
    ``__dict__``) and only the message and the time are set.
    Handlers and formatters see an ordinary INFO record of ``oaimux.access``.
    """

    def __init__(self, line: str) -> None:  # no super().__init__(): that is the point
        self.__dict__.update(_RECORD_TEMPLATE)
        self.msg = line
        now = time.time()
        self.created = now
        self.msecs = (now - int(now)) * 1000


# Every attribute LogRecord.__init__ would set, for an access line. No real
# thread, process or source location (0 and "-", so %(process)d still
# formats): the line is about a request, not about code.
_RECORD_TEMPLATE: dict[str, object] = {
    "name": "oaimux.access",
    "args": (),
    "levelname": "INFO",
    "levelno": logging.INFO,
    "pathname": "observe.py",
    "filename": "observe.py",
    "module": "observe",
    "lineno": 0,
    "funcName": "finished",
    "exc_info": None,
    "exc_text": None,
    "stack_info": None,
    "relativeCreated": 0.0,
    "thread": 0,
    "threadName": "-",
    "processName": "-",
    "process": 0,
    "taskName": None,
}


class BufferedLineHandler(logging.Handler):
    """Writes each record's message as one line to ``stream``; the lines of one
    turn of the event loop go out in one write (outside a loop, at once).

    For the access log of a server (serve.py): one write per line was the
    larger part of its cost. A line is written at the latest at the end of
    the loop turn its response ended in, before the next turn's I/O.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(logging.INFO)
        self.stream = stream
        self._lines: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        self.write_line(record.getMessage())

    def write_line(self, line: str) -> None:
        """Queue one line (no newline) for this loop turn's write."""
        self._lines.append(line)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self._flush_turn)

    def _flush_turn(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        with self.lock if self.lock is not None else contextlib.nullcontext():
            if not self._lines:
                return
            lines, self._lines = self._lines, []
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # stderr gone: nowhere left to say so
                pass


def send_access_log_to(stream: TextIO) -> None:
    """Write the access log, and only it, straight to ``stream`` in batches
    (serve.py, after logging is configured and before the app is made).
    Other loggers are not affected."""
    for handler in list(access_logger.handlers):
        access_logger.removeHandler(handler)
    access_logger.addHandler(BufferedLineHandler(stream))
    access_logger.propagate = False


def _direct_sink() -> Callable[[str], None] | None:
    """When the access log goes only to a :class:`BufferedLineHandler` (a server
    after :func:`send_access_log_to`), its line writer: the Observer then skips
    making a log record per request, the largest part of the log's cost."""
    handlers = access_logger.handlers
    if access_logger.propagate or len(handlers) != 1:
        return None
    handler = handlers[0]
    return handler.write_line if isinstance(handler, BufferedLineHandler) else None


View = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
        self.sink = sink  # see _direct_sink; None: through the oaimux.access logger
        self.json = log.format == "json"
        self._second = -1
        self._second_text = ""
        self._segments: dict[tuple[bool | str | None, ...], str] = {}

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
        budget = ex.budget
        reserved = budget is not None and budget.estimate is not None
        if ex.tail and (metrics is not None or logging_on or reserved):
            self._read_usage(ex)
        if reserved:
            assert budget is not None
            self._reconcile(ex, budget)
        if metrics is not None:
            if ex.in_flight:
                metrics.in_flight_now -= 1
                ex.in_flight = False
            if ex.stream_open:
                metrics.open_streams_now -= 1
                ex.stream_open = False
            upstream = ex.upstream or ""
            metrics.request_finished(ex.metric_model, upstream, ex.status, ex.duration, ex.ttfb)
            outcome = ex.outcome
            if outcome != "complete":
                if outcome in ("upstream_reset", "idle_timeout") and ex.upstream is not None:
                    metrics.upstream_failures.labels(upstream, outcome).inc()
                elif outcome == "client_stalled":
                    metrics.client_stalls.labels(upstream).inc()
            if ex.prompt_tokens is not None or ex.completion_tokens is not None:
                metrics.count_tokens(
                    ex.metric_model,
                    upstream,
                    ex.key_name or "",
                    ex.prompt_tokens,
                    ex.completion_tokens,
                    ex.cached_tokens,
                )
        if logging_on:
            line = self.format_json(ex) if self.json else self.format_text(ex)
            if self.sink is not None:
                self.sink(line)
            else:
                access_logger.handle(_AccessRecord(line))

    def _read_usage(self, ex: Exchange) -> None:
        if not 200 <= ex.status < 300 or ex.content_encoding not in (None, "identity"):
            return
        content_type = ex.content_type
        if not (content_type.startswith("text/event-stream") or "json" in content_type):
            return
        usage = usage_from_tail(ex.tail_previous, ex.tail)
        ex.tail = ex.tail_previous = b""  # the chunks are no longer needed
        if usage is not None:
            ex.usage = usage
            ex.prompt_tokens, ex.completion_tokens, ex.cached_tokens = usage

    def _reconcile(self, ex: Exchange, budget: Charged) -> None:
        """The answer has ended: settle its token reservation (budget.py)."""
        outcome = ex.outcome
        # Nothing was generated when the proxy answered with an error of its
        # own (but a response timeout: the upstream may be generating still),
        # or when the upstream answered whole with an error status.
        produced = not (
            (outcome == "error" and ex.error_code != "upstream_timeout")
            or (outcome == "complete" and ex.status >= 400)
        )
        kept = budget.reconcile(ex.usage, produced)
        metrics = self.metrics
        if metrics is None:
            return
        key = ex.key_name or ""
        if kept:
            reason = "no_usage" if outcome == "complete" else "cut_short"
            metrics.tokens_unreconciled.labels(key, ex.metric_model, reason).inc()
        tokens = budget.tokens
        if tokens is not None and not tokens.allowed:  # passed only as enforce is false
            metrics.token_limit_not_enforced.labels(key, ex.metric_model, tokens.window).inc()

    # -- the access-log line

    def _time(self, wall: float) -> str:
        second = int(wall)
        if second != self._second:  # strftime once per second, not per request
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((wall - second) * 1000):03d}Z"

    def _who(self, ex: Exchange, as_json: bool) -> str:
        """The line's middle: client, key, method, path, model, target, upstream.

        These repeat from request to request, so each combination is escaped
        and joined once and then looked up (at most ``_SEGMENTS`` are kept).
        """
        key = (
            as_json, ex.client, ex.key_name, ex.method, ex.path, ex.model, ex.upstream_model,
            ex.upstream,
        )  # fmt: skip
        segment = self._segments.get(key)
        if segment is None:
            if as_json:
                segment = (
                    f'"client":{_json(ex.client)},"key":{_json(ex.key_name)}'
                    f',"method":"{ex.method}","path":{_json(ex.path)}'
                    f',"model":{_json(ex.model)},"target":{_json(ex.upstream_model)}'
                    f',"upstream":{_json(ex.upstream)}'
                )
            else:
                segment = (
                    f"client={_text(ex.client)} key={_text(ex.key_name)} method={ex.method}"
                    f" path={_text(ex.path)} model={_text(ex.model)}"
                    f" target={_text(ex.upstream_model)} upstream={_text(ex.upstream)}"
                )
            if len(self._segments) >= _SEGMENTS:
                self._segments.clear()  # bounded: clients choose paths and models
            self._segments[key] = segment
        return segment

    def format_text(self, ex: Exchange) -> str:
        """One ``key=value`` line (logfmt); client-chosen strings are quoted when needed."""
        ttfb = "-" if ex.ttfb is None else f"{ex.ttfb * 1000:.2f}"
        duration = "-" if ex.duration is None else f"{ex.duration * 1000:.2f}"
        reserved, charged = _tokens_charged(ex)
        return (
            f"time={self._time(ex.started_wall)} request_id={ex.request_id}"
            f" {self._who(ex, False)} tried={','.join(ex.tried) or '-'}"
            f" status={ex.status} bytes_in={ex.bytes_in} bytes_out={ex.bytes_out}"
            f" ttfb_ms={ttfb} duration_ms={duration} outcome={ex.outcome}"
            f" error={ex.error_code or '-'}"
            f" prompt_tokens={_num(ex.prompt_tokens)}"
            f" completion_tokens={_num(ex.completion_tokens)}"
            f" reserved_tokens={_num(reserved)} charged_tokens={_num(charged)}"
        )

    def format_json(self, ex: Exchange) -> str:
        """One JSON object per line, same fields as the text format (``null`` for none).

        Written out by hand: ``json.dumps`` of a dict costs twice as much, and
        every value here is a number, ``null``, or a string :func:`_json`
        escapes.
        """
        ttfb = "null" if ex.ttfb is None else f"{ex.ttfb * 1000:.2f}"
        duration = "null" if ex.duration is None else f"{ex.duration * 1000:.2f}"
        tried = ",".join(_json(name) for name in ex.tried)
        reserved, charged = _tokens_charged(ex)
        return (
            # request_id (vetted), method (an HTTP token) and outcome never need escaping.
            f'{{"time":"{self._time(ex.started_wall)}","request_id":"{ex.request_id}"'
            f',{self._who(ex, True)},"tried":[{tried}],"status":{ex.status}'
            f',"bytes_in":{ex.bytes_in},"bytes_out":{ex.bytes_out}'
            f',"ttfb_ms":{ttfb},"duration_ms":{duration},"outcome":"{ex.outcome}"'
            f',"error":{_json(ex.error_code)},"prompt_tokens":{_json_int(ex.prompt_tokens)}'
            f',"completion_tokens":{_json_int(ex.completion_tokens)}'
            f',"reserved_tokens":{_json_int(reserved)},"charged_tokens":{_json_int(charged)}}}'
        )

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

    # -- the proxy's own endpoints

    def observed(self, view: View) -> View:
        """Wrap one of the proxy's own views (``/v1/models``, ``/about``) so it is
        logged and counted like a proxied request. The view may fill in the
        caller through ``request[EXCHANGE]``."""

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
                    ex.failed_before_response(err)
                    if err.status == 429:
                        self.rate_limited(ex)
                    resp = error_response(err)
                ex.status = resp.status
                body = resp.body if isinstance(resp, web.Response) else None
                if isinstance(body, bytes):
                    ex.bytes_out = len(body)
                resp.headers[OUR_REQUEST_ID_HEADER] = ex.request_id
                resp.headers.setdefault("x-request-id", ex.request_id)
                if ex.budget is not None:
                    ex.budget.add_headers(resp.headers)
                return resp
            except BaseException as exc:
                ex.failed_before_response(exc)
                raise
            finally:
                self.finished(ex)

        return observed_view


def _text(value: str | None) -> str:
    if value is None:
        return "-"
    if len(value) <= _MAX_LOGGED and _BARE.fullmatch(value):
        return value
    # Quote (JSON string rules): no space, quote or newline can forge a field.
    return _encode_string(_clip(value))


def _json(value: str | None) -> str:
    if value is None:
        return "null"
    # The json module's own C string encoder: quotes, escapes, ASCII only.
    return _encode_string(_clip(value))


def _clip(value: str) -> str:
    return value if len(value) <= _MAX_LOGGED else value[:_MAX_LOGGED] + "..."


def _tokens_charged(ex: Exchange) -> tuple[int | None, int | None]:
    """The access log's reserved and charged tokens (``None``: no token budget)."""
    budget = ex.budget
    if budget is None:
        return None, None
    return budget.estimate, budget.charged_tokens


def _json_int(value: int | None) -> str:
    return "null" if value is None else str(value)


def _num(value: int | None) -> str:
    return "-" if value is None else str(value)


def make_observer(settings: Settings) -> Observer:
    """The observer for ``settings``: the access log, and metrics unless disabled."""
    metrics = Metrics(settings.upstreams) if settings.metrics.enabled else None
    return Observer(settings.log, metrics, _direct_sink())
