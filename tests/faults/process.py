"""``python -m proxy serve`` as a real subprocess, driven from an asyncio test.

The process is started with asyncio's subprocess API so the test's own loop
keeps serving the fault servers the proxy talks to. Its stderr (where every
log line goes) is read continuously into ``lines``, so a chatty proxy never
blocks on a full pipe and a test can await a given line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

__all__ = ["ProxyProcess", "free_port", "running_proxy", "write_config"]

ROOT = Path(__file__).parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Write ``config`` as YAML, atomically (write, then rename), as operators should."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config))
    tmp.replace(path)
    return path


class ProxyProcess:
    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._new_line.set()

    def matching(self, pattern: str) -> list[re.Match[str]]:
        rx = re.compile(pattern)
        return [m for line in self.lines if (m := rx.search(line))]

    async def wait_line(self, pattern: str, count: int = 1, timeout: float = 15.0) -> list[str]:
        """Wait until ``count`` log lines match ``pattern``; return them."""
        rx = re.compile(pattern)
        async with asyncio.timeout(timeout):
            while True:
                found = [line for line in self.lines if rx.search(line)]
                if len(found) >= count:
                    return found
                self._new_line.clear()
                if self.proc.returncode is not None and self._reader.done():
                    raise AssertionError(f"proxy exited; log:\n{self.text()}")
                await self._new_line.wait()

    async def wait_healthy(self, timeout: float = 30.0) -> None:
        """Poll /healthz until it answers (bounded): the process is starting."""
        async with asyncio.timeout(timeout), aiohttp.ClientSession() as session:
            while True:
                if self.proc.returncode is not None:
                    raise AssertionError(f"proxy exited early; log:\n{self.text()}")
                try:
                    async with session.get(f"{self.url}/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self._reader
        return code

    def text(self) -> str:
        return "\n".join(self.lines)


@contextlib.asynccontextmanager
async def running_proxy(
    config_path: Path,
    *extra_args: str,
    port: int | None = None,
    env: dict[str, str] | None = None,
) -> AsyncIterator[ProxyProcess]:
    """Start ``python -m proxy serve`` on 127.0.0.1 and wait until it answers;
    kill it (only it) if the test left it running. Its environment is this
    one's without oaimux's and Prometheus's variables, plus ``env``."""
    port = port or free_port()
    prefixes = ("OAIMUX_", "PORT", "PROMETHEUS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)} | (env or {})
    env["PYTHONUNBUFFERED"] = "1"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(config_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra_args,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    process = ProxyProcess(proc, port)
    try:
        await process.wait_healthy()
        yield process
    finally:
        if proc.returncode is None:
            # Workers share the supervisor's process group only through fork;
            # a SIGKILL of the supervisor leaves them to their orphan check,
            # so ask nicely first, then insist.
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        with contextlib.suppress(asyncio.CancelledError):
            process._reader.cancel()
            await process._reader
