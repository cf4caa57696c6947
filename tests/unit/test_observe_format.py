"""Exchange → access line (text and JSON), request ids, and the Observer's hooks."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time

import pytest
from aiohttp.test_utils import make_mocked_request

from proxy.config import LogSettings
from proxy.observe import Exchange, request_id_for
from proxy.observe.access_log import AccessLines, BufferedLineHandler
from proxy.observe.metrics import Metrics
from proxy.observe.observer import Observer
from proxy.observe.usage import Usage
from tests.fakes.access_lines import capture_logs, parse_text_line


def exchange(**fields: object) -> Exchange:
    ex = Exchange(request_id="rid-1", method="POST", path="/v1/chat/completions", client="10.0.0.7")
    for name, value in fields.items():
        setattr(ex, name, value)
    return ex


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("abc-123", True),
        ("req_01HZ.x:y@z/+=", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        ("with space", False),
        ("tab\there", False),
        ('quote"d', False),
        ("ünïcode", False),
    ],
)
def test_request_id_for(given: str, kept: bool) -> None:
    made = request_id_for(make_mocked_request("GET", "/", headers={"X-Request-Id": given}))
    if kept:
        assert made == given
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", made)


def test_request_id_made_when_absent_and_unique() -> None:
    ids = {request_id_for(make_mocked_request("GET", "/")) for _ in range(100)}
    assert len(ids) == 100


def test_text_line_fields_and_values() -> None:
    ex = exchange(
        model="fast", upstream_model="llama3.2:3b", upstream="ollama", tried=["a", "b"], status=200,
        bytes_in=12, bytes_out=3456, ttfb=0.0123, duration=1.5, usage=Usage(7, 9),
        key_name="team-a",
    )  # fmt: skip
    f = parse_text_line(AccessLines().format_text(ex))
    assert f["request_id"] == "rid-1" and f["client"] == "10.0.0.7" and f["key"] == "team-a"
    assert (f["model"], f["target"], f["upstream"], f["tried"]) == (
        "fast",
        "llama3.2:3b",
        "ollama",
        "a,b",
    )
    assert (f["ttfb_ms"], f["duration_ms"]) == ("12.30", "1500.00")
    assert (f["prompt_tokens"], f["completion_tokens"], f["error"]) == ("7", "9", "-")


@pytest.mark.parametrize(
    "model",
    [
        "has space",
        'quote"inside',
        "back\\slash",
        "tab\tand\nnewline",
        "é-unicode",
        "k=v",
        "x" * 300,
        "",
    ],
)
def test_text_line_quotes_what_could_forge_a_field(model: str) -> None:
    line = AccessLines().format_text(exchange(model=model, path="/v1/a b"))
    f = parse_text_line(line)  # asserts a single line of intact pairs
    assert f["model"] == (model if len(model) <= 200 else model[:200] + "...")
    assert f["path"] == "/v1/a b"
    assert f["outcome"] == "complete"


def test_json_line_has_the_same_fields() -> None:
    lines = AccessLines()
    ex = exchange(model="m", ttfb=None, duration=0.25, tried=["x"])
    record = json.loads(lines.format_json(ex))
    text = parse_text_line(lines.format_text(ex))
    assert list(record) == list(text)
    assert record["tried"] == ["x"] and record["ttfb_ms"] is None and record["duration_ms"] == 250.0


def test_time_is_utc_with_milliseconds_across_seconds() -> None:
    lines = AccessLines()
    for wall in (1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.5, 1_700_000_000.25):
        f = parse_text_line(lines.format_text(exchange(started_wall=wall)))
        second = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(wall)))
        assert f["time"] == f"{second}.{int(round((wall % 1) * 1000)):03d}Z"


def test_access_off_writes_nothing_but_still_counts() -> None:
    metrics = Metrics(multiprocess_dir="")
    observer = Observer(LogSettings(access=False), metrics)
    with capture_logs() as logs:
        ex = exchange(status=200, upstream="u", metric_model="m")
        observer.begin(ex)
        observer.finished(ex)
    assert logs.access == []
    labels = {"model": "m", "upstream": "u", "status_class": "2xx"}
    assert metrics.registry.get_sample_value("oaimux_requests_total", labels) == 1


def test_finished_reads_usage_only_from_plain_json_or_sse() -> None:
    body = b'{"usage":{"prompt_tokens":3,"completion_tokens":4}}'
    cases = [
        ({"content_type": "application/json"}, (3, 4)),
        ({"content_type": "text/event-stream; charset=utf-8"}, (3, 4)),
        ({"content_type": "application/json", "content_encoding": "gzip"}, (None, None)),
        ({"content_type": "audio/mpeg"}, (None, None)),
        ({"content_type": "application/json", "status": 400}, (None, None)),
    ]
    observer = Observer(LogSettings(), Metrics(multiprocess_dir=""))
    for fields, expected in cases:
        ex = exchange(**{"status": 200, "tail": body, **fields})
        observer.finished(ex)
        assert (ex.usage or Usage(None, None))[:2] == expected, fields


def test_hooks_without_metrics_do_nothing() -> None:
    observer = Observer(LogSettings(access=False))
    ex = exchange()
    observer.begin(ex)
    observer.stream_opened(ex)
    observer.rate_limited(ex)
    observer.upstream_failure("u", "connect")
    observer.fallback("a", "b")
    observer.breaker_changed("u", "open")
    observer.finished(ex)
    assert not ex.in_flight and not ex.stream_open


class _CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_buffered_handler_writes_one_loop_turn_at_once() -> None:
    stream = _CountingStream()
    handler = BufferedLineHandler(stream)
    logger = logging.getLogger("test.buffered")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        for i in range(3):
            logger.info("line %d", i)
        assert stream.getvalue() == ""  # still this turn of the loop
        await asyncio.sleep(0)  # one turn
        assert stream.getvalue() == "line 0\nline 1\nline 2\n"
        assert stream.writes == 1
    finally:
        logger.removeHandler(handler)


def test_buffered_handler_outside_a_loop_writes_at_once() -> None:
    stream = _CountingStream()
    handler = BufferedLineHandler(stream)
    handler.handle(logging.makeLogRecord({"msg": "now", "levelno": logging.INFO}))
    assert stream.getvalue() == "now\n"


def test_access_records_format_like_any_record() -> None:
    observer = Observer(LogSettings())
    formatter = logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d %(process)s %(threadName)s %(message)s"
    )
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: seen.append(formatter.format(r))  # type: ignore[method-assign]
    logger = logging.getLogger("oaimux.access")
    logger.addHandler(handler)
    try:
        with capture_logs():
            observer.finished(exchange(status=200))
    finally:
        logger.removeHandler(handler)
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO oaimux\.access observe\.py:0 0 - time=\S+ request_id=rid-1 .*",
        seen[0],
    )


async def test_server_access_log_skips_log_records() -> None:
    from proxy.config import parse_settings
    from proxy.observe.access_log import access_logger, send_access_log_to
    from proxy.observe.observer import make_observer

    saved = (list(access_logger.handlers), access_logger.propagate, access_logger.level)
    stream = _CountingStream()
    try:
        send_access_log_to(stream)
        access_logger.setLevel(logging.INFO)
        settings = parse_settings(
            {
                "upstreams": {"u": {"url": "http://127.0.0.1:9/v1"}},
                "routes": [{"model": "m", "upstream": "u"}],
            },
            environ={},
        )
        observer = make_observer(settings)
        assert observer.sink is not None
        with capture_logs() as logs:  # a root handler: it must not see access lines now
            observer.finished(exchange(status=200))
            observer.finished(exchange(status=404))
            await asyncio.sleep(0)
        assert logs.access == []
        lines = stream.getvalue().splitlines()
        assert [parse_text_line(line)["status"] for line in lines] == ["200", "404"]
        assert stream.writes == 1
    finally:
        for handler in list(access_logger.handlers):
            access_logger.removeHandler(handler)
        for handler in saved[0]:
            access_logger.addHandler(handler)
        access_logger.propagate = saved[1]
        access_logger.setLevel(saved[2])
    assert make_observer(settings).sink is None  # tests and embedders: through logging


def test_remembered_line_parts_stay_bounded_and_right() -> None:
    from proxy.observe.access_log import _SEGMENTS

    lines = AccessLines()
    for i in range(_SEGMENTS * 2 + 5):
        f = parse_text_line(lines.format_text(exchange(model=f"model {i}")))
        assert f["model"] == f"model {i}"
        assert len(lines._segments) <= _SEGMENTS
    # The same exchange in both formats, from one writer of lines.
    ex = exchange(model='quote"d')
    assert parse_text_line(lines.format_text(ex))["model"] == 'quote"d'
    assert json.loads(lines.format_json(ex))["model"] == 'quote"d'


def test_every_outcome_is_documented_in_the_readme() -> None:
    """The outcomes the code may write (one Literal, checked by mypy) are the
    README's access-log ``outcome`` values, in the same order."""
    from pathlib import Path

    from proxy.observe import OUTCOMES

    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| `outcome` |"))
    documented = re.findall(r"`([a-z_]+)`", row.split("|")[2])
    assert tuple(documented) == OUTCOMES
