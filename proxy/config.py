"""Load ``routes.yaml`` once into the frozen, typed settings of settings.py.

``load_settings(path)`` is the only entry point. It expands ``${VAR}`` and
``${VAR:-default}`` from the environment, validates every key and returns a
:class:`~proxy.settings.Settings`. Every problem raises :class:`ConfigError`
naming the file, the key path (``routes[2].upstream``) and the offending value;
nothing is checked later, at request time. The settings types are re-exported
here, so ``from proxy.config import Route`` keeps working.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from yarl import URL

from .settings import (
    AuthKey,
    Balance,
    CircuitBreakerSettings,
    ConfigError,
    CorsSettings,
    HeaderRewrite,
    Limits,
    LogSettings,
    MetricsSettings,
    RateLimitSettings,
    RetrySettings,
    Route,
    Secret,
    ServerSettings,
    Settings,
    Timeouts,
    TokenBudget,
    Upstream,
)

__all__ = [
    "AuthKey",
    "Balance",
    "CircuitBreakerSettings",
    "ConfigError",
    "CorsSettings",
    "HeaderRewrite",
    "Limits",
    "LogSettings",
    "MetricsSettings",
    "RateLimitSettings",
    "RetrySettings",
    "Route",
    "ServerSettings",
    "Settings",
    "Timeouts",
    "TokenBudget",
    "Upstream",
    "load_settings",
    "parse_settings",
]

T = TypeVar("T")

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# RFC 9110 §5.1: a field name is a token.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


# ---------------------------------------------------------------------------
# Parsing. A small cursor keeps the key path for error messages.


class _Node:
    """A value in the YAML tree with its key path, for precise error messages."""

    __slots__ = ("file", "path", "value")

    def __init__(self, file: str, path: str, value: object) -> None:
        self.file = file
        self.path = path
        self.value = value

    def error(self, problem: str) -> ConfigError:
        where = self.path or "(top level)"
        return ConfigError(f"{self.file}: {where}: {problem}")

    def child(self, key: str | int) -> _Node:
        if isinstance(key, int):
            path = f"{self.path}[{key}]"
            assert isinstance(self.value, list)
            return _Node(self.file, path, self.value[key])
        path = f"{self.path}.{key}" if self.path else key
        assert isinstance(self.value, dict)
        return _Node(self.file, path, self.value.get(key))

    def mapping(self, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(self.value, dict):
            raise self.error(f"expected a mapping, got {_show(self.value)}")
        for key in self.value:
            if not isinstance(key, str):
                raise self.error(f"keys must be strings, got {_show(key)}")
            if key not in allowed:
                raise self.error(f"unknown key {key!r} (allowed: {', '.join(allowed)})")
        return self.value

    def opt(self, key: str, kind: Callable[[_Node], T], default: T) -> T:
        assert isinstance(self.value, dict)
        if key not in self.value or self.value[key] is None:
            return default
        return kind(self.child(key))


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _str(node: _Node) -> str:
    if not isinstance(node.value, str):
        raise node.error(f"expected a string, got {_show(node.value)}")
    return node.value


def _nonempty_str(node: _Node) -> str:
    value = _str(node)
    if not value:
        raise node.error("must not be empty")
    return value


def _bool(node: _Node) -> bool:
    if not isinstance(node.value, bool):
        raise node.error(f"expected true or false, got {_show(node.value)}")
    return node.value


def _positive_number(node: _Node) -> float:
    v = node.value
    if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0 or v != v:
        raise node.error(f"expected a positive number, got {_show(v)}")
    if v == float("inf"):
        raise node.error("must be finite")
    return float(v)


def _nonneg_number(node: _Node) -> float:
    v = node.value
    if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0 or v == float("inf"):
        raise node.error(f"expected a number >= 0, got {_show(v)}")
    return float(v)


def _int_in(lo: int, hi: int) -> Callable[[_Node], int]:
    def parse(node: _Node) -> int:
        v = node.value
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise node.error(f"expected a whole number from {lo} to {hi}, got {_show(v)}")
        return v

    return parse


def _str_list(node: _Node) -> tuple[str, ...]:
    if not isinstance(node.value, list):
        raise node.error(f"expected a list, got {_show(node.value)}")
    return tuple(_nonempty_str(node.child(i)) for i in range(len(node.value)))


def _header_name(node: _Node) -> str:
    name = _nonempty_str(node)
    if not _TOKEN.match(name):
        raise node.error(f"not a valid header name: {_show(name)}")
    return name


def _expand_env(node: _Node, environ: Mapping[str, str]) -> object:
    """Replace ${VAR} / ${VAR:-default} in every string of the tree (in place)."""
    value = node.value
    if isinstance(value, str):

        def repl(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in environ:
                return environ[name]
            if default is not None:
                return default
            raise node.error(
                f"environment variable {name} is not set (and no ${{{name}:-default}})"
            )

        return _ENV_REF.sub(repl, value)
    if isinstance(value, dict):
        for key in list(value):
            value[key] = (
                _expand_env(node.child(key), environ) if isinstance(key, str) else value[key]
            )
        return value
    if isinstance(value, list):
        for i in range(len(value)):
            value[i] = _expand_env(node.child(i), environ)
        return value
    return value


_TOKEN_KEYS = (
    "tokens_per_minute",
    "tokens_per_day",
    "default_output_tokens",
    "max_output_reservation",
    "enforce",
)
# Far above any real budget, and small enough that token arithmetic in Redis's
# Lua numbers (doubles) stays exact to well below one token.
_MAX_TOKENS = 10**12


def _rate_limit(node: _Node) -> Limits:
    """One ``rate_limit`` block: requests, tokens, or both (README: Token budgets)."""
    m = node.mapping(
        ("requests_per_minute", "burst", "storage", "on_storage_error", *_TOKEN_KEYS)
    )
    requests = None
    if "requests_per_minute" in m or "burst" in m:
        for key in ("requests_per_minute", "burst"):
            if key not in m:
                raise node.error(f"missing key {key!r} (requests_per_minute and burst go together)")
        requests = RateLimitSettings(
            requests_per_minute=_positive_number(node.child("requests_per_minute")),
            burst=_int_in(1, 10**9)(node.child("burst")),
        )
    tokens = _token_budget(node, m)
    if requests is None and tokens is None:
        raise node.error(
            "set at least one of requests_per_minute (with burst), tokens_per_minute, "
            "tokens_per_day"
        )
    return Limits(requests, tokens)


def _token_budget(node: _Node, m: dict[str, Any]) -> TokenBudget | None:
    count = _int_in(1, _MAX_TOKENS)
    per_minute = node.opt("tokens_per_minute", count, None)
    per_day = node.opt("tokens_per_day", count, None)
    if per_minute is None and per_day is None:
        for key in _TOKEN_KEYS[2:]:
            if key in m:
                raise node.child(key).error("needs tokens_per_minute or tokens_per_day")
        return None
    d = TokenBudget(None, None)
    cap = d.max_output_reservation
    if "max_output_reservation" in m:  # present and null: no cap
        cap = node.opt("max_output_reservation", _int_in(0, _MAX_TOKENS), None)
    return TokenBudget(
        per_minute=per_minute,
        per_day=per_day,
        default_output_tokens=node.opt(
            "default_output_tokens", _int_in(0, _MAX_TOKENS), d.default_output_tokens
        ),
        max_output_reservation=cap,
        enforce=node.opt("enforce", _bool, d.enforce),
    )


def _network(node: _Node) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    text = _nonempty_str(node)
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise node.error(f"not an IP network: {_show(text)}") from None


def _networks(node: _Node) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if not isinstance(node.value, list):
        raise node.error(f"expected a list of networks, got {_show(node.value)}")
    return tuple(_network(node.child(i)) for i in range(len(node.value)))


def _cors(node: _Node) -> CorsSettings:
    node.mapping(("allow_origins", "max_age"))
    origins_node = node.child("allow_origins")
    if origins_node.value == "*":
        origins: tuple[str, ...] = ("*",)
    else:
        origins = _str_list(origins_node)
    return CorsSettings(allow_origins=origins, max_age=node.opt("max_age", _int_in(0, 86400), 600))


def _server(node: _Node) -> ServerSettings:
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
        host=node.opt("host", _nonempty_str, d.host),
        port=node.opt("port", _int_in(0, 65535), d.port),
        trusted_proxies=node.opt("trusted_proxies", _networks, d.trusted_proxies),
        max_body_bytes=node.opt("max_body_bytes", _int_in(1, 2**40), d.max_body_bytes),
        shutdown_grace_seconds=node.opt("shutdown_grace_seconds", _nonneg_number, 30.0),
        header_timeout=node.opt("header_timeout", _positive_number, d.header_timeout),
        body_idle_timeout=node.opt("body_idle_timeout", _positive_number, d.body_idle_timeout),
        body_timeout=node.opt("body_timeout", _positive_number, d.body_timeout),
        send_timeout=node.opt("send_timeout", _positive_number, d.send_timeout),
        keepalive_timeout=node.opt("keepalive_timeout", _positive_number, d.keepalive_timeout),
        cors=node.opt("cors", _cors, None),
    )


def _log(node: _Node) -> LogSettings:
    node.mapping(("format", "level", "access"))
    fmt = node.opt("format", _str, "text")
    if fmt not in ("text", "json"):
        raise node.child("format").error(f"expected text or json, got {_show(fmt)}")
    level = node.opt("level", _str, "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise node.child("level").error(f"not a log level: {_show(level)}")
    return LogSettings(
        format="json" if fmt == "json" else "text",
        level=level,
        access=node.opt("access", _bool, True),
    )


def _listen(node: _Node) -> tuple[str, int]:
    text = _nonempty_str(node)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise node.error(f"expected host:port, got {_show(text)}")
    return host.strip("[]"), int(port)


def _metrics(node: _Node) -> MetricsSettings:
    node.mapping(("enabled", "path", "listen"))
    path = node.opt("path", _nonempty_str, "/metrics")
    if not path.startswith("/"):
        raise node.child("path").error(f"must start with '/', got {_show(path)}")
    return MetricsSettings(
        enabled=node.opt("enabled", _bool, True),
        path=path,
        listen=node.opt("listen", _listen, None),
    )


def _headers(node: _Node) -> HeaderRewrite:
    node.mapping(("set", "remove"))
    pairs: list[tuple[str, Secret]] = []
    set_node = node.child("set")
    if set_node.value is not None:
        if not isinstance(set_node.value, dict):
            raise set_node.error(
                f"expected a mapping of header: value, got {_show(set_node.value)}"
            )
        for key in set_node.value:
            if not isinstance(key, str):
                raise set_node.error(f"header names must be strings, got {_show(key)}")
            _header_name(_Node(set_node.file, f"{set_node.path}.{key}", key))
            value = _str(set_node.child(key))
            if any(c in value for c in "\r\n\0"):
                raise set_node.child(key).error("header values must not contain CR, LF or NUL")
            pairs.append((key, Secret(value)))
    removed: tuple[str, ...] = node.opt("remove", _str_list, ())
    for i, name in enumerate(removed):
        _header_name(_Node(node.file, f"{node.path}.remove[{i}]", name))
    return HeaderRewrite(set=tuple(pairs), remove=frozenset(n.lower() for n in removed))


def _timeouts(node: _Node) -> Timeouts:
    node.mapping(("connect", "response", "idle"))
    d = Timeouts()
    return Timeouts(
        connect=node.opt("connect", _positive_number, d.connect),
        response=node.opt("response", _positive_number, d.response),
        idle=node.opt("idle", _positive_number, d.idle),
    )


def _retries(node: _Node) -> RetrySettings:
    node.mapping(("attempts", "backoff"))
    return RetrySettings(
        attempts=node.opt("attempts", _int_in(0, 10), 0),
        backoff=node.opt("backoff", _nonneg_number, 0.2),
    )


def _breaker(node: _Node) -> CircuitBreakerSettings:
    node.mapping(("failures", "cooldown"))
    return CircuitBreakerSettings(
        failures=node.opt("failures", _int_in(1, 10**6), 5),
        cooldown=node.opt("cooldown", _positive_number, 30.0),
    )


def _url(node: _Node) -> URL:
    text = _nonempty_str(node)
    try:
        url = URL(text)
    except (ValueError, TypeError):
        raise node.error(f"not a URL: {_show(text)}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise node.error(f"expected an http:// or https:// URL with a host, got {_show(text)}")
    if url.query_string or url.fragment or url.user or url.password:
        raise node.error("a base URL takes no query, fragment or credentials")
    return url.with_path(url.path.rstrip("/"))


def _upstream(name: str, node: _Node) -> Upstream:
    m = node.mapping(
        (
            "url",
            "headers",
            "timeouts",
            "pass_client_auth",
            "keep_response_headers",
            "retries",
            "circuit_breaker",
        )
    )
    if "url" not in m:
        raise node.error("missing key 'url'")
    keep: tuple[str, ...] = node.opt("keep_response_headers", _str_list, ())
    return Upstream(
        name=name,
        url=_url(node.child("url")),
        headers=node.opt("headers", _headers, HeaderRewrite()),
        timeouts=node.opt("timeouts", _timeouts, Timeouts()),
        pass_client_auth=node.opt("pass_client_auth", _bool, False),
        keep_response_headers=frozenset(k.lower() for k in keep),
        retries=node.opt("retries", _retries, RetrySettings()),
        circuit_breaker=node.opt("circuit_breaker", _breaker, CircuitBreakerSettings()),
    )


def _upstream_ref(node: _Node, known: Mapping[str, Upstream]) -> str:
    name = _nonempty_str(node)
    if name not in known:
        raise node.error(f"unknown upstream {name!r} (known: {', '.join(known) or 'none'})")
    return name


def _route_upstreams(
    node: _Node, known: Mapping[str, Upstream]
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
            weight = member.opt("weight", _int_in(1, 10**6), 1)
            weights.append((name, weight))
        names = tuple(n for n, _ in weights)
        if len(set(names)) != len(names):
            raise members.error("lists an upstream twice")
        return names, Balance(tuple(weights))
    raise node.error(
        f"expected an upstream name, a list of names or {{balance: [...]}}, got {_show(value)}"
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


def _route(index: int, node: _Node, known: Mapping[str, Upstream]) -> Route:
    m = node.mapping(_ROUTE_KEYS)
    if "upstream" not in m:
        raise node.error("missing key 'upstream'")
    upstreams, balance = _route_upstreams(node.child("upstream"), known)
    model = node.opt("model", _nonempty_str, None)
    path = node.opt("path", _nonempty_str, None)
    default = node.opt("default", _bool, False)
    discover = False
    if "models" in m:
        if m["models"] != "discover":
            raise node.child("models").error(
                f"the only value is 'discover', got {_show(m['models'])}"
            )
        discover = True
    selectors = [s for s in (model is not None, path is not None, default, discover) if s]
    if len(selectors) != 1:
        raise node.error(
            "needs exactly one of 'model', 'path', 'default: true' or 'models: discover'"
        )
    prefix = node.opt("prefix", _str, "")
    if prefix and not discover:
        raise node.child("prefix").error("'prefix' goes with 'models: discover'")
    rewrite = node.opt("rewrite_model", _nonempty_str, None)
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
        rate_limit=node.opt("rate_limit", _rate_limit, None),
        fallback_on_timeout=node.opt("fallback_on_timeout", _bool, False),
        discover=discover,
        prefix=prefix,
    )


def _auth_key(index: int, node: _Node, known_names: set[str]) -> AuthKey:
    m = node.mapping(("name", "key", "sha256", "models", "rate_limit"))
    if "name" not in m:
        raise node.error("missing key 'name'")
    name = _nonempty_str(node.child("name"))
    if name in known_names:
        raise node.child("name").error(f"duplicate key name {name!r}")
    known_names.add(name)
    has_key, has_digest = m.get("key") is not None, m.get("sha256") is not None
    if has_key == has_digest:
        raise node.error("needs exactly one of 'key' or 'sha256'")
    if has_key:
        key = _nonempty_str(node.child("key"))
        if len(key) < 8:
            # Do not quote it: it is a secret.
            raise node.child("key").error("a proxy key must be at least 8 characters")
        digest = hashlib.sha256(key.encode()).digest()
    else:
        hex_digest = _nonempty_str(node.child("sha256")).lower()
        if not re.fullmatch(r"[0-9a-f]{64}", hex_digest):
            raise node.child("sha256").error("expected 64 hex digits")
        digest = bytes.fromhex(hex_digest)
    models = node.opt("models", _str_list, None)
    return AuthKey(
        name=name,
        sha256=digest,
        models=models,
        rate_limit=node.opt("rate_limit", _rate_limit, None),
    )


_TOP_KEYS = ("server", "log", "metrics", "rate_limit", "auth", "upstreams", "routes")


def parse_settings(
    data: object, source: str = "routes.yaml", environ: Mapping[str, str] | None = None
) -> Settings:
    """Validate an already-loaded YAML tree. Raises only :class:`ConfigError`."""
    root = _Node(source, "", data)
    if data is None:
        raise root.error("the file is empty")
    root.mapping(_TOP_KEYS)
    _expand_env(root, os.environ if environ is None else environ)

    upstreams_node = root.child("upstreams")
    if not isinstance(upstreams_node.value, dict) or not upstreams_node.value:
        raise upstreams_node.error("expected a mapping of at least one upstream")
    upstreams: dict[str, Upstream] = {}
    for name in upstreams_node.value:
        if not isinstance(name, str) or not name:
            raise upstreams_node.error(f"upstream names must be strings, got {_show(name)}")
        upstreams[name] = _upstream(name, upstreams_node.child(name))

    routes_node = root.child("routes")
    if not isinstance(routes_node.value, list) or not routes_node.value:
        raise routes_node.error("expected a list of at least one route")
    routes = tuple(
        _route(i, routes_node.child(i), upstreams) for i in range(len(routes_node.value))
    )
    if sum(1 for r in routes if r.default) > 1:
        raise routes_node.error("only one route may be 'default: true'")

    rate_node = root.child("rate_limit")
    rate_limit = None
    storage = None
    fail_open = True
    if rate_node.value is not None:
        rate_limit = _rate_limit(rate_node)
        storage = rate_node.opt("storage", _nonempty_str, None)
        if storage is not None and storage != "memory":
            if not storage.startswith(("redis://", "rediss://", "unix://")):
                raise rate_node.child("storage").error(
                    "expected 'memory' or a redis://host:port/db URL"
                )
        else:
            storage = None
        mode = rate_node.opt("on_storage_error", _str, "open")
        if mode not in ("open", "closed"):
            raise rate_node.child("on_storage_error").error(
                f"expected open or closed, got {_show(mode)}"
            )
        fail_open = mode == "open"

    auth_keys: tuple[AuthKey, ...] = ()
    auth_node = root.child("auth")
    if auth_node.value is not None:
        auth_node.mapping(("keys",))
        keys_node = auth_node.child("keys")
        if not isinstance(keys_node.value, list):
            raise keys_node.error("expected a list of keys")
        names: set[str] = set()
        auth_keys = tuple(
            _auth_key(i, keys_node.child(i), names) for i in range(len(keys_node.value))
        )

    return Settings(
        source=source,
        server=root.opt("server", _server, ServerSettings()),
        log=root.opt("log", _log, LogSettings()),
        metrics=root.opt("metrics", _metrics, MetricsSettings()),
        rate_limit=rate_limit,
        rate_limit_storage=storage,
        rate_limit_fail_open=fail_open,
        upstreams=upstreams,
        routes=routes,
        auth_keys=auth_keys,
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (YAML 1.2 says they are an error)."""


def _construct_mapping(
    loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "unhashable mapping key", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_settings(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
) -> Settings:
    """Read, expand and validate a routes file. Raises only :class:`ConfigError`."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{source}: cannot read: {exc.strerror if isinstance(exc, OSError) else exc}"
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    return parse_settings(data, source, environ)
