"""CORS, the app's one middleware, and only when ``server.cors`` is set (app.py).

There is no error middleware: each view is its own error boundary
(observe/observer.py, ``Observer.render_error`` and ``render_failure``), the
router answers every origin-form target (app.py) and the connection refuses
the other target forms (connections.py), so aiohttp runs no middleware chain
for a request unless CORS is on (docs/decisions.md, "The error boundary is in
the views").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from .. import SERVER
from ..config.settings import CorsSettings
from ..errors import OriginNotAllowed, error_response

__all__ = ["Cors"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
