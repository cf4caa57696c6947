"""A routed request, as handed to outbound/; and the routing of a realtime
WebSocket handshake (``GET /v1/realtime?model=...``).

HTTP requests are routed in handlers.py, into an :class:`Outbound`. A realtime
handshake is routed here, into a :class:`RealtimeTarget`:

- The request is routed by its ``model`` query parameter, like a body's
  ``model``: unknown ids are refused with the OpenAI-shaped 404 *before* the
  upgrade, an alias's ``rewrite_model`` (or a discovered id's prefix) is applied
  to the query value, and every other byte of the query is forwarded as it
  came. With no ``model`` the path routes apply (``- path: "realtime*"``).
- Proxy keys and the rate limit apply as to any request (handlers.py charges
  the handshake once it is routed); outbound/realtime.py then opens the
  upstream leg and the tunnel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import quote, unquote

from aiohttp import web
from multidict import CIMultiDictProxy

from ..admission.admission import Caller
from ..admission.proxy_keys import KeyTable
from ..config.settings import Route
from ..errors import InvalidRequest, ModelNotAllowed, check_model_id, clip, model_not_found
from ..runtime.runtime import Runtime
from .body import BodyBytes, BodyStream

__all__ = [
    "REALTIME_PATH",
    "Outbound",
    "RealtimeTarget",
    "client_authorization",
    "is_websocket_upgrade",
    "realtime_target",
]

REALTIME_PATH = "realtime"


class Outbound(NamedTuple):
    """A routed request: all that outbound/forward.py needs to send it, so that
    nothing after routing reaches back into the client's request.

    A named tuple, not a frozen dataclass: made once per request, and a frozen
    dataclass's ``__init__`` sets each field through ``object.__setattr__``
    (docs/decisions.md, "The upstream walk costs little per request").
    """

    method: str
    route: Route
    path: str  # after /v1/, still percent-encoded, vetted
    query: str  # as it came, credential parameters dropped
    headers: CIMultiDictProxy[str]  # the client's (without Content-Encoding after a rewrite)
    body: BodyBytes | BodyStream  # read whole (re-sent on a retry), or streamed through
    client_authorization: str | None  # see client_authorization()


def client_authorization(request: web.BaseRequest, runtime: Runtime) -> str | None:
    """The client's Authorization, for upstreams with pass_client_auth; never a proxy key."""
    if runtime.keyed:
        return None
    return request.headers.get("Authorization")


@dataclass(frozen=True, slots=True)
class RealtimeTarget:
    """Where a realtime handshake goes: the route, and the query to send upstream."""

    route: Route
    model: str | None
    upstream_model: str | None
    query: str
    client_authorization: str | None  # see client_authorization()


def is_websocket_upgrade(request: web.BaseRequest) -> bool:
    """A ``GET`` asking to switch to WebSocket (RFC 6455 §4.1); the rest is checked later."""
    return request.method == "GET" and request.headers.get("Upgrade", "").strip().lower() == (
        "websocket"
    )


def realtime_target(
    request: web.BaseRequest,
    runtime: Runtime,
    caller: Caller,
    *,
    query: str,
    query_models: Sequence[str],
) -> RealtimeTarget:
    """Resolve the handshake's route from ``?model=``, or raise the error to answer.

    ``query`` is the vetted query (credential parameters removed) and
    ``query_models`` the ``model`` values in it (handlers.vet_query); more
    than one was already refused.
    """
    if request.body_exists:
        # A body on an upgrade request is a smuggling attempt (CVE-2026-69243).
        raise InvalidRequest("A WebSocket handshake must not have a body.", code="body_not_allowed")
    model = query_models[0] if query_models else ""
    check_model_id(model)
    if not model:
        route = runtime.table.resolve_path(REALTIME_PATH)
        if route is None:
            raise InvalidRequest(
                "You must provide a model parameter: /v1/realtime?model=<id>.",
                code="missing_model",
                param="model",
            )
        return RealtimeTarget(route, None, None, query, client_authorization(request, runtime))
    match = runtime.table.resolve(model)
    if match is None:
        raise model_not_found(model)
    if not KeyTable.allows(caller.key, model):
        raise ModelNotAllowed(f"Your key may not use the model '{clip(model)}'.", param="model")
    upstream_model = match.upstream_model
    if upstream_model != model:
        query = _with_model(query, upstream_model)
    authorization = client_authorization(request, runtime)
    return RealtimeTarget(match.route, model, upstream_model, query, authorization)


def _with_model(query: str, model: str) -> str:
    """``query`` with the value of its ``model`` parameter replaced; the rest as it came."""
    value = quote(model, safe="/:@-._~")  # ';' and '&' encoded: no second reading
    parts = query.split("&")
    for i, part in enumerate(parts):
        name = part.partition("=")[0]
        # The same reading of a name as handlers.vet_query's.
        if unquote(name.replace("+", " ")).lower() == "model":
            parts[i] = f"{name}={value}"
    return "&".join(parts)
