"""The one error taxonomy of the proxy, rendered as OpenAI's error JSON in one place.

::

    ProxyError                      status  type                   code
    ├── InvalidRequest               400    invalid_request_error  (given)
    ├── Unauthorized                 401    invalid_request_error  invalid_api_key
    ├── ModelNotAllowed              403    invalid_request_error  model_not_allowed
    ├── OriginNotAllowed             403    invalid_request_error  origin_not_allowed
    ├── NotFound                     404    invalid_request_error  (given)
    ├── MethodNotAllowed             405    invalid_request_error  method_not_allowed
    ├── RequestTimeout               408    invalid_request_error  request_timeout
    ├── RequestTooLarge              413    invalid_request_error  request_too_large
    ├── ExpectationFailed            417    invalid_request_error  expectation_failed
    ├── RateLimited                  429    requests               rate_limit_exceeded
    │   └── TokensLimited            429    tokens                 rate_limit_exceeded
    ├── HeadersTooLarge              431    invalid_request_error  request_header_fields_too_large
    ├── UpstreamUnavailable          502    api_error              upstream_unavailable
    ├── UpstreamAuthFailed           502    api_error              upstream_auth_failed
    ├── ServiceUnavailable           503    api_error              (given)
    └── UpstreamTimeout              504    api_error              upstream_timeout

Every response the proxy makes up has exactly the four keys ``message``,
``type``, ``param`` and ``code`` (``null`` where empty) and the header
``x-oaimux-error: <code>``, so clients and operators can tell our errors from
the upstream's. Messages never quote headers, keys or bodies.

On Anthropic's paths (``/v1/messages`` and below) the same errors are written
in Anthropic's shape, ``{"type": "error", "error": {"type": ..., "message": ...}}``,
with the same status and headers; the type comes from
:data:`ANTHROPIC_ERROR_TYPES` (README, "Coding agents").
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

from . import SERVER

__all__ = [
    "ANTHROPIC_ERROR_TYPES",
    "ERROR_HEADER",
    "MAX_MODEL_LENGTH",
    "ExpectationFailed",
    "HeadersTooLarge",
    "InvalidRequest",
    "MethodNotAllowed",
    "ModelNotAllowed",
    "NotFound",
    "OriginNotAllowed",
    "ProxyError",
    "RateLimited",
    "RequestTimeout",
    "RequestTooLarge",
    "ServiceUnavailable",
    "Unauthorized",
    "TokensLimited",
    "UpstreamAuthFailed",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "anthropic_path",
    "check_model_id",
    "clip",
    "error_body",
    "error_event",
    "error_response",
    "from_http_exception",
    "model_not_allowed",
    "model_not_found",
]

ERROR_HEADER = "x-oaimux-error"


class ProxyError(Exception):
    """An error the proxy answers itself, before any response byte went out."""

    status = 500
    type = "api_error"
    code = "internal_error"
    # Close the connection after the answer: the request's framing is suspect,
    # so bytes after it must not be read as another request (docs/faults.md,
    # "Bytes after a refused head").
    close_connection = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = dict(headers or {})


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotAllowed(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "unknown_url"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(ProxyError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class RequestTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class OriginNotAllowed(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "origin_not_allowed"


class ExpectationFailed(ProxyError):
    status = 417
    type = "invalid_request_error"
    code = "expectation_failed"


class HeadersTooLarge(ProxyError):
    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"


class RateLimited(ProxyError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class TokensLimited(RateLimited):
    """Refused by a token budget; ``window`` is ``"minute"`` or ``"day"``."""

    type = "tokens"

    def __init__(self, message: str, *, window: str, headers: Mapping[str, str]) -> None:
        super().__init__(message, headers=headers)
        self.window = window


class UpstreamUnavailable(ProxyError):
    status = 502
    type = "api_error"
    code = "upstream_unavailable"


class UpstreamAuthFailed(ProxyError):
    status = 502
    type = "api_error"
    code = "upstream_auth_failed"


class ServiceUnavailable(ProxyError):
    status = 503
    type = "api_error"
    code = "service_unavailable"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "api_error"
    code = "upstream_timeout"


def clip(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters (and ``...``): a client-chosen string
    (a model id, a path) quoted in an error message or a log line stays short."""
    return text if len(text) <= limit else text[:limit] + "..."


# Longer than any real model id (Azure deployments: 64, Hugging Face: 96 + org).
MAX_MODEL_LENGTH = 256


def check_model_id(model: str) -> None:
    """Refuse a model id no route could mean: over :data:`MAX_MODEL_LENGTH`
    characters, or holding control characters, which would reach logs
    (docs/faults.md, "Model ids that could reach a log"). An empty id passes:
    what its absence means is the caller's to say."""
    if len(model) > MAX_MODEL_LENGTH or not model.isprintable():
        raise InvalidRequest(
            f"The model id must be 1 to {MAX_MODEL_LENGTH} printable characters.",
            code="invalid_model",
            param="model",
        )


def model_not_found(model: str) -> NotFound:
    """The 404 for a model id no route (and no discovered id) matches."""
    return NotFound(
        f"The model '{clip(model)}' does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


def model_not_allowed(model: str) -> ModelNotAllowed:
    """The 403 for a model the caller's proxy key may not use."""
    return ModelNotAllowed(f"Your key may not use the model '{clip(model)}'.", param="model")


def _error_object(
    message: str, type_: str, code: str | None, param: str | None
) -> dict[str, str | None]:
    """OpenAI's error object: exactly four keys, ``null`` where empty."""
    return {"message": message, "type": type_, "param": param, "code": code}


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    """OpenAI's error body: the error object under ``error``."""
    return json.dumps({"error": _error_object(message, type_, code, param)}).encode()


def error_event(err: ProxyError) -> str:
    """The ``error`` event that ends a Responses WebSocket (README, "Codex CLI"):
    the error object of :func:`error_body` with the status it would have had."""
    error = _error_object(err.message, err.type, err.code, err.param)
    return json.dumps({"type": "error", "status": err.status, "error": error})


# Anthropic's error type for each status the proxy answers with: every code of
# one status means the same to an Anthropic client, so the status decides
# (the table with our codes: README, "Coding agents"). Anthropic's SDKs pick
# their exception class by the status; the type is what their users read.
ANTHROPIC_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    417: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def anthropic_path(raw_path: str) -> bool:
    """Is ``raw_path`` (no query) one of Anthropic's, ``/v1/messages`` or below
    (also without ``/v1``)? Errors there are written in Anthropic's shape."""
    path = raw_path[4:] if raw_path.startswith("/v1/") else raw_path[1:]
    return path == "messages" or path.startswith("messages/")


def anthropic_error_body(message: str, status: int) -> bytes:
    """Anthropic's error object for an answer with ``status``."""
    kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()


def error_response(err: ProxyError, raw_path: str = "") -> web.Response:
    """Render a :class:`ProxyError` for a request to ``raw_path`` (without its
    query; in Anthropic's shape on :func:`anthropic_path`); the only place an
    error body is made."""
    headers = {"Server": SERVER, ERROR_HEADER: err.code, **err.headers}
    if raw_path and anthropic_path(raw_path):
        body = anthropic_error_body(err.message, err.status)
    else:
        body = error_body(err.message, err.type, err.code, err.param)
    resp = web.Response(
        status=err.status, body=body, content_type="application/json", headers=headers
    )
    if err.close_connection:
        resp.force_close()
    return resp


_HTTP_CODES: dict[int, tuple[type[ProxyError], str, str]] = {
    400: (InvalidRequest, "invalid_request", "The request could not be parsed."),
    404: (NotFound, "unknown_url", "Unknown request URL."),
    405: (MethodNotAllowed, "method_not_allowed", "Method not allowed for this URL."),
    413: (RequestTooLarge, "request_too_large", "The request body is too large."),
    431: (InvalidRequest, "headers_too_large", "Request headers are too large."),
}


def from_http_exception(exc: web.HTTPException) -> ProxyError:
    """Translate aiohttp's own exceptions (router 404/405, body 413) into our taxonomy."""
    kind, code, message = _HTTP_CODES.get(
        exc.status, (ProxyError, "internal_error", "The proxy could not handle the request.")
    )
    err = kind(message, code=code)
    if exc.status == 431:
        err.status = 431
    if isinstance(exc, web.HTTPMethodNotAllowed):
        err.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
    return err
