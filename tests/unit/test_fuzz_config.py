"""Property tests: the config loader raises only ConfigError, whatever the tree or the text.

Trees are grown from the schema's own vocabulary (so they reach deep into
the validators) with arbitrary YAML-like values in every slot, and valid
configs are mutated one path at a time. ``load_settings`` is also fed
arbitrary text, since YAML itself has sharp edges (aliases, tags, recursion).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.config import ConfigError, Settings, load_settings, parse_settings

FUZZ = settings(
    max_examples=int(os.environ.get("OAIMUX_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

KEYS = [
    "server", "log", "metrics", "rate_limit", "auth", "upstreams", "routes",
    "host", "port", "trusted_proxies", "max_body_bytes", "shutdown_grace_seconds",
    "header_timeout", "body_idle_timeout", "body_timeout", "send_timeout", "keepalive_timeout",
    "cors", "allow_origins",
    "max_age", "format", "level", "access", "enabled", "path", "listen",
    "requests_per_minute", "burst", "storage", "on_storage_error", "keys", "name", "key",
    "sha256", "models", "url", "headers", "set", "remove", "timeouts", "connect",
    "response", "idle", "pass_client_auth", "keep_response_headers", "retries",
    "attempts", "backoff", "circuit_breaker", "failures", "cooldown", "model", "default",
    "upstream", "rewrite_model", "fallback_on_timeout", "prefix", "balance", "weight",
    "a", "u", "Authorization",
]  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(
        [
            "http://127.0.0.1:9/v1", "https://api.example/v1", "ftp://x", "http://",
            "redis://127.0.0.1:6379/0", "memory", "discover", "*", "gpt-4o*", "json", "text",
            "DEBUG", "open", "closed", "127.0.0.1/32", "::1/128", "10.0.0.0/8", "0.0.0.0:9090",
            "${HOME}", "${NOT_SET_ANYWHERE}", "${NOT_SET:-fallback}", "${", "$", "a" * 64,
            "0" * 64, "http://u:p@h/v1?x=1#f", "\r\n", "\x00",
        ]
    )
)  # fmt: skip
keys = st.sampled_from(KEYS) | st.text(max_size=6) | st.integers() | st.none() | st.booleans()
trees = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=40,
)

VALID: dict[str, Any] = {
    "server": {"port": 8080, "cors": {"allow_origins": ["https://a.example"]}},
    "log": {"format": "json"},
    "rate_limit": {"requests_per_minute": 60, "burst": 10},
    "auth": {"keys": [{"name": "a", "key": "pk-0123456789", "models": ["gpt-4o*"]}]},
    "upstreams": {
        "u": {
            "url": "http://127.0.0.1:9/v1",
            "headers": {"set": {"Authorization": "Bearer ${KEY:-sk-x}"}, "remove": ["X-A"]},
            "retries": {"attempts": 2},
        }
    },
    "routes": [
        {"model": "gpt-4o*", "upstream": "u"},
        {"path": "files*", "upstream": ["u"]},
        {"default": True, "upstream": {"balance": [{"name": "u", "weight": 2}]}},
    ],
}


def paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            found += paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            found += paths(v, (*prefix, i))
    return found


@st.composite
def mutated_valid(draw: st.DrawFn) -> Any:
    tree = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths(tree)))
        if not where:
            return draw(trees)
        parent = tree
        for step in where[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        last = where[-1]
        if action == "replace":
            parent[last] = draw(trees)
        elif action == "delete":
            del parent[last]
        elif isinstance(parent[last], dict):
            parent[last][draw(keys)] = draw(trees)
        elif isinstance(parent[last], list):
            parent[last].append(draw(trees))
    return tree


def test_the_valid_base_is_valid() -> None:
    assert isinstance(parse_settings(copy.deepcopy(VALID), environ={}), Settings)


@FUZZ
@given(trees | st.dictionaries(st.sampled_from(KEYS[:7]), trees, max_size=7) | mutated_valid())
@example(
    {"upstreams": {"u": {"url": "http://h/v1"}}, "routes": [{"model": "x", "upstream": "u"}] * 2}
)
@example({"upstreams": {1: {"url": "http://h/v1"}}, "routes": []})
@example(
    {"upstreams": {"u": {"url": "http://[::1/v1"}}, "routes": [{"model": "x", "upstream": "u"}]}
)
def test_parse_settings_raises_only_config_error(tree: Any) -> None:
    try:
        result = parse_settings(tree, environ={"HOME": "/h", "KEY": "sk-k"})
    except ConfigError as err:
        assert str(err).startswith("routes.yaml: ")
        return
    assert isinstance(result, Settings)
    assert result.upstreams and result.routes


yaml_text = st.text(
    alphabet=st.sampled_from(
        list("abc:-[]{}&*!|>'\"#%@`,?\n \t0123456789.${}\\") + ["\x00", "\ufeff", "é"]
    ),
    max_size=120,
)


@FUZZ
@given(
    yaml_text
    | st.sampled_from(
        [
            "a: &x [*x]",
            "a: !!python/object/apply:os.system ['true']",
            "[" * 5000,
            "{a: 1, a: 2}",
            "? [a, b]\n: c",
            "upstreams: {u: {url: http://h/v1}}\nroutes: [{model: x, upstream: u}]\n",
            "\xff\xfe",
        ]
    )
)
def test_load_settings_raises_only_config_error(tmp_path_factory: Any, text: str) -> None:
    path = Path(tmp_path_factory.mktemp("cfg")) / "routes.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        result = load_settings(path, environ={})
    except ConfigError as err:
        assert str(err).startswith(str(path))
        return
    assert isinstance(result, Settings)
