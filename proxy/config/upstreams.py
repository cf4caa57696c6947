"""The ``upstreams`` section: where requests go, and how each upstream is spoken to.

One mapping per upstream: its base URL (or ``builtin: demo``), the headers it
gets set and removed, the query parameters it gets added, its timeouts,
retries and circuit breaker, the response headers it may send back, and
whether it takes the Responses API over a WebSocket.
"""

from __future__ import annotations

import datetime

from yarl import URL

from .fields import (
    Node,
    boolean,
    header_name,
    int_in,
    nonempty_string,
    nonneg_number,
    positive_number,
    show,
    str_list,
    string,
)
from .settings import (
    BUILTIN_KINDS,
    CircuitBreakerSettings,
    HeaderRewrite,
    RetrySettings,
    Secret,
    Timeouts,
    Upstream,
)

__all__ = ["BUILTIN_PLACEHOLDER_URL", "upstreams_section"]


def _headers(node: Node) -> HeaderRewrite:
    node.mapping(("set", "remove"))
    pairs: list[tuple[str, Secret]] = []
    set_node = node.child("set")
    if set_node.value is not None:
        if not isinstance(set_node.value, dict):
            raise set_node.error(f"expected a mapping of header: value, got {show(set_node.value)}")
        for key in set_node.value:
            if not isinstance(key, str):
                raise set_node.error(f"header names must be strings, got {show(key)}")
            header_name(Node(set_node.file, f"{set_node.path}.{key}", key))
            value = string(set_node.child(key))
            if any(c in value for c in "\r\n\0"):
                raise set_node.child(key).error("header values must not contain CR, LF or NUL")
            pairs.append((key, Secret(value)))
    removed: tuple[str, ...] = node.opt("remove", str_list, ())
    for i, name in enumerate(removed):
        header_name(Node(node.file, f"{node.path}.remove[{i}]", name))
    return HeaderRewrite(set=tuple(pairs), remove=frozenset(n.lower() for n in removed))


def _query(node: Node) -> tuple[tuple[str, Secret], ...]:
    """``query: {name: value}``; the values are secrets, so errors never quote them."""
    if not isinstance(node.value, dict):
        raise node.error("expected a mapping of query parameter: value")
    pairs: list[tuple[str, Secret]] = []
    for name, given in node.value.items():
        if not isinstance(name, str) or not name.strip():
            raise node.error(f"query parameter names must be non-empty strings, got {show(name)}")
        # YAML reads an unquoted 2024-10-21 as a date and 2 as a number: both
        # are taken as the text written.
        written = given
        if isinstance(given, datetime.date) or (
            isinstance(given, int) and not isinstance(given, bool)
        ):
            written = str(given)
        if not isinstance(written, str):
            kind = type(given).__name__
            raise node.child(name).error(f"expected a string, got a {kind} (value not shown)")
        pairs.append((name, Secret(written)))
    return tuple(pairs)


def _timeouts(node: Node) -> Timeouts:
    node.mapping(("connect", "response", "idle"))
    d = Timeouts()
    return Timeouts(
        connect=node.opt("connect", positive_number, d.connect),
        response=node.opt("response", positive_number, d.response),
        idle=node.opt("idle", positive_number, d.idle),
    )


def _retries(node: Node) -> RetrySettings:
    node.mapping(("attempts", "backoff"))
    return RetrySettings(
        attempts=node.opt("attempts", int_in(0, 10), 0),
        backoff=node.opt("backoff", nonneg_number, 0.2),
    )


def _breaker(node: Node) -> CircuitBreakerSettings:
    node.mapping(("failures", "cooldown"))
    return CircuitBreakerSettings(
        failures=node.opt("failures", int_in(1, 10**6), 5),
        cooldown=node.opt("cooldown", positive_number, 30.0),
    )


def _url(node: Node) -> URL:
    text = nonempty_string(node)
    try:
        url = URL(text)
    except (ValueError, TypeError):
        raise node.error(f"not a URL: {show(text)}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise node.error(f"expected an http:// or https:// URL with a host, got {show(text)}")
    if url.query_string or url.fragment or url.user or url.password:
        raise node.error("a base URL takes no query, fragment or credentials")
    return url.with_path(url.path.rstrip("/"))


# Where a builtin upstream is until its listener is bound (server/builtin_upstreams.py):
# port 0 cannot be connected to, so a request can never go elsewhere by mistake.
BUILTIN_PLACEHOLDER_URL = URL("http://127.0.0.1:0/v1")


def _builtin(node: Node) -> str:
    kind = nonempty_string(node)
    if kind not in BUILTIN_KINDS:
        raise node.error(f"unknown builtin {show(kind)} (known: {', '.join(BUILTIN_KINDS)})")
    return kind


def _upstream(name: str, node: Node) -> Upstream:
    m = node.mapping(
        (
            "url",
            "headers",
            "timeouts",
            "pass_client_auth",
            "keep_response_headers",
            "retries",
            "circuit_breaker",
            "builtin",
            "query",
            "responses_websocket",
        )
    )
    builtin = node.opt("builtin", _builtin, None)
    if builtin is not None:
        if "url" in m:
            raise node.error("takes 'url' or 'builtin', not both")
        url = BUILTIN_PLACEHOLDER_URL
    elif "url" not in m:
        raise node.error("missing key 'url' (or 'builtin: demo' for the built-in demo upstream)")
    else:
        url = _url(node.child("url"))
    keep: tuple[str, ...] = node.opt("keep_response_headers", str_list, ())
    return Upstream(
        name=name,
        url=url,
        builtin=builtin,
        headers=node.opt("headers", _headers, HeaderRewrite()),
        timeouts=node.opt("timeouts", _timeouts, Timeouts()),
        pass_client_auth=node.opt("pass_client_auth", boolean, False),
        keep_response_headers=frozenset(k.lower() for k in keep),
        retries=node.opt("retries", _retries, RetrySettings()),
        circuit_breaker=node.opt("circuit_breaker", _breaker, CircuitBreakerSettings()),
        query=node.opt("query", _query, ()),
        responses_websocket=node.opt("responses_websocket", boolean, False),
    )


def upstreams_section(node: Node) -> dict[str, Upstream]:
    """The ``upstreams`` mapping, name to upstream, in the file's order."""
    if not isinstance(node.value, dict) or not node.value:
        raise node.error("expected a mapping of at least one upstream")
    upstreams: dict[str, Upstream] = {}
    for name in node.value:
        if not isinstance(name, str) or not name:
            raise node.error(f"upstream names must be strings, got {show(name)}")
        upstreams[name] = _upstream(name, node.child(name))
    return upstreams
