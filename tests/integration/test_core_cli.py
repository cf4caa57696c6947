"""`oaimux check` and `oaimux serve` as real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).parents[2]


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith(("OAIMUX_", "PORT"))},
            **(env or {}),
        },
        cwd=cwd,
    )


def test_check_valid_file_summarises() -> None:
    result = run("check")
    assert result.returncode == 0, result.stderr
    assert "1 upstreams (demo)" in result.stdout and "2 routes" in result.stdout
    assert "listen http://127.0.0.1:8080 (host from server.host, port from server.port)" in (
        result.stdout
    )
    assert "warning" not in result.stdout + result.stderr


def test_check_invalid_file_names_key_path(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        "upstreams: {a: {url: 'http://127.0.0.1:1/v1'}}\n"
        "routes:\n  - {model: x, upstream: a}\n  - {model: y, upstream: a}\n  - {model: z, upstream: b}\n"
    )
    result = run("check", "--config", str(config))
    assert result.returncode == 2
    assert f"{config}: routes[2].upstream: unknown upstream 'b'" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_from_environment_variable(tmp_path: Path) -> None:
    config = tmp_path / "env.yaml"
    config.write_text(
        "upstreams: {a: {url: 'http://127.0.0.1:1/v1'}}\nroutes: [{model: x, upstream: a}]\n"
    )
    result = run("check", env={"OAIMUX_CONFIG": str(config)})
    assert result.returncode == 0
    assert str(config) in result.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.05)  # polling a starting process, bounded by the deadline
    raise AssertionError("oaimux did not become healthy")


def test_serve_shipped_config_with_port_from_env_and_stops_on_sigterm() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OAIMUX_", "OPENAI"))}
    env["PORT"] = str(port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_healthy(port, proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as resp:
            assert b'"demo"' in resp.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "routes.yaml" in err and f"127.0.0.1:{port}" in err and "2 routes, 1 upstreams" in err
    assert "uvloop" in err
    assert "WARNING" not in err


def test_port_flag_beats_env() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OAIMUX_")}
    env["PORT"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_healthy(port, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_port_in_use_is_one_clear_line_and_status_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--port", str(port))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Unclosed" not in result.stderr
