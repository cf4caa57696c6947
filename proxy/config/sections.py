"""One parser per section of ``routes.yaml``: server, log, metrics, routes, auth.

Each takes the section's :class:`~proxy.config.fields.Node` and returns its
frozen settings; the upstreams and the rate limits have modules of their own
(upstreams.py, limits.py). A parser refuses unknown keys, so a misspelt key
is an error naming it and the keys allowed there.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping

from .fields import (
    Node,
    boolean,
    int_in,
    nonempty_string,
    nonneg_number,
    positive_number,
    show,
    str_list,
    string,
)
from .limits import rate_limit
from .settings import (
    AuthKey,
    Balance,
    CorsSettings,
    LogSettings,
    MetricsSettings,
    Route,
    ServerSettings,
    Upstream,
)

__all__ = ["auth_section", "log_section", "metrics_section", "routes_section", "server_section"]


def _network(node: Node) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    text = nonempty_string(node)
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise node.error(f"not an IP network: {show(text)}") from None


def _networks(node: Node) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if not isinstance(node.value, list):
        raise node.error(f"expected a list of networks, got {show(node.value)}")
    return tuple(_network(node.child(i)) for i in range(len(node.value)))


def _cors(node: Node) -> CorsSettings:
    node.mapping(("allow_origins", "max_age"))
    origins_node = node.child("allow_origins")
    if origins_node.value == "*":
        origins: tuple[str, ...] = ("*",)
    else:
        origins = str_list(origins_node)
    return CorsSettings(allow_origins=origins, max_age=node.opt("max_age", int_in(0, 86400), 600))


def server_section(node: Node) -> ServerSettings:
    node.mapping(
        (
            "host",
            "port",
            "trusted_proxies",
            "max_body_bytes",
            "shutdown_grace_seconds",
            "header_timeout",
            "body_idle_timeout",
            "body_timeout",
            "send_timeout",
            "keepalive_timeout",
            "cors",
        )
    )
    d = ServerSettings()
    return ServerSettings(
        host=node.opt("host", nonempty_string, d.host),
        port=node.opt("port", int_in(0, 65535), d.port),
        trusted_proxies=node.opt("trusted_proxies", _networks, d.trusted_proxies),
        max_body_bytes=node.opt("max_body_bytes", int_in(1, 2**40), d.max_body_bytes),
        shutdown_grace_seconds=node.opt("shutdown_grace_seconds", nonneg_number, 30.0),
        header_timeout=node.opt("header_timeout", positive_number, d.header_timeout),
        body_idle_timeout=node.opt("body_idle_timeout", positive_number, d.body_idle_timeout),
        body_timeout=node.opt("body_timeout", positive_number, d.body_timeout),
        send_timeout=node.opt("send_timeout", positive_number, d.send_timeout),
        keepalive_timeout=node.opt("keepalive_timeout", positive_number, d.keepalive_timeout),
        cors=node.opt("cors", _cors, None),
    )


def log_section(node: Node) -> LogSettings:
    node.mapping(("format", "level", "access"))
    fmt = node.opt("format", string, "text")
    if fmt not in ("text", "json"):
        raise node.child("format").error(f"expected text or json, got {show(fmt)}")
    level = node.opt("level", string, "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise node.child("level").error(f"not a log level: {show(level)}")
    return LogSettings(
        format="json" if fmt == "json" else "text",
        level=level,
        access=node.opt("access", boolean, True),
    )


def _listen(node: Node) -> tuple[str, int]:
    text = nonempty_string(node)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise node.error(f"expected host:port, got {show(text)}")
    return host.strip("[]"), int(port)


def metrics_section(node: Node) -> MetricsSettings:
    node.mapping(("enabled", "path", "listen"))
    path = node.opt("path", nonempty_string, "/metrics")
    if not path.startswith("/"):
        raise node.child("path").error(f"must start with '/', got {show(path)}")
    return MetricsSettings(
        enabled=node.opt("enabled", boolean, True),
        path=path,
        listen=node.opt("listen", _listen, None),
    )


def _upstream_ref(node: Node, known: Mapping[str, Upstream]) -> str:
    name = nonempty_string(node)
    if name not in known:
        raise node.error(f"unknown upstream {name!r} (known: {', '.join(known) or 'none'})")
    return name


def _route_upstreams(
    node: Node, known: Mapping[str, Upstream]
) -> tuple[tuple[str, ...], Balance | None]:
    value = node.value
    if isinstance(value, str):
        return (_upstream_ref(node, known),), None
    if isinstance(value, list):
        if not value:
            raise node.error("needs at least one upstream")
        names = tuple(_upstream_ref(node.child(i), known) for i in range(len(value)))
        if len(set(names)) != len(names):
            raise node.error("lists an upstream twice")
        return names, None
    if isinstance(value, dict):
        node.mapping(("balance",))
        members = node.child("balance")
        if not isinstance(members.value, list) or not members.value:
            raise members.error("expected a non-empty list of {name, weight}")
        weights: list[tuple[str, int]] = []
        for i in range(len(members.value)):
            member = members.child(i)
            member.mapping(("name", "weight"))
            name = _upstream_ref(member.child("name"), known)
            weight = member.opt("weight", int_in(1, 10**6), 1)
            weights.append((name, weight))
        names = tuple(n for n, _ in weights)
        if len(set(names)) != len(names):
            raise members.error("lists an upstream twice")
        return names, Balance(tuple(weights))
    raise node.error(
        f"expected an upstream name, a list of names or {{balance: [...]}}, got {show(value)}"
    )


_ROUTE_KEYS = (
    "model",
    "path",
    "default",
    "upstream",
    "rewrite_model",
    "rate_limit",
    "fallback_on_timeout",
    "models",
    "prefix",
)


def _route(index: int, node: Node, known: Mapping[str, Upstream]) -> Route:
    m = node.mapping(_ROUTE_KEYS)
    if "upstream" not in m:
        raise node.error("missing key 'upstream'")
    upstreams, balance = _route_upstreams(node.child("upstream"), known)
    model = node.opt("model", nonempty_string, None)
    path = node.opt("path", nonempty_string, None)
    default = node.opt("default", boolean, False)
    discover = False
    if "models" in m:
        if m["models"] != "discover":
            raise node.child("models").error(
                f"the only value is 'discover', got {show(m['models'])}"
            )
        discover = True
    selectors = [s for s in (model is not None, path is not None, default, discover) if s]
    if len(selectors) != 1:
        raise node.error(
            "needs exactly one of 'model', 'path', 'default: true' or 'models: discover'"
        )
    prefix = node.opt("prefix", string, "")
    if prefix and not discover:
        raise node.child("prefix").error("'prefix' goes with 'models: discover'")
    rewrite = node.opt("rewrite_model", nonempty_string, None)
    if rewrite is not None and model is None:
        raise node.child("rewrite_model").error("'rewrite_model' needs a 'model' route")
    if path is not None:
        path = path.lstrip("/")
        if path.startswith("v1/"):
            path = path[3:]
    return Route(
        index=index,
        upstreams=upstreams,
        model=model,
        path=path,
        default=default,
        balance=balance,
        rewrite_model=rewrite,
        rate_limit=node.opt("rate_limit", rate_limit, None),
        fallback_on_timeout=node.opt("fallback_on_timeout", boolean, False),
        discover=discover,
        prefix=prefix,
    )


def routes_section(node: Node, upstreams: Mapping[str, Upstream]) -> tuple[Route, ...]:
    """The ``routes`` list, in the file's order; each names upstreams already parsed."""
    if not isinstance(node.value, list) or not node.value:
        raise node.error("expected a list of at least one route")
    routes = tuple(_route(i, node.child(i), upstreams) for i in range(len(node.value)))
    if sum(1 for r in routes if r.default) > 1:
        raise node.error("only one route may be 'default: true'")
    return routes


def _auth_key(index: int, node: Node, known_names: set[str]) -> AuthKey:
    m = node.mapping(("name", "key", "sha256", "models", "rate_limit"))
    if "name" not in m:
        raise node.error("missing key 'name'")
    name = nonempty_string(node.child("name"))
    if name in known_names:
        raise node.child("name").error(f"duplicate key name {name!r}")
    known_names.add(name)
    has_key, has_digest = m.get("key") is not None, m.get("sha256") is not None
    if has_key == has_digest:
        raise node.error("needs exactly one of 'key' or 'sha256'")
    if has_key:
        key = nonempty_string(node.child("key"))
        if len(key) < 8:
            # Do not quote it: it is a secret.
            raise node.child("key").error("a proxy key must be at least 8 characters")
        digest = hashlib.sha256(key.encode()).digest()
    else:
        hex_digest = nonempty_string(node.child("sha256")).lower()
        if not re.fullmatch(r"[0-9a-f]{64}", hex_digest):
            raise node.child("sha256").error("expected 64 hex digits")
        digest = bytes.fromhex(hex_digest)
    models = node.opt("models", str_list, None)
    return AuthKey(
        name=name,
        sha256=digest,
        models=models,
        rate_limit=node.opt("rate_limit", rate_limit, None),
    )


def auth_section(node: Node) -> tuple[AuthKey, ...]:
    """The proxy keys of ``auth.keys``; none when the section is absent."""
    if node.value is None:
        return ()
    node.mapping(("keys",))
    keys_node = node.child("keys")
    if not isinstance(keys_node.value, list):
        raise keys_node.error("expected a list of keys")
    names: set[str] = set()
    return tuple(_auth_key(i, keys_node.child(i), names) for i in range(len(keys_node.value)))
