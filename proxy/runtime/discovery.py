"""``models: discover``: ask an upstream which model ids it serves.

A route with ``models: discover`` (and an optional ``prefix``) routes every id
its upstreams list at ``GET {url}/models``, as ``prefix + id``; the prefix is
stripped before forwarding (routing.RouteTable does the mapping).

When and how (the contract):

- At start-up the proxy serves at once; discovery runs in the background.
  Until an upstream has answered, its ids are simply not routed yet.
- Each ``GET /models`` has a deadline (:attr:`Discovery.timeout`, 10 s) and
  the upstream's own headers (its credential injected, like any request).
- An upstream that fails (unreachable, timeout, non-200, not a model list)
  is asked again every :attr:`Discovery.retry_every` seconds (60 s) until it
  answers; the others are not held up. Its failure is logged as a warning the
  first time, when the reason changes, and every 10 minutes while it lasts;
  its recovery once (observe/failurelog.py). There is no periodic refresh
  after success: send SIGHUP.
- On reload (SIGHUP) the new configuration is served at once with the ids
  already known for the same upstream (same name and URL), and every
  discover route is asked again.
- The routing table is immutable: every change builds a new Runtime and swaps
  it whole (runtime.RuntimeHolder), so a request sees one consistent table.
- A route with several upstreams routes the union of their ids, in order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from ..config.settings import Settings
from ..observe.failurelog import FailureLog
from .runtime import RuntimeHolder, UpstreamPlan, build_runtime

__all__ = [
    "Discovery",
    "DiscoveryFailed",
    "fetch_model_ids",
    "models_request_headers",
    "parse_model_ids",
]

log = logging.getLogger("oaimux.discovery")

_MAX_LIST_BYTES = 8 * 1024 * 1024
_MAX_IDS = 10_000
_MAX_ID_LENGTH = 256


class DiscoveryFailed(Exception):
    """An upstream's model list could not be had; the message says why (no secrets)."""


async def fetch_model_ids(
    session: aiohttp.ClientSession, plan: UpstreamPlan, timeout: float
) -> tuple[str, ...]:
    """The ids of ``GET {url}/models`` (OpenAI's list shape), or :class:`DiscoveryFailed`."""
    headers = models_request_headers(plan, "discover")
    try:
        async with asyncio.timeout(timeout):
            async with session.get(
                plan.url_for("models", ""),
                headers=headers,
                allow_redirects=False,
                timeout=plan.client_timeout,
            ) as resp:
                if resp.status != 200:
                    raise DiscoveryFailed(f"GET /models answered HTTP {resp.status}")
                body = await resp.content.read(_MAX_LIST_BYTES + 1)
                if len(body) > _MAX_LIST_BYTES:
                    raise DiscoveryFailed(f"the model list is over {_MAX_LIST_BYTES} bytes")
    except TimeoutError:
        raise DiscoveryFailed(f"no complete answer within {timeout:g} seconds") from None
    except (aiohttp.ClientError, OSError) as exc:
        # The exception's repr can carry request headers: name its type only.
        raise DiscoveryFailed(f"could not be reached ({type(exc).__name__})") from None
    return parse_model_ids(body)


def models_request_headers(plan: UpstreamPlan, purpose: str) -> CIMultiDict[str]:
    """The headers of the proxy's own ``GET /models``: the upstream's rewrites
    (its credential set), as on any request; ``purpose`` starts the request id."""
    return plan.request_headers.build(
        CIMultiDictProxy(CIMultiDict({"Accept": "application/json"})),
        f"{purpose}-{uuid.uuid4().hex}",
        None,
    )


def parse_model_ids(body: bytes) -> tuple[str, ...]:
    """The usable ids of an OpenAI model list, or :class:`DiscoveryFailed`."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise DiscoveryFailed("GET /models did not answer JSON") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise DiscoveryFailed("GET /models did not answer a list ({'data': [...]})")
    ids: dict[str, None] = {}
    for item in data[:_MAX_IDS]:
        model_id = item.get("id") if isinstance(item, dict) else None
        if (
            isinstance(model_id, str)
            and 0 < len(model_id) <= _MAX_ID_LENGTH
            and model_id.isprintable()
        ):
            ids.setdefault(model_id)
    return tuple(ids)


class Discovery:
    """Keeps the discovered ids of one app and swaps the runtime when they change.

    Owned by the app (app.py starts it after the upstream session exists and
    stops it at cleanup). ``complete`` is set whenever every upstream of every
    discover route of the current configuration has answered.
    """

    def __init__(
        self, holder: RuntimeHolder, *, timeout: float = 10.0, retry_every: float = 60.0
    ) -> None:
        self.holder = holder
        self.timeout = timeout
        self.retry_every = retry_every
        self.complete = asyncio.Event()
        self.attempts = 0
        # (upstream name, upstream URL) -> its ids, from the last answer.
        self._known: dict[tuple[str, str], tuple[str, ...]] = {}
        self._failures: dict[str, FailureLog] = {}  # upstream name -> its failure log
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def start(self, session: aiohttp.ClientSession) -> None:
        """Begin discovering for the current configuration (app start-up)."""
        self._session = session
        self.refresh(self.holder.current.settings)

    def refresh(self, settings: Settings) -> None:
        """Serve ``settings`` with the ids known so far; ask its discover upstreams again.

        Swaps in a runtime for ``settings`` at once (on reload, serve.py swaps
        first and this swaps again with the discovered ids); safe to call any time.
        """
        if self._task is not None:
            self._task.cancel()
            self._task = None
        wanted = _discover_upstreams(settings)
        if wanted or self.holder.current.settings is not settings:
            self._swap(settings)
        if not wanted:
            self.complete.set()
            return
        self.complete.clear()
        if self._session is not None:
            self._task = asyncio.create_task(
                self._run(settings, self._session), name="oaimux model discovery"
            )

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _swap(self, settings: Settings) -> None:
        self.holder.swap(build_runtime(settings, self.discovered_for(settings)))

    def discovered_for(self, settings: Settings) -> dict[int, tuple[str, ...]]:
        """Route index -> the ids known for its upstreams (union, in order)."""
        out: dict[int, tuple[str, ...]] = {}
        for route in settings.routes:
            if not route.discover:
                continue
            ids: dict[str, None] = {}
            for name in route.upstreams:
                key = (name, str(settings.upstreams[name].url))
                for model_id in self._known.get(key, ()):
                    ids.setdefault(model_id)
            out[route.index] = tuple(ids)
        return out

    def _failure_log(self, name: str) -> FailureLog:
        if name not in self._failures:
            self._failures[name] = FailureLog(log, f"model discovery: upstream {name}")
        return self._failures[name]

    async def _run(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        plans = build_runtime(settings).plans
        pending = dict.fromkeys(_discover_upstreams(settings))
        while True:
            results = await asyncio.gather(
                *(fetch_model_ids(session, plans[name], self.timeout) for name in pending),
                return_exceptions=True,
            )
            self.attempts += 1
            changed = False
            for name, result in zip(list(pending), results, strict=True):
                if isinstance(result, BaseException):
                    # Anything but DiscoveryFailed is a bug: name its type only
                    # (a repr could carry headers) and keep the task alive.
                    why = result if isinstance(result, DiscoveryFailed) else type(result).__name__
                    self._failure_log(name).failed(
                        f"failed: {why}; asking again every {self.retry_every:g}s"
                    )
                    continue
                self._failure_log(name).recovered()
                key = (name, str(settings.upstreams[name].url))
                if self._known.get(key) != result:
                    self._known[key] = result
                    changed = True
                del pending[name]
                log.info("model discovery: upstream %s lists %d models", name, len(result))
            if changed and self.holder.current.settings is settings:
                self._swap(settings)
            if not pending:
                self.complete.set()
                return
            await asyncio.sleep(self.retry_every)


def _discover_upstreams(settings: Settings) -> list[str]:
    names: dict[str, None] = {}
    for route in settings.routes:
        if route.discover:
            for name in route.upstreams:
                names.setdefault(name)
    return list(names)
