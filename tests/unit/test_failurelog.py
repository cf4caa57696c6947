"""FailureLog: first failure, changes of state and recovery logged at once;
the same failure again at most every ten minutes. A hand-moved clock, no sleeps."""

from __future__ import annotations

import logging

import pytest

from proxy.observe.failurelog import FailureLog, format_duration

LOGGER = logging.getLogger("oaimux.test.failurelog")


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER.name]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def failures(clock: Clock, caplog: pytest.LogCaptureFixture) -> FailureLog:
    caplog.set_level(logging.INFO, logger=LOGGER.name)
    return FailureLog(LOGGER, "model discovery: upstream local", clock=clock)


def test_a_failure_every_minute_for_an_hour_is_logged_seven_times(
    failures: FailureLog, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    written = []
    for _ in range(61):  # minute 0 to minute 60
        written.append(failures.failed("could not be reached (ClientConnectorError)"))
        clock.now += 60
    assert sum(written) == 7  # at 0, 10, 20, 30, 40, 50 and 60 minutes
    assert [i for i, w in enumerate(written) if w] == [0, 10, 20, 30, 40, 50, 60]
    first, second = lines(caplog)[:2]
    assert first == (
        logging.WARNING,
        "model discovery: upstream local: could not be reached (ClientConnectorError)",
    )
    assert second[0] == logging.WARNING
    assert "still failing: 10 more times in 10m00s, failing for 10m00s" in second[1]


def test_a_change_of_reason_is_logged_at_once(
    failures: FailureLog, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    assert failures.failed("connection refused")
    clock.now += 60
    assert not failures.failed("connection refused")
    clock.now += 60
    assert failures.failed("GET /models answered HTTP 500")
    clock.now += 60
    assert not failures.failed("GET /models answered HTTP 500")
    assert [m for _, m in lines(caplog)] == [
        "model discovery: upstream local: connection refused",
        "model discovery: upstream local: GET /models answered HTTP 500",
    ]


def test_recovery_is_logged_once_and_the_next_outage_starts_afresh(
    failures: FailureLog, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    assert not failures.recovered()  # nothing failed: nothing to say
    for _ in range(4):
        failures.failed("connection refused")
        clock.now += 30
    assert failures.failing
    assert failures.recovered()
    assert not failures.recovered()
    assert not failures.failing
    assert lines(caplog)[-1] == (
        logging.INFO,
        "model discovery: upstream local: recovered after 2m00s (4 failures)",
    )
    # A new outage with the same reason is news again.
    clock.now += 1
    assert failures.failed("connection refused")
    assert len(lines(caplog)) == 3


def test_the_interval_is_configurable(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER.name)
    log = FailureLog(LOGGER, "redis", every=10.0, clock=clock)
    assert log.failed("down")
    clock.now += 9.9
    assert not log.failed("down")
    clock.now += 0.1
    assert log.failed("down")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.4, "59s"), (60, "1m00s"), (200, "3m20s"), (3600, "1h00m"), (7500, "2h05m")],
)
def test_durations_read_as_a_person_would_write_them(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
