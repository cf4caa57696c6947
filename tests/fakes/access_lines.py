"""Catch the proxy's log lines in a test, and parse access lines (text and JSON).

``LogLines`` is a logging handler: a test awaits ``wait_for(n)`` (an event, not
a sleep) until n access lines were written. Every other record, at every
level, is kept too, so a test can grep all of them for secrets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["LogLines", "capture_logs", "parse_text_line"]

_PAIR = re.compile(r'([a-z_]+)=("(?:[^"\\]|\\.)*"|[^ "]*)(?: |$)')


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.access: list[str] = []
        self.everything: list[str] = []
        self._written = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.everything.append(text)
        if record.name == "oaimux.access":
            self.access.append(text)
            self._written.set()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[str]:
        """Wait until at least ``count`` access lines were written; return them all."""
        async with asyncio.timeout(timeout):
            while len(self.access) < count:
                self._written.clear()
                await self._written.wait()
        return self.access


@contextmanager
def capture_logs() -> Iterator[LogLines]:
    """Every record of every logger, at DEBUG, for the duration."""
    lines = LogLines()
    root = logging.getLogger()
    saved = root.level
    root.addHandler(lines)
    root.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        root.removeHandler(lines)
        root.setLevel(saved)


def parse_text_line(line: str) -> dict[str, Any]:
    """``key=value`` pairs of a text access line; quoted values are JSON strings.

    Fails unless the whole line is made of such pairs (a forged field would break it).
    """
    assert "\n" not in line and "\r" not in line, line
    fields: dict[str, Any] = {}
    pos = 0
    for match in _PAIR.finditer(line):
        assert match.start() == pos, f"unparsable at {pos}: {line!r}"
        key, value = match.group(1), match.group(2)
        assert key not in fields, f"field {key} twice: {line!r}"
        fields[key] = json.loads(value) if value.startswith('"') else value
        pos = match.end()
    assert pos == len(line), f"unparsable tail at {pos}: {line!r}"
    return fields
