"""A pytest plugin loaded into the openai SDK's own test run (test_sdk_suite.py).

Before each test it posts the test's id to the recording upstream, which
files the requests that follow under it; at the end it writes each test's
outcome (``passed``, ``skipped``, or ``failed:<exception type>``, with the
phase when not the test body) to a JSON file. Loaded with
``-p oaimux_suite_plugin`` when ``OAIMUX_SUITE_MARK_URL`` and ``OAIMUX_SUITE_OUTCOMES``
are set; runs in the SDK's own environment, so it imports nothing of ours.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Generator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest


class _Recorder:
    def __init__(self, mark_url: str, outcomes: Path) -> None:
        url = urlsplit(mark_url)
        self._host, self._port, self._path = url.hostname or "", url.port or 80, url.path
        self._conn: http.client.HTTPConnection | None = None
        self._outcomes_path = outcomes
        self.outcomes: dict[str, str] = {}

    def _mark(self, nodeid: str) -> None:
        for attempt in (1, 2):  # a kept-alive connection the server has closed: once more
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=30)
            try:
                self._conn.request("POST", self._path, nodeid.encode())
                response = self._conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                self._conn.close()
                self._conn = None
                if attempt == 2:
                    raise
                continue
            if response.status != 204:
                raise RuntimeError(f"the recording upstream answered {response.status}")
            return

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self._mark(item.nodeid)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, Any, None]:
        outcome = yield
        report = outcome.get_result()
        if item.nodeid in self.outcomes and self.outcomes[item.nodeid] != "passed":
            return  # the first phase that did not pass decides
        if report.failed:
            kind = call.excinfo.typename if call.excinfo is not None else "unknown"
            phase = "" if report.when == "call" else f"@{report.when}"
            self.outcomes[item.nodeid] = f"failed:{kind}{phase}"
        elif report.skipped:
            self.outcomes[item.nodeid] = "skipped"
        elif report.when == "call":
            self.outcomes[item.nodeid] = "passed"

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self._conn is not None:
            self._conn.close()
        self._outcomes_path.write_text(json.dumps(self.outcomes, indent=0, sort_keys=True))


def pytest_configure(config: pytest.Config) -> None:
    mark_url = os.environ.get("OAIMUX_SUITE_MARK_URL")
    outcomes = os.environ.get("OAIMUX_SUITE_OUTCOMES")
    if mark_url and outcomes:
        config.pluginmanager.register(_Recorder(mark_url, Path(outcomes)), "oaimux-recorder")
