"""routes.yaml loading: valid files parse into typed objects; every problem names
the file, the key path and the value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import ConfigError, load_settings, parse_settings

BASE: dict[str, Any] = {
    "upstreams": {"a": {"url": "http://127.0.0.1:9/v1"}},
    "routes": [{"model": "m", "upstream": "a"}],
}


def with_(**changes: Any) -> dict[str, Any]:
    import copy

    config = copy.deepcopy(BASE)
    config.update(changes)
    return config


def test_shipped_routes_yaml_loads_without_environment() -> None:
    settings = load_settings(Path(__file__).parents[2] / "routes.yaml", environ={})
    assert settings.server.port == 8080
    assert [r.model for r in settings.routes] == ["demo", "demo-alias"]
    assert settings.routes[1].rewrite_model == "demo"
    assert list(settings.upstreams) == ["demo"]
    assert settings.upstreams["demo"].builtin == "demo"
    assert settings.server.max_body_bytes == 33554432


def test_the_shipped_real_use_example_loads_once_uncommented() -> None:
    """The commented openai/local upstreams and routes are a working config."""
    text = (Path(__file__).parents[2] / "routes.yaml").read_text()
    # "  # key: value" -> "  key: value": what a user does in an editor.
    uncommented = "\n".join(
        "  " + line[4:] if line.startswith("  # ") else line for line in text.splitlines()
    )
    settings = parse_settings(yaml.safe_load(uncommented), environ={"OPENAI_API_KEY": "sk-example"})
    assert list(settings.upstreams) == ["demo", "openai", "local"]
    assert [r.model for r in settings.routes] == [
        "demo",
        "demo-alias",
        "gpt-4o-mini",
        "llama3*",
        "fast",
        "gpt-4o",
    ]
    assert settings.routes[5].upstreams == ("openai", "local")
    assert settings.routes[4].rewrite_model == "llama3.2:3b"
    assert settings.upstreams["openai"].injects_credential


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        ({"builtin": "demo", "url": "http://127.0.0.1:1/v1"}, "takes 'url' or 'builtin', not both"),
        ({"builtin": "ollama"}, "unknown builtin 'ollama' (known: demo)"),
        ({}, "missing key 'url' (or 'builtin: demo'"),
    ],
)
def test_builtin_upstream_errors(upstream: dict[str, object], message: str) -> None:
    config = {"upstreams": {"a": upstream}, "routes": [{"model": "x", "upstream": "a"}]}
    with pytest.raises(ConfigError) as info:
        parse_settings(config, "routes.yaml", environ={})
    assert str(info.value).startswith("routes.yaml: upstreams.a"), info.value
    assert message in str(info.value)


def test_env_expansion_and_default() -> None:
    config = with_(
        upstreams={
            "a": {
                "url": "${BASE:-http://127.0.0.1:9}/v1",
                "headers": {"set": {"Authorization": "Bearer ${KEY}"}},
            }
        }
    )
    settings = parse_settings(config, environ={"KEY": "sk-123"})
    up = settings.upstreams["a"]
    assert str(up.url) == "http://127.0.0.1:9/v1"
    assert up.headers.set[0][1].value == "Bearer sk-123"
    # The secret never shows in a repr.
    assert "sk-123" not in repr(settings)


def test_unset_variable_names_variable_and_key_path() -> None:
    config = with_(
        upstreams={
            "a": {"url": "http://x/v1", "headers": {"set": {"Authorization": "Bearer ${NOPE}"}}}
        }
    )
    with pytest.raises(ConfigError) as err:
        parse_settings(config, "f.yaml", environ={})
    assert "NOPE" in str(err.value)
    assert "f.yaml: upstreams.a.headers.set.Authorization" in str(err.value)


@pytest.mark.parametrize(
    ("config", "where", "what"),
    [
        (
            with_(routes=[{"model": "m", "upstream": "nope"}]),
            "routes[0].upstream",
            "unknown upstream 'nope'",
        ),
        (
            with_(
                routes=[{"model": "m", "upstream": "a"}, {"model": "x", "upstream": ["a", "zz"]}]
            ),
            "routes[1].upstream[1]",
            "unknown upstream 'zz'",
        ),
        (with_(upstreams={"a": {"url": "ftp://x"}}), "upstreams.a.url", "http"),
        (with_(upstreams={"a": {"url": "not a url"}}), "upstreams.a.url", "http"),
        (
            with_(upstreams={"a": {"url": "http://x", "tiemouts": {}}}),
            "upstreams.a",
            "unknown key 'tiemouts'",
        ),
        (with_(server={"port": "80"}), "server.port", "whole number"),
        (with_(server={"max_body_bytes": -1}), "server.max_body_bytes", "whole number"),
        (with_(server={"send_timeout": 0}), "server.send_timeout", "positive number, got 0"),
        (with_(server={"send_timeout": "60s"}), "server.send_timeout", "got '60s'"),
        (with_(server={"body_timeout": -5}), "server.body_timeout", "positive number, got -5"),
        (with_(server={"body_timeout": float("inf")}), "server.body_timeout", "finite"),
        (
            with_(server={"trusted_proxies": ["10.0.0.0/33"]}),
            "server.trusted_proxies[0]",
            "not an IP network",
        ),
        (
            with_(rate_limit={"requests_per_minute": 0, "burst": 5}),
            "rate_limit.requests_per_minute",
            "positive",
        ),
        (with_(rate_limit={"burst": 5}), "rate_limit", "requests_per_minute"),
        (with_(routes=[{"upstream": "a"}]), "routes[0]", "exactly one of"),
        (with_(routes=[]), "routes", "at least one route"),
        (with_(upstreams={}), "upstreams", "at least one upstream"),
        (with_(log={"format": "xml"}), "log.format", "text or json"),
        (with_(extra=1), "(top level)", "unknown key 'extra'"),
        (
            with_(upstreams={"a": {"url": "http://x", "timeouts": {"idle": 0}}}),
            "upstreams.a.timeouts.idle",
            "positive",
        ),
        (
            with_(upstreams={"a": {"url": "http://x", "headers": {"set": {"Bad Name": "v"}}}}),
            "upstreams.a.headers.set.Bad Name",
            "header name",
        ),
    ],
)
def test_errors_name_key_path(config: dict[str, Any], where: str, what: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_settings(config, "routes.yaml", environ={})
    message = str(err.value)
    assert message.startswith(f"routes.yaml: {where}:"), message
    assert what in message


def test_slow_client_bounds_default_and_parse() -> None:
    default = parse_settings(with_(), environ={}).server
    assert (default.send_timeout, default.body_timeout) == (60.0, 300.0)
    server = parse_settings(
        with_(server={"send_timeout": 5, "body_timeout": 0.5}), environ={}
    ).server
    assert (server.send_timeout, server.body_timeout) == (5.0, 0.5)


def test_load_settings_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_settings(bad)
    dup = tmp_path / "dup.yaml"
    dup.write_text("upstreams: {a: {url: 'http://x'}}\nupstreams: {}\nroutes: []\n")
    with pytest.raises(ConfigError, match="duplicate key 'upstreams'"):
        load_settings(dup)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_settings(empty)


def test_route_forms() -> None:
    config = with_(
        upstreams={"a": {"url": "http://x/v1"}, "b": {"url": "https://y/v1/"}},
        routes=[
            {"model": "m", "upstream": {"balance": [{"name": "a", "weight": 3}, {"name": "b"}]}},
            {"path": "/v1/files*", "upstream": "a"},
            {"models": "discover", "upstream": "b", "prefix": "local/"},
            {"default": True, "upstream": "b"},
        ],
    )
    settings = parse_settings(config, environ={})
    balance, files, discover, default = settings.routes
    assert balance.balance is not None and balance.balance.weights == (("a", 3), ("b", 1))
    assert files.path == "files*"
    assert discover.discover and discover.prefix == "local/"
    assert default.default
    assert str(settings.upstreams["b"].url) == "https://y/v1"
