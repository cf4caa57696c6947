"""The plain flags the hot path reads instead of asking objects per request."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import parse_settings
from proxy.runtime.runtime import build_runtime

LIMIT = {"requests_per_minute": 60, "burst": 5}


def flags(**extra: Any) -> tuple[bool, bool, bool, bool]:
    config: dict[str, Any] = {
        "upstreams": {"u": {"url": "http://127.0.0.1:9/v1"}},
        "routes": [{"model": "*", "upstream": "u"}],
    }
    config.update(extra)
    rt = build_runtime(parse_settings(config, environ={}))
    return rt.limited, rt.route_limited, rt.keyed, rt.trusts_proxies


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, (False, False, False, False)),
        ({"rate_limit": LIMIT}, (True, False, False, False)),
        (
            {"routes": [{"model": "*", "upstream": "u", "rate_limit": LIMIT}]},
            (True, True, False, False),
        ),
        (
            {"auth": {"keys": [{"name": "a", "key": "sk-a-00000001", "rate_limit": LIMIT}]}},
            (True, False, True, False),
        ),
        ({"auth": {"keys": [{"name": "a", "key": "sk-a-00000001"}]}}, (False, False, True, False)),
        ({"server": {"trusted_proxies": ["127.0.0.1/32"]}}, (False, False, False, True)),
    ],
)
def test_flags_follow_the_configuration(
    extra: dict[str, Any], expected: tuple[bool, bool, bool, bool]
) -> None:
    assert flags(**extra) == expected
