"""Errors on Anthropic's paths: Anthropic's shape, for every error the proxy can make."""

from __future__ import annotations

import json

import pytest

from proxy import errors
from proxy.errors import ANTHROPIC_ERROR_TYPES, ProxyError, anthropic_path, error_response


def _every_error_class() -> list[type[ProxyError]]:
    found: list[type[ProxyError]] = [ProxyError]
    for kind in found:
        found.extend(kind.__subclasses__())
    return found


@pytest.mark.parametrize("kind", _every_error_class(), ids=lambda k: k.__name__)
def test_every_error_status_has_an_anthropic_type(kind: type[ProxyError]) -> None:
    """A new error class with a status of its own must be given a type in the table."""
    assert kind.status in ANTHROPIC_ERROR_TYPES


@pytest.mark.parametrize(
    ("path", "anthropic"),
    [
        ("/v1/messages", True),
        ("/messages", True),
        ("/v1/messages/count_tokens", True),
        ("/messages/batches/msgbatch_1", True),
        ("/v1/messagesx", False),
        ("/v1/chat/completions", False),
        ("/v1/responses", False),
        ("/v2/messages", False),
        ("", False),
    ],
)
def test_anthropic_paths(path: str, anthropic: bool) -> None:
    assert anthropic_path(path) is anthropic


def test_rendered_in_anthropics_shape_with_our_code_and_headers() -> None:
    err = errors.RateLimited("slow down", headers={"Retry-After": "3"})
    resp = error_response(err, "/v1/messages")
    assert resp.status == 429
    assert resp.headers["x-oaimux-error"] == "rate_limit_exceeded"
    assert resp.headers["Retry-After"] == "3"
    assert isinstance(resp.body, bytes)
    assert json.loads(resp.body) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "slow down"},
    }


def test_elsewhere_rendered_as_openais() -> None:
    resp = error_response(errors.UpstreamTimeout("late"), "/v1/chat/completions")
    assert isinstance(resp.body, bytes)
    assert json.loads(resp.body) == {
        "error": {"message": "late", "type": "api_error", "param": None, "code": "upstream_timeout"}
    }
