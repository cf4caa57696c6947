"""The error boundary and CORS, ordered in one place (app.py).

``error_middleware`` is outermost: a :class:`ProxyError`, an aiohttp
``HTTPException`` (router 404/405, 413) or any unexpected exception becomes
our error JSON (errors.error_response: Anthropic's shape on its paths), unless
the response has already started, in which case nothing can be added to it
(the connection is aborted instead). Unexpected
exceptions are logged once, server-side, and never shown to the client. The
answers of the proxy's own endpoints get its ``Server`` header here.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from .. import SERVER
from ..config.settings import CorsSettings
from ..errors import OriginNotAllowed, ProxyError, error_response, from_http_exception

__all__ = ["Cors", "error_middleware"]

log = logging.getLogger("oaimux")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        resp = await handler(request)
    except Exception as exc:  # noqa: BLE001 - the boundary; see _answer
        return _answer(request, exc)
    if not resp.prepared:  # a relayed answer went out named by its header policy
        resp.headers["Server"] = SERVER
    return resp


def _answer(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The error JSON for ``exc`` (OpenAI's, or Anthropic's on its paths), raised by a
    view before it answered.

    Call it only from an ``except`` block (the log line takes the traceback
    from there). What is not an error to answer is raised again: an
    ``HTTPException`` below 400 (aiohttp sends it as the response), a client
    that went away, a timeout.
    """
    if isinstance(exc, ProxyError):
        return error_response(exc, _path_of(request))
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        return error_response(from_http_exception(exc), _path_of(request))
    if isinstance(exc, ConnectionError | TimeoutError):
        raise exc
    log.exception("unexpected error handling %s %s", request.method, request.path[:200])
    return error_response(ProxyError("The proxy failed to handle the request."), _path_of(request))


def _path_of(request: web.BaseRequest) -> str:
    """The request's path without its query: which dialect an error is written in."""
    return request.raw_path.partition("?")[0]


_ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"


class Cors:
    """CORS for browser apps (off unless ``server.cors`` is set).

    ``middleware`` answers preflights; ``on_prepare`` (an ``on_response_prepare``
    signal) adds the headers to every response, proxied streams and errors
    included, just before its headers go out.
    """

    def __init__(self, cors: CorsSettings) -> None:
        self.settings = cors
        self.any_origin = "*" in cors.allow_origins
        self.allowed = frozenset(cors.allow_origins)

    def _origin(self, request: web.BaseRequest) -> str | None:
        origin = request.headers.get("Origin")
        if origin is None or not (self.any_origin or origin in self.allowed):
            return None
        return origin

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            request.method == "OPTIONS"
            and "Access-Control-Request-Method" in request.headers
            and "Origin" in request.headers
        ):
            # A preflight is the proxy's to answer, never forwarded upstream.
            if self._origin(request) is None:
                return error_response(
                    OriginNotAllowed("This origin may not call the proxy from a browser."),
                    _path_of(request),
                )
            resp = web.Response(status=204, headers={"Server": SERVER})
            resp.headers["Access-Control-Allow-Methods"] = _ALLOW_METHODS
            requested = request.headers.get("Access-Control-Request-Headers")
            if requested:
                resp.headers["Access-Control-Allow-Headers"] = requested
            resp.headers["Access-Control-Max-Age"] = str(self.settings.max_age)
            return resp
        return await handler(request)

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        if not self.any_origin:
            # The answer depends on Origin, also when it is absent or refused,
            # so a shared cache must not serve one origin's answer to another.
            response.headers.add("Vary", "Origin")
        origin = self._origin(request)
        if origin is None:
            return
        response.headers["Access-Control-Allow-Origin"] = "*" if self.any_origin else origin
        response.headers["Access-Control-Expose-Headers"] = "*"
