"""Run third-party clients against oaimux: an isolated venv for the Python ones, and the
proxy set-up every client test shares.

The heavy Python clients (LangChain, LlamaIndex, litellm, llm) never enter the
project's own environment. :func:`clients_python` installs the exact pins of
``tests/clients/requirements.txt`` once into a venv under the user's cache
directory (``$XDG_CACHE_HOME`` or ``~/.cache``, then ``oaimux-tests/``), named by a
hash of that file and of the Python version, and reuses it from then on. A failed
install skips the tests with the reason, or fails them when ``CI`` is set.

:func:`run_client` starts a client with a small, fixed environment: a throwaway
HOME, no inherited API keys or proxy settings, and ``offline/sitecustomize.py``
on PYTHONPATH, which refuses (and reports) any network use beyond loopback.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

__all__ = [
    "CLIENTS_DIR",
    "NODE_DIR",
    "PROXY_KEY",
    "UPSTREAM_KEY",
    "client_env",
    "clients_python",
    "last_json_line",
    "node_with",
    "proxy_config",
    "run_client",
    "skip_or_fail",
]

CLIENTS_DIR = Path(__file__).resolve().parent
NODE_DIR = CLIENTS_DIR.parent / "node"
REQUIREMENTS = CLIENTS_DIR / "requirements.txt"
PROXY_KEY = "sk-oaimux-clients-0001"
UPSTREAM_KEY = "sk-upstream-clients-secret"
MODELS = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
INSTALL_TIMEOUT_S = 900.0
COMPLETE = "oaimux-requirements.txt"  # written last: the venv holds exactly these pins


def skip_or_fail(reason: str) -> None:
    """Skip with ``reason``, or fail when ``CI`` is set: CI must run every client test."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
    pytest.skip(reason)


def node_with(package: str) -> str:
    """The node binary, once ``package`` is in tests/node/node_modules (``npm ci`` there)."""
    node = shutil.which("node")
    if node is None:
        skip_or_fail("node is not on PATH")
    elif not (NODE_DIR / "node_modules" / package / "package.json").is_file():
        skip_or_fail(f"the {package} npm package is not installed: run `npm ci` in tests/node")
    assert node is not None
    return node


def proxy_config(upstream: TestServer, **extra: Any) -> dict[str, Any]:
    """A routes.yaml mapping: the test models to the fake upstream, one proxy key."""
    config: dict[str, Any] = {
        "upstreams": {
            "openai": {
                "url": str(upstream.make_url("/v1")),
                "headers": {"set": {"Authorization": f"Bearer {UPSTREAM_KEY}"}},
            }
        },
        "routes": [{"model": m, "upstream": "openai"} for m in MODELS],
        "auth": {"keys": [{"name": "clients", "key": PROXY_KEY}]},
    }
    config.update(extra)
    return config


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "oaimux-tests"


def _venv_name() -> str:
    digest = hashlib.sha256(REQUIREMENTS.read_bytes())
    digest.update(sys.version.encode())
    return f"clients-venv-{digest.hexdigest()[:16]}"


@contextmanager
def _install_lock(root: Path) -> Iterator[None]:
    """One install at a time on this machine (several test runs may share the cache)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _install(target: Path) -> str | None:
    """Make the venv at ``target``; the reason it failed, or None.

    Built in place (a venv's console scripts name its path, so it cannot be moved)
    and marked complete only once pip has succeeded.
    """
    shutil.rmtree(target, ignore_errors=True)
    venv.EnvBuilder(with_pip=True).create(target)
    cmd = [str(target / "bin" / "python"), "-m", "pip", "install", "--no-input", "-q",
           "-r", str(REQUIREMENTS)]  # fmt: skip
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        shutil.rmtree(target, ignore_errors=True)
        return f"pip install took over {INSTALL_TIMEOUT_S:.0f} s"
    if done.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        return f"pip install failed: {done.stderr.strip()[-600:]}"
    (target / COMPLETE).write_text(REQUIREMENTS.read_text())
    return None


def _remove_stale(root: Path, keep: Path) -> None:
    """Venvs for older requirement lists are 600+ MB each: keep only the current one."""
    for old in root.glob("clients-venv-*"):
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


_install_failure: str | None = None


def clients_python() -> Path:
    """The isolated venv's python, installing it on first use (skip or fail if impossible)."""
    global _install_failure
    if _install_failure is not None:
        skip_or_fail(_install_failure)
    root = _cache_root()
    target = root / _venv_name()
    complete = target / COMPLETE
    if not complete.is_file():
        with _install_lock(root):
            if not complete.is_file():
                reason = _install(target)
                if reason is not None:
                    _install_failure = f"the client venv could not be installed: {reason}"
                    skip_or_fail(_install_failure)
                _remove_stale(root, target)
    return target / "bin" / "python"


def client_env(home: Path, **extra: str) -> dict[str, str]:
    """A small environment for a client process: nothing inherited but PATH."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(CLIENTS_DIR / "offline"),
        "PYTHONDONTWRITEBYTECODE": "1",  # no __pycache__ in the repo's tests/clients
    }
    env.update(extra)
    return env


async def run_client(
    argv: list[str], env: Mapping[str, str], *, cwd: Path | None = None, timeout: float = 120.0
) -> tuple[str, str]:
    """Run a client to completion while this loop keeps serving; (stdout, stderr).

    Fails the test on a non-zero exit, a timeout, or any network use the offline
    guard refused.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv, env=dict(env), cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(timeout):
            out_b, err_b = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    out, err = out_b.decode(), err_b.decode()
    assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}:\n{err[-4000:]}"
    refused = [line for line in err.splitlines() if line.startswith("OFFLINE-GUARD")]
    assert not refused, f"the client tried to leave loopback: {refused}"
    return out, err


def last_json_line(out: str) -> Any:
    """The JSON report a driver script prints as its last line."""
    return json.loads(out.strip().splitlines()[-1])
