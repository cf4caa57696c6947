"""The ``error`` event of a refused Responses WebSocket (README, "Codex CLI")
carries the same error object as an HTTP error body."""

from __future__ import annotations

import json

from proxy.errors import RateLimited, error_event, error_response, model_not_found


def test_event_wraps_the_http_error_object_with_its_status() -> None:
    for err in (model_not_found("gpt-x"), RateLimited("Slow down.", param="requests")):
        event = json.loads(error_event(err))
        body = error_response(err).body
        assert isinstance(body, bytes)
        assert event == {"type": "error", "status": err.status, **json.loads(body)}
