"""Running the real coding agents, Claude Code and Codex CLI, headless and offline.

Both come from the npm registry, pinned in tests/agents/package.json and its
lock (``npm ci`` there, as .ci/run does). Each ships its native binary inside
a platform package on npm (``@anthropic-ai/claude-code-linux-x64``,
``@openai/codex-linux-x64``), so nothing is fetched from anywhere else.

Every run:

- gets a throwaway ``HOME`` (and for Codex a ``CODEX_HOME`` with its own
  ``config.toml``) and an environment built here, nothing inherited but
  ``PATH`` (Codex's launcher is a node script), so no key, proxy or config of
  the machine reaches the agent;
- cannot reach the internet: ``HTTPS_PROXY``, ``HTTP_PROXY`` and ``ALL_PROXY``
  point at :class:`EgressTrap`, a listener on 127.0.0.1 that refuses every
  request at once and notes what was asked for, with ``NO_PROXY`` for
  loopback only. Both agents honour these variables (checked: with a
  non-loopback base URL, every attempt lands in the trap), so a call to any
  outside host fails in milliseconds instead of leaving the machine or hanging;
- is bounded: the agent runs in a session of its own, killed with everything
  it started if it outlives :data:`AGENT_TIMEOUT`; Claude Code gets
  ``CLAUDE_CODE_MAX_RETRIES=1`` (it otherwise retries a refusal for minutes)
  and Codex ``request_max_retries``/``stream_max_retries`` of 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = [
    "AGENT_TIMEOUT",
    "AgentRun",
    "EgressTrap",
    "agent_binary",
    "claude_run",
    "codex_run",
    "egress_trap",
]

AGENTS_DIR = Path(__file__).resolve().parent / "agents"
AGENT_TIMEOUT = 60.0
CODEX_KEY_VARIABLE = "OAIMUX_TEST_CODEX_KEY"


@dataclass
class AgentRun:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    egress: list[str]  # request lines the agent sent towards the internet (refused)

    def __str__(self) -> str:
        return (
            f"{Path(self.argv[0]).name} exited {self.returncode} after {self.seconds:.1f} s\n"
            f"stdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}\n"
            f"egress attempts: {self.egress}"
        )


@dataclass
class EgressTrap:
    """An HTTP proxy on 127.0.0.1 that refuses every request (403) and notes its request line."""

    attempts: list[str] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                line = await reader.readline()
            self.attempts.append(line.decode(errors="replace").strip())
            writer.write(
                b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def egress_trap() -> AsyncIterator[EgressTrap]:
    trap = EgressTrap()
    server = await asyncio.start_server(trap._refuse, "127.0.0.1", 0)
    trap.port = server.sockets[0].getsockname()[1]
    try:
        yield trap
    finally:
        server.close()
        await server.wait_closed()


def agent_binary(name: str) -> Path:
    """The installed agent's executable, or skip (fail under CI) when it is not installed."""
    path = AGENTS_DIR / "node_modules" / ".bin" / name
    if shutil.which("node") is not None and path.exists():
        return path
    missing = f"{name} is not installed in tests/agents"
    if os.environ.get("CI"):
        pytest.fail(
            f"{missing}; CI must run the agent tests (.ci/run does `npm ci` in tests/agents)"
        )
    pytest.skip(f"{missing}: run `npm ci` in tests/agents (needs node and npm)")


def _offline_env(home: Path, trap: EgressTrap) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "TERM": "dumb",
        "LANG": "C.UTF-8",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
        env[name] = env[name.lower()] = trap.url
    return env


async def _run(argv: list[str], env: dict[str, str], cwd: Path, trap: EgressTrap) -> AgentRun:
    seen = len(trap.attempts)
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    timed_out = False
    try:
        async with asyncio.timeout(AGENT_TIMEOUT):
            out, err = await proc.communicate()
    except TimeoutError:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = await proc.communicate()
    finally:
        # What the agent left running in its own session (Codex's node launcher
        # starts the native binary as a child) goes with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    run = AgentRun(
        argv=argv,
        returncode=proc.returncode if proc.returncode is not None else -1,
        stdout=out.decode(errors="replace"),
        stderr=err.decode(errors="replace"),
        seconds=time.monotonic() - start,
        egress=trap.attempts[seen:],
    )
    if timed_out:
        raise AssertionError(f"the agent did not finish in {AGENT_TIMEOUT} s: {run}")
    return run


async def claude_run(
    home: Path,
    trap: EgressTrap,
    base_url: str,
    prompt: str,
    *,
    api_key: str | None = None,
    auth_token: str | None = None,
    model: str | None = None,
) -> AgentRun:
    """``claude -p PROMPT`` against ``base_url`` (``ANTHROPIC_BASE_URL``, no ``/v1``).

    ``api_key`` is sent as ``x-api-key`` (``ANTHROPIC_API_KEY``), ``auth_token``
    as ``Authorization: Bearer`` (``ANTHROPIC_AUTH_TOKEN``).
    """
    home.mkdir(parents=True, exist_ok=True)
    env = _offline_env(home, trap)
    env.update(
        {
            "ANTHROPIC_BASE_URL": base_url,
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CODE_MAX_RETRIES": "1",
        }
    )
    if api_key is not None:
        env["ANTHROPIC_API_KEY"] = api_key
    if auth_token is not None:
        env["ANTHROPIC_AUTH_TOKEN"] = auth_token
    argv = [str(agent_binary("claude")), "-p", prompt]
    if model is not None:
        argv += ["--model", model]
    return await _run(argv, env, home, trap)


def write_codex_config(codex_home: Path, base_url: str, model: str, *, websockets: bool) -> None:
    """A ``config.toml`` with one custom provider speaking the Responses API at ``base_url``."""
    codex_home.mkdir(parents=True, exist_ok=True)
    (codex_home / "config.toml").write_text(
        f'model = "{model}"\n'
        'model_provider = "oaimux_test"\n'
        "\n"
        "[model_providers.oaimux_test]\n"
        'name = "oaimux test"\n'
        f'base_url = "{base_url}"\n'
        'wire_api = "responses"\n'
        f'env_key = "{CODEX_KEY_VARIABLE}"\n'
        f"supports_websockets = {'true' if websockets else 'false'}\n"
        "request_max_retries = 1\n"
        "stream_max_retries = 1\n"
        "\n"
        "[features]\n"
        "plugins = false\n"
        "\n"
        "[analytics]\n"
        "enabled = false\n"
    )


async def codex_run(
    home: Path,
    trap: EgressTrap,
    base_url: str,
    prompt: str,
    *,
    key: str,
    model: str,
    websockets: bool,
) -> AgentRun:
    """``codex exec PROMPT`` with a provider at ``base_url`` (with ``/v1``) and ``key`` as its Bearer key."""
    codex_home = home / "codex"
    write_codex_config(codex_home, base_url, model, websockets=websockets)
    env = _offline_env(home, trap)
    env.update({"CODEX_HOME": str(codex_home), CODEX_KEY_VARIABLE: key})
    argv = [str(agent_binary("codex")), "exec", "--skip-git-repo-check", prompt]
    return await _run(argv, env, home, trap)
