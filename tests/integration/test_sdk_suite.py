"""The official openai SDK's own test suite, straight to an upstream and through oaimux.

The ``openai`` package's ``tests/api_resources`` (from its sdist, release
``OPENAI_SDK`` below) runs twice against the recording upstream of
tests/fakes/recording.py: once directly, then through a real ``oaimux serve``
with a catch-all model route and a default route. Every request the suite
sends must reach the upstream the same way both times (method, path, query,
headers and body bytes), and every test must end the same way (passed,
skipped, or failed with the same exception type).

Left aside in the comparison: credentials and hop-by-hop headers (the proxy
drops them), the ``X-Request-Id`` the proxy sets (README, Observability), the
multipart boundary (the SDK draws a random one per request), and
``GET /v1/models[/{id}]``, which the proxy answers itself (README, Endpoints).

The sdist, and a virtual environment with the SDK and the test dependencies
its conftest imports, are kept in ``$XDG_CACHE_HOME/oaimux-tests`` (else
``~/.cache/oaimux-tests``) and made on first use, so our own environment
never gets the SDK suite's dependencies.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from tests.fakes.recording import MARK_PATH, Recorded, RecordingUpstream
from tests.faults.process import running_proxy, write_config

pytestmark = pytest.mark.slow

# The openai release whose own tests run here: the one `pip install openai`
# resolves for our test environment. Pinned here only.
OPENAI_SDK = "3.63.0"
# What the SDK's tests/conftest.py and tests/utils.py import besides the SDK.
SUITE_DEPENDENCIES = ("pytest==9.2.0", "pytest-asyncio==1.5.0", "rich==15.0.0")
SUITE_DIR = Path(__file__).resolve().parents[1] / "sdk_suite"
EXAMPLES_SCRIPT = SUITE_DIR / "examples.py"
# A bound on one run of the suite, far above the 60-100 s it takes here.
SUITE_TIMEOUT = 1800.0

# Not compared: credentials (RFC 9110 §11.6.2; the proxy drops the client's),
# hop-by-hop headers (RFC 9110 §7.6.1), framing (the body bytes are compared
# instead: the SDK's aiohttp transport sends "Content-Length: 0" on a DELETE,
# which the proxy forwards with no body and no length, RFC 9110 §8.6) and the
# proxy's own request id.
CREDENTIALS = frozenset(
    {"authorization", "api-key", "x-api-key", "cookie", "openai-organization", "openai-project"}
)
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"}
)
NOT_COMPARED = CREDENTIALS | HOP_BY_HOP | {"content-length", "x-request-id"}
_PROXY_OWN = re.compile(r"/v1/models(/.+)?")
_BOUNDARY = re.compile(r"boundary=\"?([^\";]+)")


@dataclass(frozen=True)
class Suite:
    source: Path  # the unpacked sdist: tests/ and api.md
    python: Path  # the interpreter of the suite's own environment
    examples: Path  # tests/sdk_suite/examples.py's table for this release


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "oaimux-tests" / f"openai-{OPENAI_SDK}"


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")


def _unpack(sdist: Path, into: Path) -> None:
    """Only regular files and directories under the release's own folder."""
    top = f"openai-{OPENAI_SDK}/"
    with tarfile.open(sdist) as tar:
        members = [
            m
            for m in tar.getmembers()
            if (m.isfile() or m.isdir()) and m.name.startswith(top) and ".." not in m.name
        ]
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, members=members, filter="data")
        else:  # Python before 3.11.4: the members were vetted above
            tar.extractall(into, members=members)


def prepare_suite() -> Suite:
    """Fetch and unpack the sdist, make the suite's environment and the example
    table, each once per cache (a lock keeps parallel runs from racing)."""
    root = _cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        source = root / f"openai-{OPENAI_SDK}"
        if not (source / "tests" / "api_resources").is_dir():
            sdist = root / f"openai-{OPENAI_SDK}.tar.gz"
            if not sdist.is_file():
                _run(
                    sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--no-binary", ":all:", f"openai=={OPENAI_SDK}", "--dest", str(root),
                )  # fmt: skip
            _unpack(sdist, root)
        venv = root / "venv"
        python = venv / "bin" / "python"
        wanted = "\n".join((f"openai[aiohttp]=={OPENAI_SDK}", *SUITE_DEPENDENCIES))
        ready = venv / "oaimux-installed.txt"
        if not ready.is_file() or ready.read_text() != wanted:
            _run(sys.executable, "-m", "venv", "--clear", str(venv))
            _run(str(python), "-m", "pip", "install", "--quiet", *wanted.splitlines())
            ready.write_text(wanted)
        version = hashlib.sha256(EXAMPLES_SCRIPT.read_bytes()).hexdigest()[:12]
        examples = root / f"examples-{version}.json"
        if not examples.is_file():
            _run(str(python), str(EXAMPLES_SCRIPT), str(source), str(examples))
    return Suite(source, python, examples)


async def run_suite(suite: Suite, base_url: str, mark_url: str, outcomes: Path) -> dict[str, str]:
    """Run the SDK's tests/api_resources against ``base_url``; each test's outcome."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PYTEST_", "OAIMUX_"))
    }
    env.update(
        TEST_API_BASE_URL=base_url,
        OAIMUX_SUITE_MARK_URL=mark_url,
        OAIMUX_SUITE_OUTCOMES=str(outcomes),
        PYTHONPATH=str(SUITE_DIR),
        PYTHONDONTWRITEBYTECODE="1",
    )
    proc = await asyncio.create_subprocess_exec(
        str(suite.python), "-m", "pytest", "tests/api_resources",
        # Their addopts ask for pytest-xdist; one process keeps the test marks in order.
        "-o", "addopts=", "-p", "no:cacheprovider", "-p", "oaimux_suite_plugin",
        "-q", "--tb=no", "--no-header",
        cwd=suite.source, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with asyncio.timeout(SUITE_TIMEOUT):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # 0: all passed, 1: some failed; anything else is the run itself going wrong.
    assert proc.returncode in (0, 1), out.decode(errors="replace")[-4000:]
    result: dict[str, str] = json.loads(outcomes.read_text())
    return result


def comparable(request: Recorded) -> tuple[Any, ...]:
    headers = dict(request.headers)
    body = request.body
    boundary = _BOUNDARY.search(headers.get("content-type", ""))
    if boundary is not None:
        token = boundary.group(1)
        headers["content-type"] = headers["content-type"].replace(token, "BOUNDARY")
        body = body.replace(token.encode(), b"BOUNDARY")
    kept = sorted((k, v) for k, v in headers.items() if k not in NOT_COMPARED)
    return (request.method, request.path, request.query, tuple(kept), body)


def answered_by_the_proxy(request: Recorded) -> bool:
    return request.method in ("GET", "HEAD") and _PROXY_OWN.fullmatch(request.path) is not None


def differences(direct: dict[str, list[Recorded]], proxied: dict[str, list[Recorded]]) -> list[str]:
    found = []
    for test in sorted(direct.keys() | proxied.keys()):
        want = sorted(comparable(r) for r in direct.get(test, []) if not answered_by_the_proxy(r))
        got = sorted(comparable(r) for r in proxied.get(test, []))
        if want != got:
            missing = [w for w in want if w not in got]
            extra = [g for g in got if g not in want]
            found.append(f"{test}:\n  direct only: {missing}\n  through oaimux only: {extra}")
    return found


def tally(outcomes: dict[str, str]) -> str:
    counts = Counter(o.partition(":")[0] for o in outcomes.values())
    return ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "skipped"))


async def test_the_sdk_suite_sends_the_same_requests_through_oaimux(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    suite = await asyncio.to_thread(prepare_suite)
    upstream = RecordingUpstream(json.loads(suite.examples.read_text()))
    server: TestServer = await aiohttp_server(upstream.app(), auto_decompress=False)
    base_url = str(server.make_url("/v1"))
    mark_url = str(server.make_url(MARK_PATH))

    started = time.monotonic()
    direct = await run_suite(suite, base_url, mark_url, tmp_path / "direct.json")
    direct_seconds = time.monotonic() - started
    direct_requests = upstream.take()

    config = {
        "upstreams": {"mock": {"url": base_url}},
        "routes": [{"model": "*", "upstream": "mock"}, {"default": True, "upstream": "mock"}],
    }
    async with running_proxy(write_config(tmp_path / "routes.yaml", config)) as proxy:
        started = time.monotonic()
        proxied = await run_suite(suite, f"{proxy.url}/v1", mark_url, tmp_path / "proxied.json")
        proxied_seconds = time.monotonic() - started
    proxied_requests = upstream.take()

    summary = (
        f"direct: {tally(direct)} ({direct_seconds:.0f} s); "
        f"through oaimux: {tally(proxied)} ({proxied_seconds:.0f} s)"
    )
    print(summary)
    sent = sum(len(r) for r in direct_requests.values())
    assert len(direct) > 5000 and sent > 5000, summary  # the suite really ran
    changed = {t: (direct.get(t), proxied.get(t)) for t in direct.keys() | proxied.keys()}
    changed = {t: pair for t, pair in changed.items() if pair[0] != pair[1]}
    assert not changed, f"{summary}\n{len(changed)} tests ended differently, e.g.\n" + "\n".join(
        f"{t}: {pair}" for t, pair in sorted(changed.items())[:20]
    )
    unequal = differences(direct_requests, proxied_requests)
    assert not unequal, f"{summary}\n{len(unequal)} tests' requests differ, e.g.\n" + "\n".join(
        unequal[:20]
    )
