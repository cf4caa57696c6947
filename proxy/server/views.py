"""Thin views: the proxy itself, and the proxy's own endpoints.

A request to the proxy goes: identify the caller (address, proxy key) → vet
the head and target → choose the route (read the body and find the model, or
match a path route; check the key may use that model) → take a rate-limit
token → prepare the routed request → forward → relay the answer. The stages
live in inbound/ and outbound/; :func:`_route_and_send` calls each once, in
order. Errors before forwarding are rendered by errors.error_response; each
view is its own error boundary (Observer.render_error, render_failure): the app
has no middleware but CORS's (docs/decisions.md, "The error boundary is in the
views").
"""

from __future__ import annotations

import os
import time
from typing import NoReturn

from aiohttp import web

from .. import SERVER, __version__
from ..admission.admission import Caller, counts_tokens
from ..admission.proxy_keys import KeyTable
from ..admission.refusals import unauthorized
from ..config.settings import Route
from ..errors import ProxyError, model_not_found
from ..inbound.body import BodyStream
from ..inbound.head import identify, vet_head, vet_target
from ..inbound.responses_route import RESPONSES_PATH, check_responses_upgrade
from ..inbound.route import (
    ModelRoute,
    PathRoute,
    RealtimeTarget,
    choose_route,
    is_websocket_upgrade,
    prepare,
    prepare_path,
    priced,
)
from ..observe import EXCHANGE, Exchange, request_id_for
from ..outbound.forward import Answered
from ..outbound.relay import relay
from ..runtime.runtime import Runtime
from .connections import body_piped
from .keys import FORWARDER, LIMITER, OBSERVER, REALTIME, RUNTIME, STARTED_AT

__all__ = [
    "about_view",
    "healthz_view",
    "model_view",
    "models_view",
    "proxy_view",
]


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
        answer = await _route_and_send(
            request, runtime, caller, ex, raw_path=raw_path, raw_query=raw_query
        )
        if isinstance(answer, web.StreamResponse):
            return answer
        # Relayed from here, once _route_and_send's frame (the request body, the routing
        # state) is gone: a stream can run for minutes (docs/decisions.md,
        # "A stream holds neither the request body nor the retry state").
        try:
            return await relay(request, answer, ex, observer=observer, piping=body_piped)
        finally:
            if answer.upload is not None:
                ex.bytes_in = answer.upload.size
    except ProxyError as err:
        return observer.render_error(err, ex)
    except Exception as exc:  # noqa: BLE001 - the error boundary; see render_failure
        return observer.render_failure(exc, ex)
    except BaseException as exc:  # the client went away (cancelled): still logged
        ex.failed_before_response(exc)
        raise
    finally:
        observer.finished(ex)


async def _route_and_send(
    request: web.Request,
    runtime: Runtime,
    caller: Caller,
    ex: Exchange,
    *,
    raw_path: str,
    raw_query: str,
) -> web.StreamResponse | Answered:
    """Admit, vet, route and prepare (inbound/), send (outbound/): the answer to relay,
    or a WebSocket session's response. What routing read dies with this frame."""
    app = request.app
    admission = app[LIMITER]
    settings = runtime.settings
    if not caller.authenticated:
        await _refuse_unauthenticated(request, runtime, caller, ex)
    # No route limit or tokens: charge first, no body read if refused (README, "Rate limiting").
    tokens = runtime.token_limited and (runtime.route_limited or counts_tokens(settings, caller))
    charged = not (runtime.route_limited or tokens)
    if charged and runtime.limited:  # with no limit configured, nothing to charge
        ex.charge = await admission.charge(settings, caller, None)
    route: Route | None = None
    try:
        vet_head(request)
        target = vet_target(raw_path, raw_query)
        if target.path == RESPONSES_PATH and is_websocket_upgrade(request):
            # Routed by its first message, once accepted (README, "Codex CLI").
            charged = await _admit_responses_socket(request, runtime, caller, charged=charged)
            return await app[REALTIME].serve_responses(
                request, runtime, caller, query=target.query, ex=ex
            )
        chosen = await choose_route(request, target, caller, runtime=runtime, ex=ex, cap=tokens)
        route = chosen.route  # from here, an error is charged to the route's bucket
        if isinstance(chosen, ModelRoute):
            outbound = prepare(request, chosen, target, runtime=runtime)
        elif isinstance(chosen, PathRoute):
            outbound = await prepare_path(request, chosen, target, runtime=runtime, ex=ex)
        else:
            outbound = None
        ex.route = route.describe()
    except ProxyError:
        if not charged:
            ex.charge = await admission.charge(settings, caller, route)
        raise
    if not charged:  # a model request's tokens too, under a budget (README, "Token budgets")
        if admission.memory is not None:  # in memory, charged at once: no coroutine
            ex.charge = admission.charge_now(settings, caller, route, priced(chosen, target))
        else:
            ex.charge = await admission.charge(settings, caller, route, priced(chosen, target))
    if outbound is None:
        assert isinstance(chosen, RealtimeTarget)
        return await app[REALTIME].serve(request, chosen, runtime, ex=ex)
    try:
        return await app[FORWARDER].forward(outbound, runtime, ex)
    except BaseException:
        if isinstance(outbound.body, BodyStream):
            ex.bytes_in = outbound.body.size
        raise


async def _refuse_unauthenticated(
    request: web.Request, runtime: Runtime, caller: Caller, ex: Exchange
) -> NoReturn:
    """Charge a caller without a valid key (guessing keys is rate limited
    too), then refuse it."""
    ex.charge = await request.app[LIMITER].charge(runtime.settings, caller, None)
    # A suspect head is refused as such (and its connection closed) even
    # without a key: bytes after it must not be read as another request.
    vet_head(request)
    raise unauthorized()


async def _admit_responses_socket(
    request: web.Request, runtime: Runtime, caller: Caller, *, charged: bool
) -> bool:
    """Refuse a Responses WebSocket upgrade no upstream takes (426), else charge
    it (before its route is known: the key's or the global bucket)."""
    check_responses_upgrade(request, runtime)
    if not charged:
        await request.app[LIMITER].charge(runtime.settings, caller, None)
    return True


async def _admit(request: web.Request) -> Caller:
    """Identify and charge a caller of the proxy's own endpoints."""
    runtime = request.app[RUNTIME].current
    caller = identify(request, runtime)
    ex = request.get(EXCHANGE)  # set by Observer.observed, which logs the request
    if ex is not None:
        ex.client = caller.address
        ex.key_name = caller.key.name if caller.key is not None else None
    charged = await request.app[LIMITER].charge(runtime.settings, caller, None)
    if ex is not None:
        ex.charge = charged
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
    return web.json_response({"status": "ok"}, headers=_NAMED)


# aiohttp's own Server header names its version (README, "What never comes back").
_NAMED = {"Server": SERVER}
