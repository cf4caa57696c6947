"""Fixtures and helpers for the resilience tests: fault servers, a proxy in front
of them, the access log as records, and leak accounting.

Bind the fixtures in a test module with ``faults = fixtures.faults`` (an
assignment, not an import, so linters do not take the test arguments of the
same name for redefinitions).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from tests.faults.server import Behaviour, FaultServer

__all__ = [
    "JSON",
    "AccessLog",
    "FaultFactory",
    "access_log",
    "chat_body",
    "faults",
    "route_config",
    "task_count",
]

JSON = {"Content-Type": "application/json"}

FaultFactory = Callable[..., Awaitable[FaultServer]]


def chat_body(stream: bool = False, model: str = "m", filler: str = "") -> bytes:
    """A chat request; ``filler`` pads it (to check re-sent bytes are identical)."""
    return json.dumps(
        {
            "model": model,
            "stream": stream,
            "messages": [{"role": "user", "content": "hello " + filler}],
        },
        separators=(",", ":"),
    ).encode()


def route_config(
    upstreams: dict[str, str | dict[str, Any]], upstream: Any, **route: Any
) -> dict[str, Any]:
    """A config with one route for model ``m``; access log as JSON lines."""
    return {
        "log": {"format": "json"},
        "upstreams": {
            name: ({"url": spec} if isinstance(spec, str) else spec)
            for name, spec in upstreams.items()
        },
        "routes": [{"model": "m", "upstream": upstream, **route}],
    }


@pytest.fixture
async def faults() -> AsyncIterator[FaultFactory]:
    """``await faults(*script, default=None)`` starts a :class:`FaultServer`."""
    servers: list[FaultServer] = []

    async def make(*script: Behaviour, default: Behaviour | None = None) -> FaultServer:
        server = await FaultServer(default).then(*script).start()
        servers.append(server)
        return server

    yield make
    while servers:
        await servers.pop().close()


class AccessLog(logging.Handler):
    """The proxy's access log (JSON format) as a list of dicts."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(json.loads(record.getMessage()))

    def find(self, request_id: str) -> dict[str, Any] | None:
        for rec in self.records:
            if rec["request_id"] == request_id:
                return rec
        return None

    async def wait_for(self, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """The record of ``request_id``, once written (bounded polling)."""
        async with asyncio.timeout(timeout):
            while (rec := self.find(request_id)) is None:
                await asyncio.sleep(0.01)
        return rec


@pytest.fixture
def access_log() -> Iterator[AccessLog]:
    logger = logging.getLogger("oaimux.access")
    handler = AccessLog()
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def task_count() -> int:
    """Tasks alive in the running loop (the proxy under test shares it)."""
    return len(asyncio.all_tasks())
