"""A real ``redis-server`` for tests, on a free loopback port in a temp dir.

Registered from tests/conftest.py (``pytest_plugins``). Fixtures:

- ``redis_server``: a :class:`RedisServer` started for one test and stopped
  after it; the test may ``stop()`` and ``start()`` it (same port) to play an
  outage.
- ``redis_client``: a ``redis.asyncio`` client of that server, to look at
  what the proxy wrote there.
- ``redis_binary``: the path of ``redis-server``.

The server runs with no persistence (``--save "" --appendonly no``) in the
foreground, so stopping the process is the whole cleanup. When
``redis-server`` is missing the tests that need it are skipped with the reason
said plainly, unless ``CI`` is set: then they fail, because CI must run them
(``.ci/run`` installs Redis).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

__all__ = ["RedisServer", "find_redis_server", "redis_binary", "redis_client", "redis_server"]

START_DEADLINE = 10.0  # seconds for redis-server to answer PING
STOP_DEADLINE = 10.0
_PLACES = ("/usr/bin/redis-server", "/usr/local/bin/redis-server", "/usr/sbin/redis-server")


def find_redis_server() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    return next((p for p in _PLACES if os.access(p, os.X_OK)), None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ping(port: int) -> bool:
    """One inline PING over a raw socket (no client library needed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process; ``url`` stays the same across stop/start."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start on the same port as before (a new free one the first time)."""
        if self.running:
            return
        attempts = 3 if not self.port else 1
        for _ in range(attempts):
            port = self.port or _free_port()
            if self._launch(port):
                self.port = port
                return
        raise RuntimeError(
            f"redis-server did not come up within {START_DEADLINE:g}s; log:\n"
            + self.log_path.read_text(errors="replace")[-2000:]
        )

    def _launch(self, port: int) -> bool:
        with open(self.log_path, "ab") as log:
            options = {
                "--port": str(port),
                "--bind": "127.0.0.1",
                "--save": "",
                "--appendonly": "no",
                "--daemonize": "no",
                "--dir": str(self.workdir),
            }
            self.process = subprocess.Popen(
                [self.binary, *(part for pair in options.items() for part in pair)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline:
            if self.process.poll() is not None:  # e.g. the port was taken meanwhile
                self.process = None
                return False
            if _ping(port):
                return True
            time.sleep(0.02)  # polling a process start, bounded by the deadline
        self.stop()
        return False

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for it to exit."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_DEADLINE)


@pytest.fixture
def redis_binary() -> str:
    binary = find_redis_server()
    if binary is None:
        reason = (
            "redis-server not found (install it: apt-get install redis-server); "
            "the rate limiter's Redis storage is tested against a real server"
        )
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {reason}")
        pytest.skip(reason)
    return binary


@pytest.fixture
def redis_server(redis_binary: str, tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(redis_binary, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()
