"""The routing of a Responses API WebSocket (``GET /v1/responses``, Codex
CLI): by the ``model`` of the client's first message, after the upgrade
(README, "Codex CLI").

- The upgrade is answered ``426 Upgrade Required`` at once when no upstream
  has ``responses_websocket: true``: Codex then falls back to HTTP.
- Otherwise the session is routed by the ``model`` of the client's first
  message (a ``response.create`` event: the model at its top level, else
  under ``response``), like a body's ``model``, over the route's upstreams
  that take the Responses WebSocket. An alias's ``rewrite_model`` changes
  only the value's bytes. Later messages go to the same upstream connection;
  each that may be a ``response.create`` is checked (:class:`ResponsesTurns`):
  its model, if it names one, must be allowed to the key and route to the
  same route (an alias is rewritten as in the first); the others pass as
  they came.

outbound/realtime.py then opens the upstream leg and the tunnel, as for a
realtime session (route.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from aiohttp import web

from ..admission.admission import Caller
from ..config.settings import Balance, Route
from ..errors import InvalidRequest, check_model_id, clip
from ..runtime.route_table import Match
from ..runtime.runtime import Runtime
from .json_model import find_json_model, scan_member, skip_whitespace
from .model import FoundModel, ModelAbsent, rewrite_model
from .route import RealtimeTarget, allowed_match, refuse_body

__all__ = [
    "RESPONSES_PATH",
    "ResponsesTurns",
    "check_responses_upgrade",
    "may_create_response",
    "responses_target",
]

RESPONSES_PATH = "responses"


def check_responses_upgrade(request: web.BaseRequest, runtime: Runtime) -> None:
    """Refuse a Responses WebSocket upgrade before it is accepted: ``426`` when no
    upstream takes it (Codex then falls back to HTTP at once; any other refusal
    it retries for seconds)."""
    refuse_body(request)
    if not any(u.responses_websocket for u in runtime.settings.upstreams.values()):
        err = InvalidRequest(
            "No upstream of this proxy takes the Responses API over a WebSocket; "
            "use POST /v1/responses.",
            code="websocket_not_supported",
        )
        err.status = 426
        raise err


def responses_target(
    message: bytes,
    runtime: Runtime,
    caller: Caller,
    *,
    query: str,
    authorization: str | None,
) -> tuple[RealtimeTarget, bytes]:
    """Route a Responses WebSocket by its first ``message``; the target, and the
    message to send upstream (the model's value rewritten for an alias). Raises
    the error to answer (as an ``error`` event)."""
    found = _responses_model(message)
    match = _allowed_match(found.model, runtime, caller)
    route = _websocket_route(match.route, runtime)
    model = found.model
    upstream_model = match.upstream_model
    if upstream_model != model:
        message = rewrite_model(message, found, upstream_model)
    target = RealtimeTarget(route, model, upstream_model, query, authorization, RESPONSES_PATH)
    return target, message


def _allowed_match(model: str, runtime: Runtime, caller: Caller) -> Match:
    """``model``'s match in the table, or the error to answer: no model, an
    unknown one, or one the caller's key may not use."""
    if not model:
        raise ModelAbsent()
    check_model_id(model)
    return allowed_match(model, runtime, caller)


# Bytes a ``response.create`` event cannot lack: its type's value spelled
# out, or an escape (``\u0065``) or a UTF-16/32 encoding hiding it.
_CREATE_MARKS = (b"response.create", b"\\u", b"\x00")


def may_create_response(message: bytes) -> bool:
    """Whether ``message`` may be a ``response.create`` event: its top-level
    ``type`` cannot be that without these bytes (a substring search, not a
    parse; the Responses WebSocket has no other client event)."""
    return any(mark in message for mark in _CREATE_MARKS)


@dataclass(frozen=True, slots=True)
class ResponsesTurns:
    """The check of a Responses WebSocket's later messages (README, "Codex
    CLI"): each ``response.create`` must name a model the key may use that
    routes to the route of the first message, or no model."""

    runtime: Runtime
    caller: Caller
    route: Route  # the first message's

    def check(self, message: bytes) -> bytes | None:
        """None for a message that is no ``response.create`` (it passes as it
        came); else the message to send, the model's value rewritten for an
        alias. Raises the error to answer."""
        if not may_create_response(message):
            return None
        try:
            found = _responses_model(message)
        except ModelAbsent:
            return message  # the connection's model applies
        match = _allowed_match(found.model, self.runtime, self.caller)
        if match.route.index != self.route.index:
            raise InvalidRequest(
                f"This connection is routed by its first message ({self.route.describe()}); "
                f"the model '{clip(found.model)}' is routed elsewhere. Open another "
                "connection for it.",
                code="model_changes_route",
                param="model",
            )
        if match.upstream_model != found.model:
            return rewrite_model(message, found, match.upstream_model)
        return message


def _responses_model(message: bytes) -> FoundModel:
    """The ``model`` of a ``response.create`` event: at its top level, else under
    ``response``, with its byte offsets in ``message``."""
    try:
        found = find_json_model(message)
        if found.model:
            return found
    except ModelAbsent:
        pass
    # None at the top level (or a null or empty one): the one under "response".
    span = _member_span(message, "response")
    if span is None:
        raise ModelAbsent()
    start, end = span
    inner = find_json_model(message[start:end])
    return inner._replace(start=inner.start + start, end=inner.end + start)


def _member_span(message: bytes, key: str) -> tuple[int, int] | None:
    """The byte span of the value of the top-level member ``key`` of a UTF-8
    JSON object when that value is an object, else None (also for invalid
    JSON; the last of a repeated key, as json.loads). One walk over the
    top-level members with the model finder's own scanner; runs once per
    session."""
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError:  # find_json_model took other encodings
        return None
    pos = skip_whitespace(text, 0).end()
    if text[pos : pos + 1] != "{":
        return None
    pos = skip_whitespace(text, pos + 1).end()
    span: tuple[int, int] | None = None
    try:
        while text[pos : pos + 1] == '"':
            name, value, start, pos = scan_member(text, pos)
            if name == key:
                span = (start, pos) if isinstance(value, dict) else None
            pos = skip_whitespace(text, pos).end()
            if text[pos : pos + 1] != ",":
                break
            pos = skip_whitespace(text, pos + 1).end()
    except InvalidRequest:  # invalid below the top level (json_large.py's scan)
        return None
    if span is None or text.isascii():
        return span
    start = len(text[: span[0]].encode())  # code points to bytes
    return start, start + len(text[span[0] : span[1]].encode())


def _websocket_route(route: Route, runtime: Runtime) -> Route:
    """``route`` over its upstreams that take the Responses WebSocket (the
    others are left out of the walk), or the error to answer."""
    plans = runtime.plans
    kept = tuple(n for n in route.upstreams if plans[n].upstream.responses_websocket)
    if kept == route.upstreams:
        return route
    if not kept:
        raise InvalidRequest(
            f"No upstream of the route for this model takes the Responses API over a "
            f"WebSocket ({route.describe()}); use POST /v1/responses.",
            code="websocket_not_supported",
        )
    balance = route.balance
    if balance is not None:
        weights = tuple((n, w) for n, w in balance.weights if n in kept)
        balance = Balance(weights) if len(weights) > 1 else None
    return dataclasses.replace(route, upstreams=kept, balance=balance)
