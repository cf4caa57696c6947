"""Start and stop the processes under test: the mock upstream, nginx and oaimux.

A *peer* is one way for the client to reach the mock: ``direct`` (no proxy; the floor),
``nginx`` (a C reverse proxy; the ceiling for a passthrough) or ``oaimux`` (this project).
Each peer exposes ``port`` (where the client connects) and ``pids()`` (the processes doing
the proxying, whose CPU and memory we measure; empty for direct).

Contract: every process is started in its own session and pinned to the cores it was given
(``taskset`` when installed, else ``os.sched_setaffinity`` in the child), its output goes to a
log file in the run's temp dir, and ``stop()`` ends it - SIGTERM, then SIGKILL to its own
process group after a grace period - so a finished run leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench import procfs
from bench.http1 import fetch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OAIMUX_CMD = "{python} -m proxy serve --config {config} --port {port} --host 127.0.0.1"
MAX_BODY_BYTES = 32 * 1024 * 1024


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Nice value applied to every spawned process's autogroup (see procfs.set_autogroup_nice);
# set once by the driver before anything starts, 0 = leave priorities alone.
NICE = 0


def cpu_list(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def spawn(
    cmd: list[str],
    cpus: set[int] | None,
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` pinned to ``cpus`` (inherited by its threads and forked workers)."""
    preexec = None
    if cpus:
        if shutil.which("taskset"):
            cmd = ["taskset", "-c", cpu_list(cpus), *cmd]  # taskset execs: same pid
        else:

            def preexec() -> None:
                os.sched_setaffinity(0, cpus)

    log = open(log_path, "ab")  # noqa: SIM115 - closed by the child owning the fd copy
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=preexec,
        )
    finally:
        log.close()
    if NICE:
        # Its own session means its own autogroup: give it the driver's priority too.
        procfs.set_autogroup_nice(proc.pid, NICE)
    return proc


def terminate(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM ``proc``; after ``grace`` seconds SIGKILL its process group (its own session)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        # Workers forked by the server are in its process group; make sure none outlive it.
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def log_tail(path: Path, limit: int = 1500) -> str:
    try:
        return path.read_bytes()[-limit:].decode(errors="replace")
    except OSError:
        return ""


async def wait_healthy(
    port: int, proc: subprocess.Popen[bytes] | None, log_path: Path | None, timeout: float
) -> float:
    """Poll ``GET /healthz`` until it answers 200; return seconds taken.

    Raises RuntimeError if the process exits or ``timeout`` passes first.
    """
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            tail = log_tail(log_path) if log_path else ""
            raise RuntimeError(f"exited with {proc.returncode} before ready:\n{tail}")
        resp = await fetch(port, "GET", "/healthz", timeout=2.0)
        if resp.status == 200:
            return time.monotonic() - t0
        await asyncio.sleep(0.05)
    tail = log_tail(log_path) if log_path else ""
    raise RuntimeError(f"not ready after {timeout:.0f} s:\n{tail}")


class Mock:
    """The mock upstream (bench/mock_upstream.py) in its own process."""

    def __init__(self, workdir: Path, cpus: set[int] | None) -> None:
        self.port = free_port()
        self.log = workdir / "mock.log"
        self.cpus = cpus
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        cmd = [sys.executable, "-m", "bench.mock_upstream", "--port", str(self.port)]
        self.proc = spawn(cmd, self.cpus, self.log, cwd=REPO_ROOT)
        await wait_healthy(self.port, self.proc, self.log, 15)

    def pids(self) -> list[int]:
        return procfs.tree_pids(self.proc.pid) if self.proc else []

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)


class Peer:
    """Base: a named way to reach the mock (see module docstring)."""

    name = "peer"
    port = 0
    workers = 1
    cpus: set[int] | None = None
    startup_s = 0.0

    def pids(self) -> list[int]:
        return []

    async def start(self) -> None:
        return None

    def stop(self) -> None:
        return None

    def alive(self) -> bool:
        return True

    def describe(self) -> str:
        return self.name


class Direct(Peer):
    """No proxy: the client talks to the mock. Every "added" figure is relative to this."""

    name = "direct"

    def __init__(self, mock: Mock) -> None:
        self.port = mock.port

    def describe(self) -> str:
        return "direct to the mock (no proxy)"


class _ProcessPeer(Peer):
    """A peer that is one server process (plus whatever it forks)."""

    def __init__(self, workdir: Path, cpus: set[int] | None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.cpus = cpus
        self.log = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    async def start(self) -> None:
        self.proc = spawn(self.command(), self.cpus, self.log, env=self.env(), cwd=REPO_ROOT)
        self.startup_s = await wait_healthy(self.port, self.proc, self.log, 60)

    def pids(self) -> list[int]:
        return procfs.tree_pids(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)


NGINX_CONF = """\
# Generated by oaimux's bench: a minimal passthrough reverse proxy to the mock.
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size {max_body};
    client_body_buffer_size 64k;       # read request bodies in 64 KiB, not 8 KiB, pieces
    keepalive_requests 100000000;
    upstream mock {{
        server 127.0.0.1:{mock_port};
        keepalive 1024;            # pool of idle HTTP/1.1 connections to the mock
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /healthz {{ return 200 "ok"; }}
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";   # keep upstream connections alive
            proxy_buffering off;              # stream SSE chunks as they come
            proxy_buffer_size 64k;            # ... read from the mock up to 64 KiB at a time
            proxy_buffers 8 64k;
            proxy_busy_buffers_size 128k;
            proxy_request_buffering off;      # stream request bodies too
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


class Nginx(_ProcessPeer):
    """nginx as a plain reverse proxy: the C-level reference for a passthrough."""

    name = "nginx"

    def __init__(self, workdir: Path, cpus: set[int] | None, mock: Mock) -> None:
        super().__init__(workdir / "nginx", cpus)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = self.workdir / "nginx.log"
        self.mock = mock

    @staticmethod
    def available() -> bool:
        return shutil.which("nginx") is not None

    def command(self) -> list[str]:
        conf = self.workdir / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                tmp=self.workdir, max_body=MAX_BODY_BYTES, mock_port=self.mock.port, port=self.port
            )
        )
        # -e: the startup error log too goes to our dir, not the system's.
        return [
            "nginx",
            "-p",
            str(self.workdir),
            "-c",
            str(conf),
            "-e",
            str(self.workdir / "nginx-error.log"),
        ]

    def describe(self) -> str:
        return "nginx, 1 worker, keepalive pool, buffering off"


def oaimux_config(
    mock_port: int, port: int, observability: bool = False, token_limit: bool = False
) -> dict[str, object]:
    """The routes.yaml the bench gives oaimux: every model to the mock, no rate limit.

    ``observability`` turns on the JSON access log and metrics (off for the plain figures);
    ``python -m bench --observability`` runs with it, to price them. ``token_limit``
    adds a token budget (both windows) too large to ever refuse, to price reserving
    and reconciling every request (README, "Token budgets").
    """
    config: dict[str, object] = {
        "server": {"host": "127.0.0.1", "port": port, "max_body_bytes": MAX_BODY_BYTES},
        "log": {"access": True, "format": "json"} if observability else {"access": False},
        "metrics": {"enabled": bool(observability)},
        # No rate_limit section: all load comes from 127.0.0.1, a per-IP limit would
        # turn the benchmark into a 429 benchmark.
        "upstreams": {"mock": {"url": f"http://127.0.0.1:{mock_port}/v1"}},
        "routes": [{"model": "*", "upstream": "mock"}],
    }
    if token_limit:
        config["rate_limit"] = {"tokens_per_minute": 10**12, "tokens_per_day": 10**12}
    return config


def to_yaml(value: object, indent: int = 0) -> str:
    """Minimal YAML writer for the config above (dicts, lists, scalars), so the bench does
    not depend on PyYAML being importable in the driver."""
    pad = "  " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{key}:\n{to_yaml(item, indent + 1)}")
            else:
                lines.append(f"{pad}{key}: {to_yaml(item)}")
        return "\n".join(lines)
    if isinstance(value, list):
        out = []
        for item in value:
            body = to_yaml(item, indent + 1).lstrip()
            out.append(f"{pad}- {body}")
        return "\n".join(out)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class Oaimux(_ProcessPeer):
    """oaimux itself, started with the bench's generated config."""

    def __init__(
        self,
        workdir: Path,
        cpus: set[int] | None,
        mock: Mock,
        workers: int = 1,
        observability: bool = False,
        cmd_template: str = DEFAULT_OAIMUX_CMD,
        token_limit: bool = False,
    ) -> None:
        self.name = "oaimux" if workers == 1 else f"oaimux-w{workers}"
        if token_limit:
            self.name = "oaimux-tokens"
        self.token_limit = token_limit
        super().__init__(workdir / self.name, cpus)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = self.workdir / "oaimux.log"
        self.mock = mock
        self.workers = workers
        self.observability = observability
        self.cmd_template = cmd_template

    def command(self) -> list[str]:
        config = self.workdir / "routes.yaml"
        config.write_text(
            to_yaml(oaimux_config(self.mock.port, self.port, self.observability, self.token_limit))
            + "\n"
        )
        cmd = shlex.split(
            self.cmd_template.format(
                python=shlex.quote(sys.executable),
                config=shlex.quote(str(config)),
                port=self.port,
                workers=self.workers,
            )
        )
        if self.workers != 1 and "--workers" not in cmd:
            cmd += ["--workers", str(self.workers)]
        return cmd

    def env(self) -> dict[str, str]:
        return dict(os.environ, PYTHONUNBUFFERED="1")

    def describe(self) -> str:
        obs = ", access log + metrics on" if self.observability else ""
        if self.token_limit:
            obs += ", token budget"
        return f"oaimux, {self.workers} worker(s){obs}"
