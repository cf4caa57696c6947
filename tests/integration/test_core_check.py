"""``oaimux check`` as a real process: the listen address, the warnings, and
``--probe`` against real upstream sockets (reachable, 401, 404 without /v1,
refused, silent until the deadline). ``serve`` logs the same warnings once."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.integration.test_core_cli import free_port, run, wait_healthy

ROOT = Path(__file__).parents[2]
UPSTREAM_KEY = "sk-probe-secret-0123456789"
WRONG_KEY = "sk-probe-wrong-9876543210"
PLACEHOLDER = "placeholder-key-from-the-file"


def write(tmp_path: Path, config: dict[str, Any], name: str = "routes.yaml") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OAIMUX_", "PORT", "OPENAI", "PROBE_", "ORG", "TITLE", "PROXY_KEY"))
    }
    env.update(extra)
    return env


def warnings_of(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("warning: ")]


ONE_UPSTREAM: dict[str, Any] = {
    "upstreams": {"a": {"url": "http://127.0.0.1:9/v1"}},
    "routes": [{"model": "m", "upstream": "a"}],
}


# ---------------------------------------------------------------------------
# The listen address and the warnings (no --probe)


def test_check_prints_the_listen_address_serve_would_use(tmp_path: Path) -> None:
    config = write(tmp_path, ONE_UPSTREAM)
    result = run("check", "--config", str(config), env=clean_env(PORT="9123"))
    assert result.returncode == 0, result.stderr
    assert "listen http://127.0.0.1:9123 (host from server.host, port from $PORT)" in (
        result.stdout
    )
    result = run(
        "check", "--config", str(config), "--host", "::1", "--port", "7000", env=clean_env(PORT="1")
    )
    assert "listen http://[::1]:7000 (host from --host, port from --port)" in result.stdout
    result = run("check", "--config", str(config), env=clean_env())
    assert "listen http://127.0.0.1:8080 (host from server.host, port from the default)" in (
        result.stdout
    )
    assert warnings_of(result.stdout) == []


@pytest.mark.parametrize(
    ("host", "keys", "warned"),
    [
        ("0.0.0.0", False, True),
        ("::", False, True),
        ("192.0.2.10", False, True),
        ("oaimux.example", False, True),
        ("0.0.0.0", True, False),
        ("127.0.0.2", False, False),
        ("::1", False, False),
        ("localhost", False, False),
    ],
)
def test_a_public_address_without_proxy_keys_warns(
    tmp_path: Path, host: str, keys: bool, warned: bool
) -> None:
    config = dict(ONE_UPSTREAM)
    if keys:
        config["auth"] = {"keys": [{"name": "team", "key": "sk-team-key-0001"}]}
    result = run("check", "--config", str(write(tmp_path, config)), "--host", host)
    assert result.returncode == 0, result.stderr
    found = warnings_of(result.stdout)
    if warned:
        assert len(found) == 1, result.stdout
        assert "is not a loopback address and there are no proxy keys (auth.keys)" in found[0]
        assert "anyone who can reach this address can spend your upstream credits" in found[0]
    else:
        assert found == [], result.stdout


def headers_config(**headers: str) -> dict[str, Any]:
    return {
        "upstreams": {"openai": {"url": "http://127.0.0.1:9/v1", "headers": {"set": headers}}},
        "routes": [{"model": "m", "upstream": "openai"}],
    }


def test_a_variable_set_to_an_empty_string_inside_a_header_warns(tmp_path: Path) -> None:
    config = write(tmp_path, headers_config(Authorization="Bearer ${OPENAI_API_KEY}"))
    result = run("check", "--config", str(config), env=clean_env(OPENAI_API_KEY=""))
    assert result.returncode == 0, result.stderr
    assert warnings_of(result.stdout) == [
        f"warning: {config}: upstreams.openai.headers.set.Authorization: ${{OPENAI_API_KEY}} "
        "expanded to an empty string (OPENAI_API_KEY is set to an empty string), "
        "so the header is sent with that part empty"
    ]
    # Set: no warning.
    result = run("check", "--config", str(config), env=clean_env(OPENAI_API_KEY=UPSTREAM_KEY))
    assert warnings_of(result.stdout) == []
    assert UPSTREAM_KEY not in result.stdout + result.stderr


def test_an_empty_default_inside_a_header_warns_but_not_elsewhere(tmp_path: Path) -> None:
    config = headers_config(**{"OpenAI-Organization": "${ORG:-}"})
    config["server"] = {"host": "${OAIMUX_TEST_HOST:-127.0.0.1}"}
    result = run("check", "--config", str(write(tmp_path, config)), env=clean_env())
    found = warnings_of(result.stdout)
    assert len(found) == 1, result.stdout
    assert (
        "upstreams.openai.headers.set.OpenAI-Organization: ${ORG} expanded to an empty"
        in (found[0])
    )
    assert "ORG is not set and its default is empty" in found[0]


def test_a_credential_still_holding_its_placeholder_warns(tmp_path: Path) -> None:
    config = headers_config(
        Authorization=f"Bearer ${{OPENAI_API_KEY:-{PLACEHOLDER}}}",
        **{"X-Title": "${TITLE:-oaimux}"},  # a default that is no credential: fine
    )
    config["auth"] = {"keys": [{"name": "team", "key": f"${{PROXY_KEY:-{PLACEHOLDER}}}"}]}
    path = write(tmp_path, config)
    result = run("check", "--config", str(path), env=clean_env())
    assert result.returncode == 0, result.stderr
    assert warnings_of(result.stdout) == [
        f"warning: {path}: upstreams.openai.headers.set.Authorization: OPENAI_API_KEY is not "
        "set, so this credential is still the ${OPENAI_API_KEY:-default} placeholder written "
        "in the file",
        f"warning: {path}: auth.keys[0].key: PROXY_KEY is not set, so this credential is still "
        "the ${PROXY_KEY:-default} placeholder written in the file",
    ]
    assert PLACEHOLDER not in result.stdout + result.stderr
    result = run(
        "check",
        "--config",
        str(path),
        env=clean_env(OPENAI_API_KEY=UPSTREAM_KEY, PROXY_KEY="sk-team-real-0001"),
    )
    assert warnings_of(result.stdout) == []


def test_serve_logs_the_same_warnings_once_at_start(tmp_path: Path) -> None:
    config = headers_config(Authorization=f"Bearer ${{OPENAI_API_KEY:-{PLACEHOLDER}}}")
    config["upstreams"]["openai"]["headers"]["set"]["OpenAI-Organization"] = "${ORG}"
    path = write(tmp_path, config)
    env = clean_env(ORG="")
    expected = [
        w.removeprefix("warning: ")
        for w in warnings_of(run("check", "--config", str(path), env=env).stdout)
    ]
    assert len(expected) == 2
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(path),
            "--port",
            str(port),
            "--workers",
            "2",
        ],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_healthy(port, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    for warning in expected:
        assert err.count(f"WARNING oaimux: {warning}\n") == 1, err
    assert PLACEHOLDER not in err


def test_serve_on_a_public_address_without_keys_warns_before_listening(tmp_path: Path) -> None:
    # The port is taken, so serve warns, then fails to listen: nothing is
    # exposed on the public address by this test.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(
            "serve",
            "--config",
            str(write(tmp_path, ONE_UPSTREAM)),
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
        )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert "anyone who can reach this address can spend your upstream credits" in lines[0]
    assert "WARNING" in lines[0] and "cannot listen" in lines[1]


# ---------------------------------------------------------------------------
# --probe against real sockets


def models_app() -> web.Application:
    """An upstream whose /v1/models wants UPSTREAM_KEY; nothing at /models."""

    async def models(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {UPSTREAM_KEY}":
            return web.json_response(
                {
                    "error": {
                        "message": "Incorrect API key provided",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                },
                status=401,
            )
        ids = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
        return web.json_response(
            {"object": "list", "data": [{"id": i, "object": "model"} for i in ids]}
        )

    app = web.Application()
    app.router.add_get("/v1/models", models)
    return app


@pytest.fixture
async def upstream(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(models_app())
    return server


@pytest.fixture
def refused_url() -> str:
    with socket.socket() as s:  # bound, never listening, then closed: refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture
async def silent_url() -> AsyncIterator[str]:
    """Accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


def probe_config(upstreams: dict[str, dict[str, Any]], routed: list[str]) -> dict[str, Any]:
    return {
        "upstreams": upstreams,
        "routes": [{"model": f"model-{name}", "upstream": name} for name in routed],
    }


def keyed(url: str, variable: str = "PROBE_KEY") -> dict[str, Any]:
    return {"url": url, "headers": {"set": {"Authorization": f"Bearer ${{{variable}}}"}}}


async def probe(
    tmp_path: Path, config: dict[str, Any], *args: str, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """``oaimux check --probe`` as a process, while this loop serves the upstreams."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "check",
        "--probe",
        "--config",
        str(write(tmp_path, config)),
        *args,
        cwd=ROOT,
        env=clean_env(PROBE_KEY=UPSTREAM_KEY, PROBE_WRONG=WRONG_KEY, **(env or {})),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert b"Traceback" not in err, err.decode()
    output = out.decode() + err.decode()
    assert UPSTREAM_KEY not in output and WRONG_KEY not in output
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def line_of(output: str, name: str) -> str:
    (line,) = [x for x in output.splitlines() if x.startswith(f"  {name} (")]
    return line


async def test_probe_reports_every_upstream_in_one_line(
    tmp_path: Path, upstream: TestServer, refused_url: str, silent_url: str
) -> None:
    base = str(upstream.make_url("")).rstrip("/")
    config = probe_config(
        {
            "good": keyed(f"{base}/v1"),
            "wrongkey": keyed(f"{base}/v1", "PROBE_WRONG"),
            "nov1": keyed(base),
            "down": {"url": refused_url},
            "silent": {"url": silent_url},
            "demo": {"builtin": "demo"},
        },
        routed=["good", "wrongkey", "nov1", "down", "silent", "demo"],
    )
    status, out = await probe(tmp_path, config, "--timeout", "1")
    assert status == 1
    assert "probing 6 upstreams: GET <url>/models, 1s each" in out
    good = line_of(out, "good")
    assert good.startswith(f"  good ({base}/v1): reachable, HTTP 200 in ")
    assert good.endswith(" ms, lists 3 models")
    assert line_of(out, "wrongkey").endswith(": credential refused")
    assert "reachable, HTTP 401 in " in line_of(out, "wrongkey")
    nov1 = line_of(out, "nov1")
    assert "reachable, HTTP 404 in " in nov1
    assert nov1.endswith(": no /models here: is the base URL missing /v1?")
    assert line_of(out, "down") == (
        f"  down ({refused_url}): unreachable: connection refused (nothing listens there?)"
    )
    assert line_of(out, "silent") == f"  silent ({silent_url}): unreachable: no answer within 1s"
    assert line_of(out, "demo").startswith("  demo (built in): reachable, HTTP 200 in ")
    assert line_of(out, "demo").endswith(" ms, lists 1 model")
    assert out.splitlines()[-1] == (
        "probe failed: routes use wrongkey, down, silent, which cannot serve requests"
    )


async def test_probe_passes_when_every_routed_upstream_answers(
    tmp_path: Path, upstream: TestServer, refused_url: str
) -> None:
    base = str(upstream.make_url("")).rstrip("/")
    config = probe_config(
        {"good": keyed(f"{base}/v1"), "nov1": keyed(base), "spare": {"url": refused_url}},
        routed=["good", "nov1"],  # a 404 is reported, not failed; spare is in no route
    )
    status, out = await probe(tmp_path, config)
    assert status == 0, out
    assert line_of(out, "spare").endswith(
        "unreachable: connection refused (nothing listens there?) [no route uses it]"
    )
    assert "probe failed" not in out


@pytest.mark.parametrize("which", ["wrongkey", "down", "silent"])
async def test_each_unusable_upstream_alone_fails_the_probe(
    tmp_path: Path, upstream: TestServer, refused_url: str, silent_url: str, which: str
) -> None:
    url = str(upstream.make_url("/v1"))
    candidates = {
        "wrongkey": keyed(url, "PROBE_WRONG"),
        "down": {"url": refused_url},
        "silent": {"url": silent_url},
    }
    config = probe_config({"good": keyed(url), which: candidates[which]}, routed=["good", which])
    status, out = await probe(tmp_path, config, "--timeout", "0.5")
    assert status == 1, out
    assert out.splitlines()[-1] == f"probe failed: routes use {which}, which cannot serve requests"


async def test_upstreams_are_probed_at_the_same_time(aiohttp_server: Any, tmp_path: Path) -> None:
    """Each upstream answers only once all three were asked: one at a time,
    the first would wait out its deadline."""
    arrived = 0
    everyone = asyncio.Event()

    async def models(request: web.Request) -> web.Response:
        nonlocal arrived
        arrived += 1
        if arrived == 3:
            everyone.set()
        await everyone.wait()
        return web.json_response({"object": "list", "data": [{"id": "x", "object": "model"}]})

    app = web.Application()
    app.router.add_get("/{name}/v1/models", models)
    server = await aiohttp_server(app)
    names = ["one", "two", "three"]
    config = probe_config({n: {"url": str(server.make_url(f"/{n}/v1"))} for n in names}, names)
    status, out = await probe(tmp_path, config, "--timeout", "20")
    assert status == 0, out
    assert all("lists 1 model" in line_of(out, n) for n in names)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_an_untrusted_tls_certificate_is_named(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def ignore(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(ignore, "127.0.0.1", 0, ssl=context)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda loop, ctx: None)  # the refused handshake, server side
    try:
        port = server.sockets[0].getsockname()[1]
        config = probe_config({"tls": {"url": f"https://127.0.0.1:{port}/v1"}}, ["tls"])
        status, out = await probe(tmp_path, config)
    finally:
        server.close()
        await server.wait_closed()
    assert status == 1
    assert line_of(out, "tls") == (
        f"  tls (https://127.0.0.1:{port}/v1): unreachable: TLS certificate not accepted "
        "(self-signed certificate)"
    )
