"""Real client programs (curl, java) run as processes by the tests.

:func:`tool_or_skip` finds a program on PATH: missing, the test is skipped
locally and fails when CI is set (.ci/run installs what the suite needs).
:func:`run_client` runs one to completion within a bound and returns its output.
"""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest

__all__ = ["CLIENT_DEADLINE", "curl_sent_headers", "run_client", "tool_or_skip"]

CLIENT_DEADLINE = 120.0  # seconds for a client process (the JVM compiles its file first)


def tool_or_skip(name: str) -> str:
    found = shutil.which(name)
    if found is not None:
        return found
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not on PATH; CI must run this test (.ci/run installs it)")
    pytest.skip(f"{name} is not on PATH")


async def run_client(*cmd: str, stdin: bytes = b"") -> tuple[str, str]:
    """``cmd``'s stdout and stderr; it must exit 0 within :data:`CLIENT_DEADLINE`."""
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(CLIENT_DEADLINE):
            out, err = await proc.communicate(stdin)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")
    return out.decode(), err.decode(errors="replace")


def curl_sent_headers(verbose: str) -> list[str]:
    """The request lines ``curl -v`` shows on stderr (``> ...``), without the marker."""
    return [line[2:] for line in verbose.splitlines() if line.startswith("> ")]
