"""Where a request goes: its route, chosen (:func:`choose_route`), and the
routed request outbound/ takes (:func:`prepare`, an :class:`Outbound`).

Three kinds of request, each routed its own way:

- a POST to one of :data:`MODEL_PATHS` is routed by the ``model`` its body
  names (a JSON key or a form field; README, "Endpoints"), or by its path when
  it names none: a :class:`ModelRoute`, holding the body as read;
- a realtime WebSocket handshake (``GET /v1/realtime?model=...``) is routed by
  its ``model`` query parameter, like a body's ``model``: unknown ids are
  refused with the OpenAI-shaped 404 *before* the upgrade, an alias's
  ``rewrite_model`` (or a discovered id's prefix) is applied to the query
  value, and every other byte of the query is forwarded as it came. With no
  ``model`` the path routes apply (``- path: "realtime*"``). A
  :class:`RealtimeTarget`; outbound/realtime.py opens the upstream leg and
  the tunnel;
- any other request is routed by its path: a :class:`PathRoute`, its body read
  (or streamed) only once the route is known.

Proxy keys and the rate limit apply as to any request: server/views.py charges
the request once it is routed, or on the error that ends it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import quote

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from ..admission.admission import Caller, estimate_tokens
from ..admission.proxy_keys import KeyTable
from ..config.settings import Route, TokenBudget
from ..errors import (
    InvalidRequest,
    MethodNotAllowed,
    ModelNotAllowed,
    NotFound,
    ProxyError,
    check_model_id,
    clip,
    model_not_allowed,
    model_not_found,
)
from ..observe import Exchange
from ..runtime.query import query_param_name
from ..runtime.route_table import Match
from ..runtime.runtime import Runtime
from .body import (
    BodyBytes,
    BodyStream,
    ModelBody,
    model_body,
    read_body,
    read_form_head,
    read_path_body,
    stream_form_rest,
    streamable_form,
)
from .head import Target, vet_model
from .model import ModelAbsent, rewrite_model
from .routable import body_if_whole

__all__ = [
    "MODEL_FORM_PATHS",
    "MODEL_JSON_PATHS",
    "MODEL_PATHS",
    "REALTIME_PATH",
    "TOKENLESS_PATHS",
    "ModelRoute",
    "Outbound",
    "PathRoute",
    "RealtimeTarget",
    "allowed_match",
    "choose_route",
    "client_authorization",
    "is_websocket_upgrade",
    "prepare",
    "prepare_path",
    "priced",
    "realtime_target",
    "refuse_body",
]

# The one table of model-routed paths (after /v1/): a POST to one of these is
# routed by the body's top-level "model" (JSON) ...
MODEL_JSON_PATHS = frozenset(
    {
        "chat/completions",
        "completions",
        "embeddings",
        "audio/speech",
        "images/generations",
        "moderations",
        "responses",
        # Anthropic's Messages API (README, "Coding agents"): the same routing.
        "messages",
        "messages/count_tokens",
    }
)
# ... or by the "model" form field (multipart/form-data; JSON is accepted too).
MODEL_FORM_PATHS = frozenset(
    {"audio/transcriptions", "audio/translations", "images/edits", "images/variations"}
)
MODEL_PATHS = MODEL_JSON_PATHS | MODEL_FORM_PATHS
# Model-routed paths that generate no tokens: a token budget charges them only
# a request (README, "Token budgets").
TOKENLESS_PATHS = frozenset({"messages/count_tokens"})

REALTIME_PATH = "realtime"


@dataclass(slots=True)
class ModelRoute:
    """A request routed by the model its body names (or by path, naming none).

    This and :class:`PathRoute` are slotted, not frozen, as
    :class:`~proxy.inbound.head.Target` is; never changed after.
    """

    route: Route
    upstream_model: str | None  # what the upstream is sent; None: the body names no model
    read: ModelBody  # the body as read to route it

    def estimate(self, budget: TokenBudget) -> int:
        """The tokens a token budget reserves for this request: its prompt's
        bytes (a form's files are not text: none) and its output cap."""
        read = self.read
        found = read.found
        if found is None:
            return estimate_tokens(len(read.routable), None, budget)
        prompt_bytes = len(read.routable) if found.json_value else 0
        return estimate_tokens(prompt_bytes, found.output_cap, budget)


def priced(chosen: ModelRoute | PathRoute | RealtimeTarget, target: Target) -> ModelRoute | None:
    """A model request a token budget reserves for (none on ``TOKENLESS_PATHS``)."""
    if isinstance(chosen, ModelRoute) and target.path not in TOKENLESS_PATHS:
        return chosen
    return None


@dataclass(slots=True)
class PathRoute:
    """A request routed by its path; its body is still unread."""

    route: Route


@dataclass(frozen=True, slots=True)
class RealtimeTarget:
    """Where a WebSocket session goes: the route, and the path and query to
    send upstream (realtime, or the Responses API's: responses_route.py)."""

    route: Route
    model: str | None
    upstream_model: str | None
    query: str
    client_authorization: str | None  # see client_authorization()
    path: str = REALTIME_PATH


class Outbound(NamedTuple):
    """A routed request: all that outbound/forward.py needs to send it, so that
    nothing after routing reaches back into the client's request.

    Named tuples, not frozen dataclasses, here: each is made once per request,
    and a frozen dataclass's ``__init__`` sets each field through
    ``object.__setattr__`` (docs/decisions.md, "The upstream walk costs little
    per request").
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


async def choose_route(
    request: web.Request,
    target: Target,
    caller: Caller,
    *,
    runtime: Runtime,
    ex: Exchange,
    cap: bool = False,
) -> ModelRoute | PathRoute | RealtimeTarget:
    """The request's route, or the error to answer (no route is known then:
    the request is charged to the caller's general bucket). ``cap``: the
    request may be charged tokens, so its output cap is read too.

    One coroutine, the body's read awaited here: each coroutine layer would
    be one more frame per request (docs/decisions.md, "The upstream walk costs
    little per request"); the model is judged by :func:`allowed_match`, a
    plain call.
    """
    path = target.path
    if path in MODEL_PATHS and request.method == "POST":
        server = runtime.settings.server
        boundary = streamable_form(request)
        if boundary is None:
            whole = body_if_whole(request, server)  # no coroutine, most of the time
            body = whole if whole is not None else await read_body(request, server)
            read = model_body(request, body, server, cap)
        else:
            read = await read_form_head(request, boundary, server)
        ex.bytes_in = len(read.body)
        found = read.found
        if found is None:
            # No model at all (a stored prompt names its own, and OpenAI makes
            # it optional on moderations and images): routed by path.
            return ModelRoute(_route_without_model(runtime, caller, path), None, read)
        vet_model(found.model)
        ex.model = found.model
        match = allowed_match(found.model, runtime, caller, ex)
        ex.upstream_model = match.upstream_model
        return ModelRoute(match.route, match.upstream_model, read)
    if path == REALTIME_PATH and is_websocket_upgrade(request):
        # Routed by ?model= (README, "Realtime (WebSocket)").
        realtime = realtime_target(request, target, caller, runtime=runtime, ex=ex)
        ex.model, ex.upstream_model = realtime.model, realtime.upstream_model
        ex.metric_model = realtime.route.model or realtime.model or ""
        return realtime
    route = runtime.table.resolve_path(path)
    if route is None:
        raise _no_route(request.method, target)
    return PathRoute(route)


def _route_without_model(runtime: Runtime, caller: Caller, path: str) -> Route:
    """The route of a model-routed request whose body names no model: the path
    routes, then the default route, as for a model-less path; else ``missing_model``."""
    route = runtime.table.resolve_path(path)
    if route is None:
        raise ModelAbsent()
    if caller.key is not None and caller.key.models is not None:
        # The upstream would pick its own default model, which the key's list
        # could not have allowed.
        raise ModelNotAllowed("this key must name a model", param="model")
    return route


def _no_route(method: str, target: Target) -> ProxyError:
    """The error for a request no route serves: 405 on a path that is served with
    another method (a model path takes POST; the proxy answers GET on its model
    list), else 404."""
    path = target.path
    if path in MODEL_PATHS:
        return MethodNotAllowed(
            f"{method} is not allowed on /v1/{path}; use POST.", headers={"Allow": "POST"}
        )
    if path == "models" or (path.startswith("models/") and len(path) > len("models/")):
        return MethodNotAllowed(
            f"{method} is not allowed on /v1/{clip(path)}; use GET.", headers={"Allow": "GET"}
        )
    return NotFound(f"Unknown request URL: {method} {clip(target.raw_path)}.")


def prepare(
    request: web.Request, chosen: ModelRoute, target: Target, *, runtime: Runtime
) -> Outbound:
    """The model-routed request to send: the body rewritten for the upstream's
    model (a compressed one sent inflated), a large form's rest streamed on."""
    read = chosen.read
    found = read.found
    headers = request.headers
    head = read.body
    upstream_model = chosen.upstream_model
    if found is not None and upstream_model is not None and upstream_model != found.model:
        if read.routable is not read.body:
            # A compressed body is rewritten and sent uncompressed (see README).
            headers = _without(request, "Content-Encoding")
        head = rewrite_model(read.routable, found, upstream_model)
    body: BodyBytes | BodyStream = head
    if found is not None and read.boundary is not None:
        body = stream_form_rest(request, read, head)  # a large form: its rest still to come
    authorization = client_authorization(request, runtime)
    return Outbound(
        request.method, chosen.route, target.path, target.query, headers, body, authorization
    )


async def prepare_path(
    request: web.Request, chosen: PathRoute, target: Target, *, runtime: Runtime, ex: Exchange
) -> Outbound:
    """The path-routed request to send, its body read whole or streamed (an
    error here is charged to the route's bucket)."""
    body = await read_path_body(request, runtime.settings.server)
    if not isinstance(body, BodyStream):
        ex.bytes_in = len(body)
    authorization = client_authorization(request, runtime)
    return Outbound(
        request.method,
        chosen.route,
        target.path,
        target.query,
        request.headers,
        body,
        authorization,
    )


def _without(request: web.Request, header: str) -> CIMultiDictProxy[str]:
    kept = CIMultiDict(request.headers)
    kept.popall(header, None)
    return CIMultiDictProxy(kept)


def is_websocket_upgrade(request: web.BaseRequest) -> bool:
    """A ``GET`` asking to switch to WebSocket (RFC 6455 §4.1); the rest is checked later."""
    return request.method == "GET" and request.headers.get("Upgrade", "").strip().lower() == (
        "websocket"
    )


def realtime_target(
    request: web.BaseRequest,
    target: Target,
    caller: Caller,
    *,
    runtime: Runtime,
    ex: Exchange | None = None,
) -> RealtimeTarget:
    """Resolve the handshake's route from ``?model=``, or raise the error to answer.

    ``target`` holds the vetted query (credential parameters removed) and its
    one ``model`` value (head.vet_target refused two); ``ex`` takes the
    metrics label, as a body's model does (:func:`allowed_match`)."""
    refuse_body(request)
    model = target.query_model or ""
    check_model_id(model)
    query = target.query
    if not model:
        route = runtime.table.resolve_path(REALTIME_PATH)
        if route is None:
            raise InvalidRequest(
                "You must provide a model parameter: /v1/realtime?model=<id>.",
                code="missing_model",
                param="model",
            )
        return RealtimeTarget(route, None, None, query, client_authorization(request, runtime))
    match = allowed_match(model, runtime, caller, ex)
    upstream_model = match.upstream_model
    if upstream_model != model:
        query = _with_model(query, upstream_model)
    authorization = client_authorization(request, runtime)
    return RealtimeTarget(match.route, model, upstream_model, query, authorization)


def allowed_match(
    model: str, runtime: Runtime, caller: Caller, ex: Exchange | None = None
) -> Match:
    """``model``'s match in the table, or the error to answer: an unknown
    model (404), or one the caller's key may not use (403). The one judge of
    a model a client names: in a body, in a realtime ``?model=``, in a
    Responses WebSocket's message.

    With ``ex`` (a body's model, a realtime handshake's), the metrics label is
    set once the model is known to route, before the key's check: a request
    the key refuses is counted under that label too."""
    match = runtime.table.resolve(model)
    if match is None:
        raise model_not_found(model)
    if ex is not None:
        # Metrics label: the table's entry (a glob, an exact or discovered id),
        # never the client's string, so the label set stays bounded.
        ex.metric_model = match.route.model or model
    if not KeyTable.allows(caller.key, model):
        raise model_not_allowed(model)
    return match


def refuse_body(request: web.BaseRequest) -> None:
    """Refuse a WebSocket handshake that has a body."""
    if request.body_exists:
        # A body on an upgrade request is a smuggling attempt (CVE-2026-69243).
        raise InvalidRequest("A WebSocket handshake must not have a body.", code="body_not_allowed")


def _with_model(query: str, model: str) -> str:
    """``query`` with the value of its ``model`` parameter replaced; the rest as it came."""
    value = quote(model, safe="/:@-._~")  # ';' and '&' encoded: no second reading
    parts = query.split("&")
    for i, part in enumerate(parts):
        if query_param_name(part) == "model":  # read as head.vet_query reads it
            parts[i] = f"{part.partition('=')[0]}={value}"
    return "&".join(parts)
