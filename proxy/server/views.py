"""Thin views: the proxy itself, and the proxy's own endpoints.

A request to the proxy goes: vet the path → identify the caller (address,
proxy key) → read the body and find the model (or match a path route) →
check the key may use that model → take a rate-limit token → forward.
Errors before forwarding are rendered by errors.error_response.
"""

from __future__ import annotations

import os
import re
import time
from urllib.parse import unquote

from aiohttp import web
from aiohttp.helpers import parse_mimetype
from aiohttp.http import HttpVersion10, HttpVersion11
from multidict import CIMultiDict, CIMultiDictProxy

from .. import __version__
from ..admission.admission import Caller, RequestCost, charge, identify, unauthorized
from ..admission.proxy_keys import KeyTable
from ..config.settings import Route
from ..errors import (
    InvalidRequest,
    MethodNotAllowed,
    ModelNotAllowed,
    NotFound,
    ProxyError,
    check_model_id,
    clip,
    model_not_found,
)
from ..inbound.body import (
    STREAM_ABOVE,
    BodyBounds,
    BodyBytes,
    BodyStream,
    decoded_for_routing,
    find_model,
    read_body,
    read_multipart_head,
)
from ..inbound.findmodel import ModelAbsent, multipart_boundary, rewrite_model
from ..inbound.route import (
    REALTIME_PATH,
    Outbound,
    RealtimeTarget,
    client_authorization,
    is_websocket_upgrade,
    realtime_target,
)
from ..inbound.upload import MultipartHead, PartWatcher
from ..observe import EXCHANGE, Exchange, request_id_for
from ..outbound.forward import Answered
from ..outbound.relay import relay
from ..runtime.runtime import Runtime
from .keys import FORWARDER, LIMITER, OBSERVER, REALTIME, RUNTIME, STARTED_AT

__all__ = [
    "MODEL_FORM_PATHS",
    "MODEL_JSON_PATHS",
    "about_view",
    "healthz_view",
    "model_view",
    "models_view",
    "proxy_view",
    "vet_head",
    "vet_model",
    "vet_path",
    "vet_query",
]

# POST endpoints routed by the body's top-level "model" (JSON) ...
MODEL_JSON_PATHS = frozenset(
    {
        "chat/completions",
        "completions",
        "embeddings",
        "audio/speech",
        "images/generations",
        "moderations",
        "responses",
    }
)
# ... or by the "model" form field (multipart/form-data; JSON is accepted too).
MODEL_FORM_PATHS = frozenset(
    {"audio/transcriptions", "audio/translations", "images/edits", "images/variations"}
)
MODEL_PATHS = MODEL_JSON_PATHS | MODEL_FORM_PATHS

# Query parameters that carry credentials (Google- and Azure-style clients).
_KEY_PARAMS = frozenset({"key", "api-key", "api_key", "apikey", "access_token", "token"})
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_HTTP_VERSIONS = frozenset({HttpVersion10, HttpVersion11})


# Longer than any real model id (Azure deployments: 64, Hugging Face: 96 + org).
def vet_head(request: web.BaseRequest) -> None:
    """Refuse a request head that another server could read differently.

    - an HTTP version other than 1.0 or 1.1: aiohttp's C parser accepts an
      ``HTTP/0.9`` or ``HTTP/2.0`` request line (docs/faults.md, "Other HTTP
      versions and non-HTTP bytes");
    - a header name with an underscore: nginx drops them and some servers fold
      ``_`` into ``-``, so ``X_Forwarded_For`` could mean different things to
      us and to the upstream; Envoy rejects them at the edge (docs/faults.md,
      "Underscores in header names");
    - a WebSocket upgrade on anything but a body-less GET: aiohttp's parser
      hands the bytes after such a request to the new protocol, the
      smuggling shape of CVE-2026-69243 (docs/faults.md, "Upgrade smuggling").
      Any other ``Upgrade`` (h2c,
      which Java's HttpClient and ``curl --http2`` offer) is ignored, as RFC
      9110 §7.8 lets a server do: the request is served over HTTP/1.1, body
      and all, and the offer is dropped with the hop-by-hop headers.

    The refusal closes the connection, so nothing sent after this head is
    ever read as a request of its own.
    """
    problem: InvalidRequest | None = None
    if request.version not in _HTTP_VERSIONS:
        problem = InvalidRequest(
            "Only HTTP/1.0 and HTTP/1.1 are accepted.", code="invalid_http_version"
        )
    elif _underscore_in_names(request.raw_headers):
        problem = InvalidRequest(
            "Header names with underscores are refused; use '-'.", code="invalid_header_name"
        )
    elif (
        "Upgrade" in request.headers
        and (request.method != "GET" or request.body_exists)
        and _offers_protocol_switch(request.headers)
    ):
        problem = InvalidRequest(
            "Protocol upgrades are not accepted on this request.", code="upgrade_not_allowed"
        )
    if problem is not None:
        problem.close_connection = True
        raise problem


# The upgrades after which aiohttp's parsers stop reading HTTP: the C parser
# switches for websocket, the pure-Python one for websocket and tcp.
_SWITCHING_PROTOCOLS = frozenset({"websocket", "tcp"})


def _offers_protocol_switch(headers: CIMultiDictProxy[str]) -> bool:
    """Does any ``Upgrade`` value name a protocol the parser would switch to?

    Every header and every listed protocol counts (``Upgrade: h2c, websocket``
    too), with or without a version (``websocket/13``), in any case.
    """
    for value in headers.getall("Upgrade", ()):
        for offered in value.split(","):
            if offered.strip().partition("/")[0].lower() in _SWITCHING_PROTOCOLS:
                return True
    return False


_UNDERSCORE = ord("_")


def _underscore_in_names(raw_headers: tuple[tuple[bytes, bytes], ...]) -> bool:
    for name, _ in raw_headers:  # a plain loop: cheaper than any() over a generator
        # The byte as an int: ``b"_" in name`` first tries the bytes as an
        # index, raising and clearing a TypeError, ~10x slower (CPython 3.11).
        if _UNDERSCORE in name:
            return True
    return False


def vet_model(model: str) -> None:
    """Refuse a model id no route could mean: empty here, the rest as
    :func:`~proxy.errors.check_model_id` (the realtime handshake's check too)."""
    if not model:
        raise InvalidRequest(
            "you must provide a model parameter", code="missing_model", param="model"
        )
    check_model_id(model)


def vet_path(raw_path: str) -> str:
    """The path after ``/v1/`` (or ``/``), still percent-encoded, or an error.

    A path that could climb above the upstream's base path is refused: ``.``
    and ``..`` segments, encoded slashes and backslashes, in any encoding
    (docs/faults.md, "Paths that climb or hide a slash").
    """
    if not raw_path.startswith("/"):
        raise InvalidRequest("Only origin-form request targets are accepted.", code="invalid_path")
    path = raw_path[4:] if raw_path.startswith("/v1/") else raw_path[1:]
    if "%" in path or "\\" in path or "." in path:
        decoded = unquote(path)
        lowered = path.lower()
        if "%2f" in lowered or "%5c" in lowered or "\\" in decoded or "%25" in lowered:
            raise InvalidRequest("Encoded slashes are not accepted in paths.", code="invalid_path")
        # "..;x" too: servlet containers drop ";params" before resolving dots.
        if any(seg.partition(";")[0] in (".", "..") for seg in decoded.split("/")):
            raise InvalidRequest("Dot segments are not accepted in paths.", code="invalid_path")
    return path


def vet_query(query_string: str) -> tuple[str, list[str]]:
    """Drop key-bearing parameters; return the query to forward and every ``model`` value.

    The query string is forwarded as it came unless a parameter had to go.
    A query another parser could split differently is refused rather than
    forwarded (Go CVE-2022-2880): a raw ``;`` (some servers still split on it)
    or a ``%`` not followed by two hex digits.
    """
    if not query_string:
        return "", []
    if ";" in query_string or ("%" in query_string and _BAD_PERCENT.search(query_string)):
        raise InvalidRequest(
            "The query string is ambiguous: encode ';' and '%' as %3B and %25.",
            code="invalid_query",
        )
    parts = query_string.split("&")
    models: list[str] = []
    kept: list[str] = []
    dropped = False
    for part in parts:
        name = unquote(part.split("=", 1)[0].replace("+", " ")).lower()
        if name in _KEY_PARAMS:
            dropped = True
            continue
        if name == "model":
            models.append(unquote(part.partition("=")[2].replace("+", " ")))
        kept.append(part)
    return ("&".join(kept) if dropped else query_string), models


async def proxy_view(request: web.Request) -> web.StreamResponse:
    """Every ``/v1/*`` and ``/*`` request that is not one of the proxy's own."""
    app = request.app
    runtime = app[RUNTIME].current
    raw_path, _, raw_query = request.raw_path.partition("?")
    # Positional: keywords cost ~0.4 us more on this 30-field __init__.
    ex = Exchange(request_id_for(request), request.method, raw_path[:512], "-")
    observer = app[OBSERVER]
    observer.begin(ex)
    try:
        caller = identify(request, runtime)
        ex.client = caller.address
        ex.key_name = caller.key.name if caller.key is not None else None
        answer = await _proxy(request, app, runtime, caller, raw_path, raw_query, ex)
        if isinstance(answer, web.StreamResponse):
            return answer
        # Relayed from here, once _proxy's frame (the request body, the routing
        # state) is gone: a stream can run for minutes (docs/decisions.md,
        # "A stream holds neither the request body nor the retry state").
        try:
            return await relay(request, answer, ex, observer=observer)
        finally:
            if answer.upload is not None:
                ex.bytes_in = answer.upload.size
    except ProxyError as err:
        return observer.render_error(err, ex)
    except BaseException as exc:  # client gone (cancelled), or a bug: still logged
        ex.failed_before_response(exc)
        raise
    finally:
        observer.finished(ex)


async def _proxy(
    request: web.Request,
    app: web.Application,
    runtime: Runtime,
    caller: Caller,
    raw_path: str,
    raw_query: str,
    ex: Exchange,
) -> web.StreamResponse | Answered:
    """Admit, vet, route and send the request: the upstream's answer to relay,
    or a response of the proxy's own (realtime)."""
    limiter = app[LIMITER]
    settings = runtime.settings
    if not caller.authenticated:
        ex.budget = await charge(limiter, runtime, caller, None)
        # A suspect head is refused as such (and its connection closed) even
        # without a key: bytes after it must not be read as another request.
        vet_head(request)
        raise unauthorized()
    route: Route | None = None
    inbound: CIMultiDictProxy[str] = request.headers
    # When no route has a limit of its own, the bucket does not depend on the
    # route: charge before the body is read, so a client over its limit costs
    # no body read and no parse (README, "Rate limiting"). A token budget needs
    # the body (README, "Token budgets").
    charged = not (runtime.route_limited or runtime.token_limited)
    if charged and runtime.limited:  # with no limit configured, nothing to charge
        ex.budget = await charge(limiter, runtime, caller, None)
    cost: RequestCost | None = None  # a model request's, for a token budget
    try:
        vet_head(request)
        path = vet_path(raw_path)
        query, query_models = vet_query(raw_query)
        if len(query_models) > 1:
            raise InvalidRequest(
                "the query names 'model' more than once", code="ambiguous_model", param="model"
            )
        body: BodyBytes | BodyStream = b""
        upstream_model: str | None = None
        realtime: RealtimeTarget | None = None
        if path == REALTIME_PATH and is_websocket_upgrade(request):
            # Routed by ?model= (README, "Realtime (WebSocket)"); see inbound/route.py.
            realtime = realtime_target(
                request, runtime, caller, query=query, query_models=query_models
            )
            route = realtime.route
            ex.model, ex.upstream_model = realtime.model, realtime.upstream_model
            ex.metric_model = route.model or realtime.model or ""
        elif path in MODEL_PATHS and request.method == "POST":
            limit = settings.server.max_body_bytes
            content_type = request.headers.get("Content-Type", "application/json")
            encoding = request.headers.get("Content-Encoding")
            boundary = _streamable_form(request, content_type, encoding)
            head: MultipartHead | None = None
            bounds: BodyBounds | None = None
            routable: BodyBytes
            if boundary is not None:
                # A large form: read only up to its model field (docs/decisions.md,
                # "Large forms stream once their model field is in").
                bounds = BodyBounds.start(settings.server)
                head = await read_multipart_head(request, boundary, bounds)
                body = routable = head.head
                found = head.found
            else:
                body = await read_body(request, settings.server)
                routable = decoded_for_routing(body, encoding, limit)
                found = find_model(routable, content_type, runtime.token_limited)
            ex.bytes_in = len(body)
            cost = RequestCost(len(routable), found)
            if found is None:
                # No model at all (a stored prompt names its own, and OpenAI makes
                # it optional on moderations and images): routed by path.
                route = _route_without_model(runtime, caller, path)
            else:
                vet_model(found.model)
                ex.model = found.model
                match = runtime.table.resolve(found.model)
                if match is None:
                    raise model_not_found(found.model)
                # Metrics label: the table's entry (a glob, an exact or discovered id),
                # never the client's string, so the label set stays bounded.
                ex.metric_model = match.route.model or found.model
                if not KeyTable.allows(caller.key, found.model):
                    raise ModelNotAllowed(
                        f"Your key may not use the model '{clip(found.model)}'.", param="model"
                    )
                route = match.route
                upstream_model = match.upstream_model
                if upstream_model != found.model:
                    if routable is not body:
                        # A compressed body is rewritten and sent uncompressed (see README).
                        inbound = _without(request, "Content-Encoding")
                    body = rewrite_model(routable, found, upstream_model)
                ex.upstream_model = upstream_model
                if head is not None and not head.complete:
                    # (A head is read only for a form with a boundary, within bounds.)
                    assert boundary is not None and bounds is not None and isinstance(body, bytes)
                    watcher = PartWatcher(boundary)
                    watcher.feed(head.head[found.end :])  # the rest of the head, after the model
                    body = BodyStream(
                        request, bounds, head=body, received=len(head.head), watcher=watcher
                    )
        else:
            route = runtime.table.resolve_path(path)
            if route is None:
                raise _no_route(request.method, path, raw_path)
            length = request.content_length
            if request.body_exists and (length is None or length > STREAM_ABOVE):
                # Large uploads (files, batches input) stream through
                # (README, "Uploads are streamed").
                body = BodyStream(request, BodyBounds.start(settings.server))
            elif request.method not in ("GET", "HEAD", "DELETE", "OPTIONS") or request.body_exists:
                body = await read_body(request, settings.server)
                ex.bytes_in = len(body)
        ex.route = route.describe()
    except ProxyError:
        if not charged:
            ex.budget = await charge(limiter, runtime, caller, route)
        raise
    if not charged:
        ex.budget = await charge(limiter, runtime, caller, route, cost)
    if realtime is not None:
        return await app[REALTIME].serve(request, realtime, runtime, ex=ex)
    outbound = Outbound(
        request.method, route, path, query, inbound, body, client_authorization(request, runtime)
    )
    try:
        return await app[FORWARDER].forward(outbound, runtime, ex)
    except BaseException:
        if isinstance(body, BodyStream):
            ex.bytes_in = body.size
        raise


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


def _no_route(method: str, path: str, raw_path: str) -> ProxyError:
    """The error for a request no route serves: 405 on a path that is served with
    another method (a model path takes POST; the proxy answers GET on its model
    list), else 404."""
    if path in MODEL_PATHS:
        return MethodNotAllowed(
            f"{method} is not allowed on /v1/{path}; use POST.", headers={"Allow": "POST"}
        )
    if path == "models" or (path.startswith("models/") and len(path) > len("models/")):
        return MethodNotAllowed(
            f"{method} is not allowed on /v1/{clip(path)}; use GET.", headers={"Allow": "GET"}
        )
    return NotFound(f"Unknown request URL: {method} {clip(raw_path)}.")


def _streamable_form(request: web.Request, content_type: str, encoding: str | None) -> bytes | None:
    """The boundary of a multipart body worth streaming (over STREAM_ABOVE bytes, or
    chunked, and not compressed), else None: small forms are read whole, so
    retries and fallback keep working for them."""
    length = request.content_length
    if encoding or (length is not None and length <= STREAM_ABOVE):
        return None
    mime = parse_mimetype(content_type)
    if mime.type != "multipart" or mime.subtype != "form-data":
        return None
    return multipart_boundary(dict(mime.parameters))


def _without(request: web.Request, header: str) -> CIMultiDictProxy[str]:
    kept = CIMultiDict(request.headers)
    kept.popall(header, None)
    return CIMultiDictProxy(kept)


async def _admit(request: web.Request) -> Caller:
    """Identify and charge a caller of the proxy's own endpoints."""
    runtime = request.app[RUNTIME].current
    caller = identify(request, runtime)
    ex = request.get(EXCHANGE)  # set by Observer.observed, which logs the request
    if ex is not None:
        ex.client = caller.address
        ex.key_name = caller.key.name if caller.key is not None else None
    charged = await charge(request.app[LIMITER], runtime, caller, None)
    if ex is not None:
        ex.budget = charged
    if not caller.authenticated:
        raise unauthorized()
    return caller


def _model_object(model_id: str, created: int) -> dict[str, object]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "oaimux"}


async def models_view(request: web.Request) -> web.Response:
    """``GET /v1/models``: the routing table's exact ids and aliases the caller may use."""
    caller = await _admit(request)
    runtime = request.app[RUNTIME].current
    created = int(request.app[STARTED_AT])
    ids = [m for m in runtime.table.model_ids() if KeyTable.allows(caller.key, m)]
    return web.json_response({"object": "list", "data": [_model_object(m, created) for m in ids]})


async def model_view(request: web.Request) -> web.Response:
    """``GET /v1/models/{id}``; ids may contain slashes (``meta-llama/Llama-3``)."""
    caller = await _admit(request)
    runtime = request.app[RUNTIME].current
    model_id = request.match_info["model"]
    if (
        model_id not in runtime.table.model_ids() and runtime.table.resolve(model_id) is None
    ) or not KeyTable.allows(caller.key, model_id):
        raise model_not_found(model_id)
    return web.json_response(_model_object(model_id, int(request.app[STARTED_AT])))


async def about_view(request: web.Request) -> web.Response:
    """``GET /about``: what this is; counts only, never a URL, header or key."""
    await _admit(request)
    runtime = request.app[RUNTIME].current
    settings = runtime.settings
    return web.json_response(
        {
            "name": "oaimux",
            "version": __version__,
            "description": "One OpenAI-compatible endpoint in front of every model.",
            "uptime_seconds": round(time.time() - request.app[STARTED_AT], 3),
            "upstreams": len(settings.upstreams),
            "routes": len(settings.routes),
            "models": len(runtime.table.model_ids()),
            "auth": bool(settings.auth_keys),
            "rate_limit": settings.rate_limit is not None,
            # Which process answered (one of --workers N), and how many
            # config reloads (SIGHUP) it has applied: "did my reload take?"
            "pid": os.getpid(),
            "reloads": request.app[RUNTIME].generation,
        }
    )


async def healthz_view(request: web.Request) -> web.Response:
    """``GET /healthz``: the process is up and serving. Not rate limited."""
    return web.json_response({"status": "ok"})
