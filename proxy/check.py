"""What ``oaimux check`` (and ``serve``, at start) tells about a configuration.

- :func:`startup_warnings`: things that load fine but are probably a mistake:
  a public listen address with no proxy keys, a ``${VAR}`` that expanded to
  an empty string inside a header, a credential still holding the
  ``${VAR:-default}`` placeholder. ``serve`` logs the same lines once at start.
- :func:`probe_upstreams` (``check --probe``): asks every upstream for
  ``GET <url>/models`` with its own headers, all at once, each within a
  deadline, and says per upstream whether it answered, how, how fast and how
  many models it lists.

Nothing here prints a header value, a key or a URL query: the lines name
key paths, variables, upstream names and base URLs (which the config loader
refuses with a query or credentials in them).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import dataclass

import aiohttp

from .config.settings import CREDENTIAL_HEADERS, EnvSubstitution, Settings
from .runtime.discovery import DiscoveryFailed, models_request_headers, parse_model_ids
from .runtime.runtime import UpstreamPlan, build_runtime
from .server.builtin_upstreams import BuiltinUpstreams

__all__ = [
    "PROBE_TIMEOUT",
    "ProbeResult",
    "is_loopback",
    "listen_url",
    "probe_upstreams",
    "startup_warnings",
]

PROBE_TIMEOUT = 5.0
_MAX_LIST_BYTES = 8 * 1024 * 1024


def is_loopback(host: str) -> bool:
    """Only this machine can reach ``host`` (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name or an interface address: reachable from elsewhere


def listen_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}"


def startup_warnings(settings: Settings, host: str, port: int) -> list[str]:
    """Every warning for serving ``settings`` on ``host``:``port``, one line each."""
    warnings: list[str] = []
    if not is_loopback(host) and not settings.auth_keys:
        warnings.append(
            f"{listen_url(host, port)} is not a loopback address and there are no proxy keys "
            "(auth.keys): anyone who can reach this address can spend your upstream credits"
        )
    for noted in settings.env_substitutions:
        if noted.empty and _is_header(noted):
            warnings.append(f"{settings.source}: {noted.path}: {_empty_reason(noted)}")
        elif noted.from_default and _is_credential(noted):
            warnings.append(
                f"{settings.source}: {noted.path}: {noted.variable} is not set, so this "
                f"credential is still the ${{{noted.variable}:-default}} placeholder "
                "written in the file"
            )
    return warnings


def _is_header(noted: EnvSubstitution) -> bool:
    return noted.path.startswith("upstreams.") and ".headers.set." in noted.path


def _is_credential(noted: EnvSubstitution) -> bool:
    if _is_header(noted):
        return noted.path.rpartition(".")[2].lower() in CREDENTIAL_HEADERS
    return noted.path.startswith("auth.keys[") and noted.path.endswith("].key")


def _empty_reason(noted: EnvSubstitution) -> str:
    how = (
        f"{noted.variable} is not set and its default is empty"
        if noted.from_default
        else f"{noted.variable} is set to an empty string"
    )
    return (
        f"${{{noted.variable}}} expanded to an empty string ({how}), "
        "so the header is sent with that part empty"
    )


# ---------------------------------------------------------------------------
# check --probe


@dataclass(frozen=True, slots=True)
class ProbeResult:
    name: str
    where: str  # the base URL, or "built in"
    used: bool  # named by a route
    reachable: bool
    credential_refused: bool
    detail: str  # what happened, for a person

    @property
    def failed(self) -> bool:
        """Fails ``check --probe``: a route's upstream that cannot serve requests."""
        return self.used and (not self.reachable or self.credential_refused)

    def line(self) -> str:
        unused = "" if self.used else " [no route uses it]"
        return f"  {self.name} ({self.where}): {self.detail}{unused}"


async def probe_upstreams(settings: Settings, timeout: float = PROBE_TIMEOUT) -> list[ProbeResult]:
    """Probe every upstream of ``settings`` at once; results in config order."""
    used = {name for route in settings.routes for name in route.upstreams}
    builtins = BuiltinUpstreams()
    try:
        bound = builtins.bind(settings)
        await builtins.ready()
        plans = build_runtime(bound).plans
        async with aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(), trust_env=False, auto_decompress=True
        ) as session:
            return list(
                await asyncio.gather(
                    *(_probe(session, plan, name in used, timeout) for name, plan in plans.items())
                )
            )
    finally:
        await builtins.close()


async def _probe(
    session: aiohttp.ClientSession, plan: UpstreamPlan, used: bool, timeout: float
) -> ProbeResult:
    upstream = plan.upstream
    where = "built in" if upstream.builtin is not None else plan.base

    def result(reachable: bool, detail: str, refused: bool = False) -> ProbeResult:
        return ProbeResult(plan.name, where, used, reachable, refused, detail)

    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            async with session.get(
                plan.url_for("models", ""),
                headers=models_request_headers(plan, "probe"),
                allow_redirects=False,
            ) as resp:
                status = resp.status
                body = await resp.content.read(_MAX_LIST_BYTES) if status == 200 else b""
    except TimeoutError:
        return result(False, f"unreachable: no answer within {timeout:g}s")
    except (aiohttp.ClientError, OSError) as exc:
        return result(False, f"unreachable: {_connect_failure(exc)}")
    took = f"reachable, HTTP {status} in {(time.monotonic() - started) * 1000:.0f} ms"
    if status == 200:
        try:
            count = len(parse_model_ids(body))
        except DiscoveryFailed:
            return result(True, f"{took}, but not a model list: is this an OpenAI-compatible URL?")
        return result(True, f"{took}, lists {count} model{'s' * (count != 1)}")
    if status in (401, 403):
        return result(True, f"{took}: credential refused", refused=True)
    if status == 404:
        hint = "" if plan.path_prefix.endswith("/v1") else ": is the base URL missing /v1?"
        return result(True, f"{took}: no /models here{hint}")
    if status == 429:
        return result(True, f"{took}: rate limited (the credential was accepted)")
    if 300 <= status < 400:
        return result(True, f"{took}: redirects elsewhere (not followed)")
    if status >= 500:
        return result(True, f"{took}: the upstream reports an error")
    return result(True, took)


def _connect_failure(exc: BaseException) -> str:
    """Why a connection failed, in words; never the exception's text (it can
    carry the request's headers or URL)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        error = exc.certificate_error
        why = getattr(error, "verify_message", None) or getattr(error, "reason", None)
        return f"TLS certificate not accepted ({why})" if why else "TLS certificate not accepted"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "TLS handshake failed"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "DNS lookup failed (no such host?)"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "connection refused (nothing listens there?)"
        return f"cannot connect ({exc.os_error.strerror or type(exc.os_error).__name__})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "closed the connection without answering"
    return f"failed ({type(exc).__name__})"
