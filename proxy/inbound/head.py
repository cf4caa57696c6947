"""The request head, vetted, and who sent it: the first stages of a request.

- :func:`identify`: the caller (address after trusted ``X-Forwarded-For``,
  proxy key), for the rate limit and the key's allow-list;
- :func:`vet_head`: a head another server could read differently is refused,
  and its connection closed;
- :func:`vet_target`: the path and query, vetted, as a :class:`Target`;
- :func:`vet_model`: a model id no route could mean is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote

from aiohttp import web
from aiohttp.http import HttpVersion10, HttpVersion11
from multidict import CIMultiDictProxy

from ..admission.admission import Caller
from ..admission.clientip import client_address
from ..admission.proxy_keys import presented_key
from ..errors import InvalidRequest, check_model_id
from ..runtime.query import query_param_name
from ..runtime.runtime import Runtime

__all__ = [
    "Target",
    "identify",
    "vet_head",
    "vet_model",
    "vet_path",
    "vet_query",
    "vet_target",
]


def identify(request: web.BaseRequest, runtime: Runtime) -> Caller:
    """Who sent this request: its address and, when keys are configured, the
    proxy key it presented (``authenticated`` False when none valid)."""
    # aiohttp reads the peer address once per connection (request.remote);
    # asking the transport would be a getpeername() system call per request.
    host = request.remote
    if runtime.trusts_proxies:
        forwarded = request.headers.getall("X-Forwarded-For", ())
        address = client_address(host, forwarded, runtime.trusted)
    else:
        address = client_address(host, (), runtime.trusted)
    if not runtime.keyed:
        return _anonymous(address)
    key = runtime.keys.authenticate(presented_key(request.headers))
    return Caller(address, key, key is not None)


@lru_cache(maxsize=8192)
def _anonymous(address: str) -> Caller:
    """The caller of an open proxy (no keys): one per address, made once
    (bounded: a flood of addresses only evicts)."""
    return Caller(address, None, True)


@dataclass(slots=True)
class Target:
    """The request target, vetted (:func:`vet_target`); never changed after.

    Slotted, not frozen: made once per request, and a frozen dataclass's
    ``__init__`` sets each field through ``object.__setattr__``; a slot is
    also read faster than a named tuple's field, which CPython 3.11 does not
    specialise (docs/decisions.md, "The upstream walk costs little per request").
    """

    raw_path: str  # as it came (quoted, clipped, in an error message)
    path: str  # after /v1/ (or /), still percent-encoded, no dot segments
    query: str  # as it came, credential parameters dropped
    query_model: str | None  # the one ?model= value; None when there is none


def vet_target(raw_path: str, raw_query: str) -> Target:
    """The path and query of a request target, vetted, or the error to answer."""
    path = vet_path(raw_path)
    query, query_models = vet_query(raw_query)
    if len(query_models) > 1:
        raise InvalidRequest(
            "the query names 'model' more than once", code="ambiguous_model", param="model"
        )
    return Target(raw_path, path, query, query_models[0] if query_models else None)


# Query parameters that carry credentials (Google- and Azure-style clients).
_KEY_PARAMS = frozenset({"key", "api-key", "api_key", "apikey", "access_token", "token"})
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_HTTP_VERSIONS = frozenset({HttpVersion10, HttpVersion11})


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
        name = query_param_name(part)
        if name in _KEY_PARAMS:
            dropped = True
            continue
        if name == "model":
            models.append(unquote(part.partition("=")[2].replace("+", " ")))
        kept.append(part)
    return ("&".join(kept) if dropped else query_string), models
