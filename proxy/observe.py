"""What one exchange looked like, and where that record goes (access log, metrics).

:class:`Exchange` is filled in along the request path; :class:`Observer` turns
it into one access-log line when the response has ended (streams included)
and into metrics. Nothing here runs per chunk.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from .config import LogSettings

__all__ = ["Exchange", "Observer"]

access_logger = logging.getLogger("oaimux.access")


@dataclass(slots=True)
class Exchange:
    """The record of one request. Never holds a body, a header value or a key."""

    request_id: str
    method: str
    path: str
    client: str
    started: float = field(default_factory=time.perf_counter)
    started_wall: float = field(default_factory=time.time)
    key_name: str | None = None
    model: str | None = None
    upstream_model: str | None = None
    route: str | None = None
    upstream: str | None = None
    tried: list[str] = field(default_factory=list)
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    ttfb: float | None = None
    duration: float | None = None
    outcome: str = "complete"  # complete | client_gone | upstream_reset | idle_timeout | error
    error_code: str | None = None
    streaming: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tail: bytes = b""  # the last response chunk, for reading the usage object


class Observer:
    """Receives exchanges; writes the access log. Metrics hook in here too."""

    def __init__(self, log: LogSettings) -> None:
        self.log = log

    def finished(self, ex: Exchange) -> None:
        ex.duration = time.perf_counter() - ex.started
        if self.log.access and access_logger.isEnabledFor(logging.INFO):
            access_logger.info("%s", self.format(ex))

    def format(self, ex: Exchange) -> str:
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ex.started_wall))
            + f".{int(ex.started_wall % 1 * 1000):03d}Z",
            "request_id": ex.request_id,
            "client": ex.client,
            "key": ex.key_name,
            "method": ex.method,
            "path": ex.path,
            "model": ex.model,
            "target": ex.upstream_model,
            "upstream": ex.upstream,
            "tried": ex.tried,
            "status": ex.status,
            "bytes_in": ex.bytes_in,
            "bytes_out": ex.bytes_out,
            "ttfb_ms": None if ex.ttfb is None else round(ex.ttfb * 1000, 2),
            "duration_ms": None if ex.duration is None else round(ex.duration * 1000, 2),
            "outcome": ex.outcome,
            "error": ex.error_code,
            "prompt_tokens": ex.prompt_tokens,
            "completion_tokens": ex.completion_tokens,
        }
        if self.log.format == "json":
            return json.dumps(record, separators=(",", ":"))
        return " ".join(
            f"{k}={'-' if v is None else (','.join(v) or '-') if isinstance(v, list) else v}"
            for k, v in record.items()
        )

    def rate_limited(self, ex: Exchange) -> None:
        """A request refused by the limiter (metrics hook)."""

    def upstream_failure(self, upstream: str, kind: str) -> None:
        """An attempt at ``upstream`` failed before any response byte (metrics hook)."""

    def fallback(self, from_upstream: str, to_upstream: str) -> None:
        """A request moved on from one upstream to the next (metrics hook)."""

    def breaker_changed(self, upstream: str, state: str) -> None:
        """A circuit breaker changed state (metrics hook)."""
