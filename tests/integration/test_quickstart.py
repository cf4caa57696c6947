"""The README's Quickstart, as a newcomer types it.

Its two set-up commands (make ``.venv`` and install into it; serve) are read
from the README and run as written in a copy of the repository, with only the
system ``python3``; then the README's curl example streams an answer from that
``oaimux serve`` (the shipped routes.yaml, no key). ``.ci/run`` must use the
same commands. A README edit that breaks any of this fails here.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_core_cli import free_port, wait_healthy

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
# What a fresh clone does not have.
NOT_IN_A_CLONE = (
    ".git",
    ".venv",
    "__pycache__",
    "*.egg-info",
    "node_modules",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
    "build",
    "dist",
)


def quickstart() -> str:
    text = README.read_text()
    start = text.index("## Quickstart\n")
    return text[start : text.index("\n## ", start + 1)]


def sh_blocks(text: str) -> list[list[str]]:
    """The ``sh`` blocks of ``text``, as lists of commands (continuations joined)."""
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    return [[c for c in b.replace("\\\n", " ").splitlines() if c.strip()] for b in blocks]


def setup_commands() -> tuple[str, str]:
    """The Quickstart's install and serve commands."""
    (block,) = [
        b for b in sh_blocks(quickstart()) if any(c.startswith("python3 -m venv") for c in b)
    ]
    install, serve = block
    return install, serve


def readme_test_command() -> str:
    (block,) = [b for b in sh_blocks(quickstart()) if any("pytest" in c for c in b)]
    (command,) = block
    return command


def curl_example() -> str:
    (command,) = [
        c
        for b in sh_blocks(quickstart())
        for c in b
        if c.startswith("curl ") and '"stream": true' in c
    ]
    return command


def test_the_quickstart_installs_into_a_virtual_environment() -> None:
    install, serve = setup_commands()
    # PEP 668: Debian 12 and Ubuntu 24.04 refuse pip into the system Python.
    assert install.startswith("python3 -m venv .venv && .venv/bin/pip install ")
    assert "[test]" in install  # the test command works after it
    assert serve.startswith(".venv/bin/oaimux serve")
    assert readme_test_command().startswith(".venv/bin/python -m pytest")
    assert "'.[fast]'" in quickstart() and "Docker" in quickstart()  # production, in a line


def test_ci_runs_the_readme_commands() -> None:
    lines = [line.strip() for line in CI_RUN.read_text().splitlines()]
    install, _ = setup_commands()
    assert install in lines
    assert readme_test_command() in lines
    # Where python3 -m venv cannot work yet, .ci/run installs python3-venv first.
    assert "python3-venv" in CI_RUN.read_text()
    # And after the tests, the README's Development checkers, strict tooling held by CI.
    for checker in (".venv/bin/ruff check .", ".venv/bin/ruff format --check .", ".venv/bin/mypy"):
        assert checker in lines, checker


@pytest.mark.slow
def test_a_fresh_copy_installs_serves_and_streams_with_the_readme_commands(
    tmp_path: Path,
) -> None:
    if shutil.which("python3") is None or shutil.which("curl") is None:
        if "CI" in os.environ:
            pytest.fail("CI is set but python3 or curl is missing")
        pytest.skip("needs python3 and curl on PATH")
    clone = tmp_path / "oaimux"
    shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns(*NOT_IN_A_CLONE))
    try:
        run_the_quickstart(clone)
    finally:
        shutil.rmtree(clone, ignore_errors=True)  # a whole environment: do not keep it


def run_the_quickstart(clone: Path) -> None:
    install, serve = setup_commands()
    # Only the system's tools: nothing of this test run's own environment.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OAIMUX_", "PORT", "OPENAI", "VIRTUAL_ENV", "PYTHON"))
    }
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(ROOT))
    )
    installed = subprocess.run(
        ["bash", "-c", install], cwd=clone, env=env, capture_output=True, text=True, timeout=900
    )
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    port = free_port()
    proc = subprocess.Popen(
        ["bash", "-c", f"exec {serve}"],
        cwd=clone,
        env={**env, "PORT": str(port)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_healthy(port, proc)
        curl = subprocess.run(
            ["bash", "-c", curl_example().replace("127.0.0.1:8080", f"127.0.0.1:{port}")],
            capture_output=True,
            timeout=60,
        )
        assert curl.returncode == 0, curl.stderr
        events = [e for e in curl.stdout.split(b"\n\n") if e]
        assert len(events) >= 5 and events[-1] == b"data: [DONE]"
        assert b"Hello from the oaimux demo upstream" in b"".join(
            re.findall(rb'"content": "([^"]*)"', curl.stdout)
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "upstream=demo" in err and "status=200" in err  # the access log line

    # The README's test command works in that environment (a few tests of it).
    tests = subprocess.run(
        ["bash", "-c", f"{readme_test_command()} -q tests/unit/test_failurelog.py"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
