"""SIGHUP and SIGTERM while a real ``oaimux serve`` is still starting.

A process starts with the default dispositions, under which a SIGHUP kills
it; the proxy takes the lifecycle signals over in the first line of its entry
point (``proxy.cli.main`` for the console script, ``proxy/__main__.py`` for
``python -m proxy``; see proxy/early_signals.py). Nothing can act before the
interpreter runs that line, so the delays here count from it, observed in the
process state: the moment ``/proc/<pid>/status`` shows SIGHUP caught. From
there the start-up still has to read the file, import aiohttp, build the app
and hand the signals to the event loop: any gap in that chain kills the
process at some delay. A second test checks the order itself: no heavy
import has finished before the signals are held.

What must hold at every delay: a SIGHUP never kills the process and the
configuration served in the end is the file as it was when the signal was
sent (read at start, or re-read); a SIGTERM ends it with status 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.faults.process import free_port, write_config

ROOT = Path(__file__).parents[2]

# Seconds after the signals are held; a schedule ends early once a signal
# landed after the proxy was serving (later ones are the reload tests' job).
# From the moment the signals are held the two entry points run the same
# code, so the module's schedule covers only what differs (its first imports).
# With --workers the supervisor answers a held SIGHUP before forking; its
# schedule reaches past the fork.
DELAYS = {
    "script": (0.0, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.6, 1.0, 1.7, 3.0, 5.0),
    "module": (0.0, 0.002, 0.005, 0.01, 0.025),
    "workers": (0.0, 0.05, 0.15, 0.3, 0.5, 0.8, 1.2, 2.0, 3.0, 5.0),
}
# The interpreter's import-time lines (PYTHONPROFILEIMPORTTIME) of the
# first heavy modules the start-up needs.
HEAVY_IMPORTED = re.compile(r"^import time:.*\|\s+(typing|yaml|argparse|aiohttp)$")
SERVING = "oaimux serving"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc"),
]


def catches(pid: int, signum: int) -> bool:
    """Has process ``pid`` a handler installed for ``signum`` (its SigCgt mask)?"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    mask = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask.split()[1], 16) >> (signum - 1) & 1)


def entry_point(kind: str) -> list[str]:
    """The command before ``serve``'s arguments; ``workers`` is the script with ``--workers 2``."""
    if kind == "module":
        return [sys.executable, "-m", "proxy"]
    script = shutil.which("oaimux", path=str(Path(sys.executable).parent))
    assert script is not None, "the oaimux console script is not installed next to python"
    return [script]


def serve_args(kind: str) -> list[str]:
    return ["--workers", "2"] if kind == "workers" else []


def processes(kind: str) -> int:
    """How many processes serve (and so log "serving" and "reloaded")."""
    return 2 if kind == "workers" else 1


def config(model: str) -> dict[str, Any]:
    return {
        # Never contacted: only /v1/models (the proxy's own) is asked.
        "upstreams": {"u": {"url": "http://127.0.0.1:9/v1"}},
        "routes": [{"model": model, "upstream": "u"}],
        "log": {"access": False},
        "metrics": {"enabled": False},
    }


class Starting:
    """A proxy process being started, its stderr read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._changed.set()
        self._changed.set()

    def count(self, pattern: str | re.Pattern[str]) -> int:
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        return sum(1 for line in self.lines if rx.search(line))

    def seen(self, pattern: str | re.Pattern[str]) -> bool:
        return self.count(pattern) > 0

    async def wait_line(
        self, pattern: str | re.Pattern[str], count: int = 1, timeout: float = 30.0
    ) -> None:
        async with asyncio.timeout(timeout):
            while self.count(pattern) < count:
                if self._reader.done():
                    raise AssertionError(f"exited ({self.proc.returncode}); log:\n{self.log()}")
                self._changed.clear()
                await self._changed.wait()

    async def exit_code(self, timeout: float = 30.0) -> int:
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self._reader
        return code

    async def wait_catching(self, signum: int, timeout: float = 30.0) -> None:
        """Until the process has its handler for ``signum`` (bounded polling
        of the process state: there is nothing to await)."""
        async with asyncio.timeout(timeout):
            while not catches(self.proc.pid, signum):
                if self.proc.returncode is not None:
                    raise AssertionError(f"exited ({self.proc.returncode}); log:\n{self.log()}")
                await asyncio.sleep(0.0005)

    def log(self) -> str:
        return "\n".join(line for line in self.lines if not line.startswith("import time:"))


@asynccontextmanager
async def starting(kind: str, path: Path) -> AsyncIterator[Starting]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OAIMUX_", "PORT"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPROFILEIMPORTTIME"] = "1"
    proc = await asyncio.create_subprocess_exec(
        *entry_point(kind),
        "serve",
        "--config",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *serve_args(kind),
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    process = Starting(proc, port)
    try:
        yield process
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        process._reader.cancel()
        await asyncio.gather(process._reader, return_exceptions=True)


async def served_models(port: int, asks: int) -> set[str]:
    """The model ids /v1/models lists, over ``asks`` fresh connections (with
    workers, each may reach another process)."""
    ids: set[str] = set()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(asks):
            async with session.get(f"http://127.0.0.1:{port}/v1/models") as resp:
                assert resp.status == 200
                ids.update(m["id"] for m in json.loads(await resp.read())["data"])
    return ids


@pytest.mark.parametrize("kind", ["module", "script", "workers"])
async def test_sighup_while_starting_never_kills_and_the_newest_file_is_served(
    kind: str, tmp_path: Path
) -> None:
    path = tmp_path / "routes.yaml"
    for delay in DELAYS[kind]:
        write_config(path, config("before"))
        async with starting(kind, path) as proxy:
            await proxy.wait_catching(signal.SIGHUP)
            await asyncio.sleep(delay)
            ready_before = proxy.seen(SERVING)
            # What an operator does: change the file, then ask for a reload.
            write_config(path, config("after"))
            proxy.proc.send_signal(signal.SIGHUP)
            serving = processes(kind)
            asks = 1 if serving == 1 else 20
            try:
                await proxy.wait_line(SERVING, count=serving)
            except AssertionError as exc:
                raise AssertionError(f"SIGHUP {delay * 1000:g} ms after holding: {exc}") from None
            models = await served_models(proxy.port, asks)
            if "before" in models:
                # The file was read before the signal: it must be read again.
                await proxy.wait_line(r"reloaded .*routes\.yaml", count=serving)
                models = await served_models(proxy.port, asks)
            assert models == {"after"}, (delay, proxy.log())
            assert proxy.proc.returncode is None
        if ready_before:
            break
    else:
        if kind != "module":
            pytest.fail("the proxy never became ready within the schedule")


@pytest.mark.parametrize("kind", ["module", "script", "workers"])
async def test_sigterm_while_starting_exits_0(kind: str, tmp_path: Path) -> None:
    path = write_config(tmp_path / "routes.yaml", config("m"))
    for delay in DELAYS[kind]:
        async with starting(kind, path) as proxy:
            await proxy.wait_catching(signal.SIGTERM)
            await asyncio.sleep(delay)
            ready_before = proxy.seen(SERVING)
            proxy.proc.send_signal(signal.SIGTERM)
            code = await proxy.exit_code()
            assert code == 0, (delay, code, proxy.log())
            assert "Traceback" not in proxy.log()
        if ready_before:
            break


@pytest.mark.parametrize("kind", ["module", "script"])
async def test_signals_are_held_before_the_first_heavy_import(kind: str, tmp_path: Path) -> None:
    path = write_config(tmp_path / "routes.yaml", config("m"))
    async with starting(kind, path) as proxy:
        await proxy.wait_line(HEAVY_IMPORTED)
        assert catches(proxy.proc.pid, signal.SIGHUP), proxy.log()
        assert catches(proxy.proc.pid, signal.SIGTERM)


def test_the_entry_points_import_nothing_heavy_before_holding_signals() -> None:
    """What runs before ``main`` holds the signals: ``proxy`` and ``proxy.cli``
    at import. A heavy import there would open a window in which a SIGHUP
    kills the process again."""
    probe = (
        "import sys, proxy.cli; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('aiohttp', 'yaml', 'argparse', 'typing', 'asyncio', 'multidict', 'yarl') "
        "or m.startswith('proxy.'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["proxy.cli", "proxy.early_signals"]
