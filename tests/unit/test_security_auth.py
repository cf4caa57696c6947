"""Proxy keys: how a key is presented, stored, compared and limited to models."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.admission import proxy_keys as auth
from proxy.admission.proxy_keys import KeyTable, presented_key
from proxy.config import AuthKey, ConfigError, parse_settings


def headers(**items: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in items.items()}))


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"Authorization": "Bearer sk-team-a-0001"}, "sk-team-a-0001"),
        ({"Authorization": "bearer   sk-team-a-0001  "}, "sk-team-a-0001"),
        ({"api_key": "sk-team-a-0001"}, "sk-team-a-0001"),  # Azure-style clients
        ({"Authorization": "Basic dXNlcjpwYXNz"}, None),
        ({"Authorization": "Bearer "}, None),
        ({"Authorization": "Bearer"}, None),
        ({}, None),
        # Authorization wins: a client sending both means the bearer token.
        ({"Authorization": "Bearer one-key-0001", "api_key": "two-key-0002"}, "one-key-0001"),
        # Anthropic-style clients (the SDKs, Claude Code).
        ({"x_api_key": "sk-team-a-0001"}, "sk-team-a-0001"),
        ({"x_api_key": "  "}, None),
        # Authorization, then api-key, then x-api-key: the first present decides.
        ({"Authorization": "Bearer one-key-0001", "x_api_key": "two-key-0002"}, "one-key-0001"),
        ({"api_key": "one-key-0001", "x_api_key": "two-key-0002"}, "one-key-0001"),
        ({"api_key": "", "x_api_key": "two-key-0002"}, None),
        ({"Authorization": "Bearer", "x_api_key": "two-key-0002"}, None),
        # Browsers cannot set headers on a WebSocket; the SDKs offer the key as
        # a subprotocol on the realtime handshake.
        (
            {
                "Sec-WebSocket-Protocol": "realtime, openai-insecure-api-key.pk-web-01, openai-beta.v1"
            },
            "pk-web-01",
        ),
        ({"Sec-WebSocket-Protocol": "realtime, openai-insecure-api-key."}, None),
        ({"Sec-WebSocket-Protocol": "realtime"}, None),
        (
            {
                "Authorization": "Bearer one-key-0001",
                "Sec-WebSocket-Protocol": "openai-insecure-api-key.x",
            },
            "one-key-0001",
        ),
    ],
)
def test_presented_key(given: dict[str, str], expected: str | None) -> None:
    assert presented_key(headers(**given)) == expected


def config(*keys: dict[str, Any]) -> dict[str, Any]:
    return {
        "upstreams": {"u": {"url": "http://127.0.0.1:9/v1"}},
        "routes": [{"model": "*", "upstream": "u"}],
        "auth": {"keys": list(keys)},
    }


def test_keys_are_kept_only_as_digests() -> None:
    plain = "sk-plain-team-key-42"
    digest = hashlib.sha256(b"sk-digest-team-key-43").hexdigest()
    settings = parse_settings(
        config({"name": "a", "key": plain}, {"name": "b", "sha256": digest.upper()}), environ={}
    )
    a, b = settings.auth_keys
    assert a.sha256 == hashlib.sha256(plain.encode()).digest()
    assert b.sha256 == bytes.fromhex(digest)
    # Nothing that prints a settings object can show a key.
    assert plain not in repr(settings) and digest not in repr(settings).lower()
    table = KeyTable(settings.auth_keys)
    assert table.authenticate(plain) is a
    assert table.authenticate("sk-digest-team-key-43") is b
    assert table.authenticate(digest) is None  # the digest itself is not a key
    assert table.authenticate("sk-plain-team-key-4") is None
    assert table.authenticate(None) is None


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"name": "a"}, "needs exactly one of 'key' or 'sha256'"),
        ({"name": "a", "key": "sk-long-enough", "sha256": "0" * 64}, "exactly one"),
        ({"name": "a", "key": "short"}, "at least 8 characters"),
        ({"name": "a", "sha256": "xyz"}, "64 hex digits"),
    ],
)
def test_bad_key_entries_are_refused_without_quoting_the_key(
    entry: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_settings(config(entry), environ={})
    assert problem in str(err.value)
    if "key" in entry:
        assert entry["key"] not in str(err.value)


def test_comparison_touches_every_key_whichever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Constant time: the work done does not depend on which key matched, if any."""
    keys = [
        AuthKey(f"k{i}", hashlib.sha256(f"sk-key-number-{i}".encode()).digest()) for i in range(8)
    ]
    table = KeyTable(keys)
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(len(a) + len(b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for presented in ("sk-key-number-0", "sk-key-number-7", "sk-wrong", "x" * 500):
        calls.clear()
        table.authenticate(presented)
        # Every configured digest is compared, always on 32-byte digests (the
        # length of what was presented never reaches the comparison).
        assert calls == [64] * len(keys)


@pytest.mark.parametrize(
    ("models", "model", "allowed"),
    [
        (None, "anything", True),
        (("gpt-4o*",), "gpt-4o-mini", True),
        (("gpt-4o*",), "gpt-4", False),
        (("gpt-4o*",), "GPT-4O-mini", False),  # case matters, as in the routing table
        (("a", "meta-llama/*"), "meta-llama/Llama-3", True),
        ((), "gpt-4o", False),
    ],
)
def test_model_allow_list(models: tuple[str, ...] | None, model: str, allowed: bool) -> None:
    key = AuthKey("k", b"\0" * 32, models=models)
    assert KeyTable.allows(key, model) is allowed
