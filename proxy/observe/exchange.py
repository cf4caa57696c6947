"""The record of one request (:class:`Exchange`) and its request id.

The request path fills an :class:`Exchange` in as it goes; the Observer
(observer.py) turns it into one access-log line and into metrics once the
response has ended. The record never holds a body, a header value or a key:
the access log cannot leak what it never saw.

Request ids: the client's ``X-Request-Id`` is kept when it is sane (1-128
characters from a safe set), otherwise the proxy makes one. That id goes to
the upstream as ``X-Request-Id``, into the access log, and back to the client
in ``x-oaimux-request-id`` (always) and in ``x-request-id`` when the upstream
sent none of its own; the upstream's ``x-request-id`` (OpenAI support asks
for it) reaches the client unchanged (README, "Request ids").
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from random import getrandbits as _random_bits
from typing import Literal, get_args

from aiohttp import web
from multidict import istr

from ..errors import ProxyError
from .charge import Charge
from .usage import Usage

__all__ = [
    "CLIENT_CLOSED",
    "EXCHANGE",
    "OUTCOMES",
    "OUR_REQUEST_ID_HEADER",
    "Exchange",
    "Outcome",
    "new_request_id",
    "request_id_for",
]

OUR_REQUEST_ID_HEADER = istr("x-oaimux-request-id")

# How a request ended: the access log's ``outcome`` field, written as it is
# (README, "Access log"); ``upstream_reset`` and ``idle_timeout`` are also a
# ``kind`` of oaimux_upstream_failures_total. A Literal, not an Enum: mypy
# refuses any other string, and the request path keeps plain str (formatted
# and compared at str speed).
Outcome = Literal[
    "complete",  # the response went out whole
    "client_gone",  # the client closed the connection
    "client_stalled",  # the client took no bytes for server.send_timeout; both sides cut
    "upstream_reset",  # the upstream's connection broke mid-body (or its framing did)
    "idle_timeout",  # the upstream went silent for timeouts.idle mid-body
    "error",  # the proxy answered with an error
]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)

# Status logged for a client that left before any response was sent (nginx's 499).
CLIENT_CLOSED = 499

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def request_id_for(request: web.BaseRequest) -> str:
    """The client's X-Request-Id when it is sane (length, characters), else a new one."""
    given = request.headers.get("X-Request-Id")
    if given is not None and _REQUEST_ID.match(given):
        return given
    return new_request_id()


def new_request_id() -> str:
    """A new request id: 32 hex digits."""
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
    outcome: Outcome = "complete"
    error_code: str | None = None
    streaming: bool = False
    stream_open: bool = False
    in_flight: bool = False
    usage: Usage | None = None  # as read from the answer's end (usage.py)
    # What admission charged (charge.py): headers for the answer, and the
    # token reservation reconciled when the answer has ended: the tokens
    # finally charged (None: no reservation, or not reconciled yet).
    charge: Charge | None = None
    charged_tokens: int | None = None
    # The last two response chunks, for the usage object; set after the body ended.
    tail: bytes = b""
    tail_previous: bytes = b""
    # The start of the first chunk of a piped body (an Anthropic stream's
    # message_start carries its input tokens); set after the body ended.
    head: bytes = b""
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
            if self.ttfb is None:  # no response head went out (prepare may have failed)
                self.status = CLIENT_CLOSED
                if self.outcome == "complete":
                    self.outcome = "client_gone"
            # Else the relay has judged how the client left (a stream whose
            # terminal event went out is complete: outbound/relay.py).
        else:
            self.outcome = "error"
            if not self.status:
                self.status = 500


EXCHANGE = web.RequestKey("oaimux_exchange", Exchange)
