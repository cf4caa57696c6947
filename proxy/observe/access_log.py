"""The access log: one line per exchange, its two formats, and its cheap way out.

:class:`AccessLines` writes an :class:`~.exchange.Exchange` as one ``key=value``
line (logfmt, ``log.format: text``) or one JSON object (``log.format: json``),
with the same fields (README, "Access log"). The line goes out through the
``oaimux.access`` logger, as an :class:`AccessRecord` made without
``LogRecord``'s cost, or, in a server (:func:`send_access_log_to`), straight
to a :class:`BufferedLineHandler` that writes a loop turn's lines at once.
Client-chosen strings (path, model, key name) are quoted and clipped, so no
value can forge a field or a line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _encode_string
from typing import TextIO

from ..errors import clip
from .exchange import Exchange

__all__ = [
    "AccessLines",
    "AccessRecord",
    "BufferedLineHandler",
    "access_logger",
    "direct_sink",
    "send_access_log_to",
]

access_logger = logging.getLogger("oaimux.access")

# Values written bare in the text format: printable ASCII without space, '"' or '\'.
_BARE = re.compile(r"[!#-\[\]-~]+")
_MAX_LOGGED = 200  # characters of a client-chosen string (path, model) in the log
_NO_USAGE = (None, None, None, None, 0)  # the usage fields of an answer that reported none
_SEGMENTS = 1024  # remembered (client, key, method, path, model, target, upstream) parts


class AccessRecord(logging.LogRecord):
    """The log record of one access line, made cheaply.

    ``LogRecord.__init__`` (with ``Logger.info`` walking the stack for the
    caller) costs more than the whole line's formatting, once per request;
    an access line has no caller, thread or exception to record, so the
    attributes are copied from a prepared dict (formatters read the instance
    ``__dict__``) and only the message and the time are set.
    Handlers and formatters see an ordinary INFO record of ``oaimux.access``.
    """

    def __init__(self, line: str) -> None:  # no super().__init__(): that is the point
        self.__dict__.update(_RECORD_TEMPLATE)
        self.msg = line
        now = time.time()
        self.created = now
        self.msecs = (now - int(now)) * 1000


# Every attribute LogRecord.__init__ would set, for an access line. No real
# thread, process or source location (0 and "-", so %(process)d still
# formats): the line is about a request, not about code. The file and module
# name the observe package, as they always have, so a log format that prints
# them keeps printing the same.
_RECORD_TEMPLATE: dict[str, object] = {
    "name": "oaimux.access",
    "args": (),
    "levelname": "INFO",
    "levelno": logging.INFO,
    "pathname": "observe.py",
    "filename": "observe.py",
    "module": "observe",
    "lineno": 0,
    "funcName": "finished",
    "exc_info": None,
    "exc_text": None,
    "stack_info": None,
    "relativeCreated": 0.0,
    "thread": 0,
    "threadName": "-",
    "processName": "-",
    "process": 0,
    "taskName": None,
}


class BufferedLineHandler(logging.Handler):
    """Writes each record's message as one line to ``stream``; the lines of one
    turn of the event loop go out in one write (outside a loop, at once).

    For the access log of a server (:func:`send_access_log_to`): one write
    per line was the larger part of its cost. A line is written at the
    latest at the end of the loop turn its response ended in, before the
    next turn's I/O.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(logging.INFO)
        self.stream = stream
        self._lines: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        self.write_line(record.getMessage())

    def write_line(self, line: str) -> None:
        """Queue one line (no newline) for this loop turn's write."""
        self._lines.append(line)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self._flush_turn)

    def _flush_turn(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        with self.lock if self.lock is not None else contextlib.nullcontext():
            if not self._lines:
                return
            lines, self._lines = self._lines, []
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # stderr gone: nowhere left to say so
                pass


def send_access_log_to(stream: TextIO) -> None:
    """Write the access log, and only it, straight to ``stream`` in batches
    (a server process, after logging is configured and before the app is
    made). Other loggers are not affected."""
    for handler in list(access_logger.handlers):
        access_logger.removeHandler(handler)
    access_logger.addHandler(BufferedLineHandler(stream))
    access_logger.propagate = False


def direct_sink() -> Callable[[str], None] | None:
    """When the access log goes only to a :class:`BufferedLineHandler` (a server
    after :func:`send_access_log_to`), its line writer: the Observer then skips
    making a log record per request, the largest part of the log's cost."""
    handlers = access_logger.handlers
    if access_logger.propagate or len(handlers) != 1:
        return None
    handler = handlers[0]
    return handler.write_line if isinstance(handler, BufferedLineHandler) else None


class AccessLines:
    """Makes access-log lines, remembering what repeats from line to line (the
    formatted second, the escaped middle of the line)."""

    def __init__(self) -> None:
        self._second = -1
        self._second_text = ""
        self._segments: dict[tuple[bool | str | None, ...], str] = {}

    def _time(self, wall: float) -> str:
        second = int(wall)
        if second != self._second:  # strftime once per second, not per request
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((wall - second) * 1000):03d}Z"

    def _who(self, ex: Exchange, as_json: bool) -> str:
        """The line's middle: client, key, method, path, model, target, upstream.

        These repeat from request to request, so each combination is escaped
        and joined once and then looked up (at most ``_SEGMENTS`` are kept).
        """
        key = (
            as_json, ex.client, ex.key_name, ex.method, ex.path, ex.model, ex.upstream_model,
            ex.upstream,
        )  # fmt: skip
        segment = self._segments.get(key)
        if segment is None:
            if as_json:
                segment = (
                    f'"client":{_json(ex.client)},"key":{_json(ex.key_name)}'
                    f',"method":"{ex.method}","path":{_json(ex.path)}'
                    f',"model":{_json(ex.model)},"target":{_json(ex.upstream_model)}'
                    f',"upstream":{_json(ex.upstream)}'
                )
            else:
                segment = (
                    f"client={_text(ex.client)} key={_text(ex.key_name)} method={ex.method}"
                    f" path={_text(ex.path)} model={_text(ex.model)}"
                    f" target={_text(ex.upstream_model)} upstream={_text(ex.upstream)}"
                )
            if len(self._segments) >= _SEGMENTS:
                self._segments.clear()  # bounded: clients choose paths and models
            self._segments[key] = segment
        return segment

    def format_text(self, ex: Exchange) -> str:
        """One ``key=value`` line (logfmt); client-chosen strings are quoted when needed."""
        ttfb = "-" if ex.ttfb is None else f"{ex.ttfb * 1000:.2f}"
        duration = "-" if ex.duration is None else f"{ex.duration * 1000:.2f}"
        reserved, charged = _tokens_charged(ex)
        prompt, completion, cache_read, cache_creation, _ = ex.usage or _NO_USAGE
        return (
            f"time={self._time(ex.started_wall)} request_id={ex.request_id}"
            f" {self._who(ex, False)} tried={','.join(ex.tried) or '-'}"
            f" status={ex.status} bytes_in={ex.bytes_in} bytes_out={ex.bytes_out}"
            f" ttfb_ms={ttfb} duration_ms={duration} outcome={ex.outcome}"
            f" error={ex.error_code or '-'}"
            f" prompt_tokens={_num(prompt)} completion_tokens={_num(completion)}"
            f" cache_read_tokens={_num(cache_read)}"
            f" cache_creation_tokens={_num(cache_creation)}"
            f" reserved_tokens={_num(reserved)} charged_tokens={_num(charged)}"
        )

    def format_json(self, ex: Exchange) -> str:
        """One JSON object per line, same fields as the text format (``null`` for none).

        Written out by hand: ``json.dumps`` of a dict costs twice as much, and
        every value here is a number, ``null``, or a string :func:`_json`
        escapes.
        """
        ttfb = "null" if ex.ttfb is None else f"{ex.ttfb * 1000:.2f}"
        duration = "null" if ex.duration is None else f"{ex.duration * 1000:.2f}"
        tried = ",".join(_json(name) for name in ex.tried)
        reserved, charged = _tokens_charged(ex)
        prompt, completion, cache_read, cache_creation, _ = ex.usage or _NO_USAGE
        return (
            # request_id (vetted), method (an HTTP token) and outcome never need escaping.
            f'{{"time":"{self._time(ex.started_wall)}","request_id":"{ex.request_id}"'
            f',{self._who(ex, True)},"tried":[{tried}],"status":{ex.status}'
            f',"bytes_in":{ex.bytes_in},"bytes_out":{ex.bytes_out}'
            f',"ttfb_ms":{ttfb},"duration_ms":{duration},"outcome":"{ex.outcome}"'
            f',"error":{_json(ex.error_code)},"prompt_tokens":{_json_int(prompt)}'
            f',"completion_tokens":{_json_int(completion)}'
            f',"cache_read_tokens":{_json_int(cache_read)}'
            f',"cache_creation_tokens":{_json_int(cache_creation)}'
            f',"reserved_tokens":{_json_int(reserved)},"charged_tokens":{_json_int(charged)}}}'
        )


def _text(value: str | None) -> str:
    if value is None:
        return "-"
    if len(value) <= _MAX_LOGGED and _BARE.fullmatch(value):
        return value
    # Quote (JSON string rules): no space, quote or newline can forge a field.
    return _encode_string(clip(value, _MAX_LOGGED))


def _json(value: str | None) -> str:
    if value is None:
        return "null"
    # The json module's own C string encoder: quotes, escapes, ASCII only.
    return _encode_string(clip(value, _MAX_LOGGED))


def _tokens_charged(ex: Exchange) -> tuple[int | None, int | None]:
    """The reserved and charged tokens (``None``: no token budget; README: Token budgets)."""
    charge = ex.charge
    if charge is None or charge.budget is None:
        return None, None
    return charge.estimate, ex.charged_tokens


def _json_int(value: int | None) -> str:
    return "null" if value is None else str(value)


def _num(value: int | None) -> str:
    return "-" if value is None else str(value)
