"""Prometheus metrics: the only module that imports ``prometheus_client``.

Each application gets its own :class:`Metrics`, with its own
``CollectorRegistry`` (tests build many apps in one process; the global
registry would refuse the second set of names).

With ``--workers N`` every worker writes its samples to files in a directory
shared by all (the library's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``);
a scrape answered by any worker then reads every worker's files, so one scrape
sees the whole server. The parent creates that directory before forking and
removes it at exit (:func:`share_metrics_across_workers`).

The metrics themselves (names, help texts, labels) are declared in
metric_families.py. Label values are bounded by the configuration: ``model``
is a routing-table entry (an exact id, a glob pattern, or a discovered id),
never the string a client sent; ``upstream`` is a configured upstream name;
``key`` is a proxy key's configured name (never the key; ``""`` without proxy
keys, and a failed key check never reaches a token count); ``kind``,
``status_class``, ``type``, ``window``, ``reason`` and the error ``status``
and ``code`` come from fixed sets.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import tempfile
from bisect import bisect_left
from collections.abc import Iterable

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    values,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from .. import SERVER
from . import metric_families as families
from .metric_families import Family
from .usage import Usage

__all__ = [
    "BREAKER_STATES",
    "MULTIPROC_ENV",
    "Metrics",
    "forget_worker",
    "metrics_app",
    "serve_metrics",
    "share_metrics_across_workers",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds. LLM calls range from milliseconds (embeddings, cached errors) to
# many minutes (long generations streamed to the end).
_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0, 120.0, 300.0, 600.0, float("inf"),
)  # fmt: skip

# With several workers, how stale another worker's scrape may see this one's counters.
_SYNC_SECONDS = 1.0

BREAKER_STATES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
_STATUS_CLASSES = tuple(f"{n}xx" for n in range(10))


# oaimux_tokens_total's type label, in the order count_tokens keeps them.
_TOKEN_TYPES = ("prompt", "completion", "cache_read", "cache_creation")


class Metrics:
    """The proxy's metrics.

    A request costs little: its counts (requests, tokens, the histograms'
    buckets and sums) and the two gauges are kept as plain numbers on the hot
    path and handed to prometheus_client (whose every increment takes a
    lock) in one batch by :meth:`sync`, which runs before every collection
    (so a scrape, or ``registry.get_sample_value``, always sees every
    finished request) and, with several workers, once a second, so the other
    workers' scrapes see this one's samples.

    ``upstreams`` are pre-registered so every breaker shows ``closed`` (0)
    before its first request. ``multiprocess_dir`` ``None`` means the
    ``PROMETHEUS_MULTIPROC_DIR`` environment variable; ``""`` forces one process.
    """

    def __init__(self, upstreams: Iterable[str] = (), multiprocess_dir: str | None = None) -> None:
        directory = (
            multiprocess_dir if multiprocess_dir is not None else os.environ.get(MULTIPROC_ENV)
        )
        self.multiprocess = bool(directory)
        # No auto-describe: it would collect every collector at registration,
        # and the multiprocess one then reads each sibling worker's file, which
        # a worker starting at the same moment may have created but not yet
        # sized (struct.error on an empty file, and this worker dies).
        self.registry = CollectorRegistry(auto_describe=False)
        # First in the registry: every collection starts by publishing what is pending.
        self.registry.register(_SyncFirst(self))
        own: CollectorRegistry | None
        if directory:
            _use_multiprocess_values()
            # Samples go to the shared files only; the exposed registry reads
            # every worker's files at scrape time.
            own = None
            MultiProcessCollector(self.registry, path=directory)  # type: ignore[no-untyped-call]
        else:
            own = self.registry
            ProcessCollector(registry=own)
            PlatformCollector(registry=own)
        self.requests = _counter(families.REQUESTS, own)
        self.duration = _histogram(families.DURATION, own)
        self.ttfb = _histogram(families.TTFB, own)
        self.in_flight = _gauge(families.IN_FLIGHT, own)
        self.open_streams = _gauge(families.OPEN_STREAMS, own)
        self.rate_limited_total = _counter(families.RATE_LIMITED, own)
        self.upstream_failures = _counter(families.UPSTREAM_FAILURES, own)
        self.client_stalls = _counter(families.CLIENT_STALLS, own)
        self.fallbacks = _counter(families.FALLBACKS, own)
        self.breaker_state = _gauge(families.BREAKER_STATE, own)
        self.errors = _counter(families.ERRORS, own)
        self.tokens = _counter(families.TOKENS, own)
        self.key_tokens = _counter(families.KEY_TOKENS, own)
        self.token_limited = _counter(families.TOKEN_LIMITED, own)
        self.token_limit_not_enforced = _counter(families.TOKEN_LIMIT_NOT_ENFORCED, own)
        self.tokens_unreconciled = _counter(families.TOKENS_UNRECONCILED, own)
        # Pending since the last sync; the hot path touches only these.
        self.in_flight_now = 0
        self.open_streams_now = 0
        self._pending_requests: dict[tuple[str, str, int], int] = {}
        self._pending_tokens: dict[tuple[str, str, str], list[int]] = {}
        self._pending_errors: dict[tuple[int, str], int] = {}
        self._sync_scheduled = False
        self._pending_latency: dict[str, _Observations] = {}
        for name in upstreams:
            self.breaker_state.labels(name).set(0.0)

    def request_finished(
        self, model: str, upstream: str, status: int, duration: float, ttfb: float | None
    ) -> None:
        key = (model, upstream, status // 100)
        pending = self._pending_requests
        pending[key] = pending.get(key, 0) + 1
        if self.multiprocess and not self._sync_scheduled:
            self._schedule_sync()
        seen = self._pending_latency.get(upstream)
        if seen is None:
            seen = self._pending_latency[upstream] = _Observations()
        # The bucket a value counts in: the first upper bound >= it ("le").
        seen.duration[bisect_left(_BUCKETS, duration)] += 1
        seen.duration_sum += duration
        if ttfb is not None:
            seen.ttfb[bisect_left(_BUCKETS, ttfb)] += 1
            seen.ttfb_sum += ttfb

    def count_error(self, status: int, code: str) -> None:
        """One error the proxy answered itself (``code`` from the fixed set of errors.py)."""
        key = (status, code)
        pending = self._pending_errors
        pending[key] = pending.get(key, 0) + 1

    def count_tokens(
        self,
        model: str,
        upstream: str,
        key_name: str,
        usage: Usage,
    ) -> None:
        """One answer's usage, counted at the next sync."""
        key = (model, upstream, key_name)
        counts = self._pending_tokens.get(key)
        if counts is None:
            counts = self._pending_tokens[key] = [0, 0, 0, 0, 0]
        counts[0] += usage.prompt_tokens or 0
        counts[1] += usage.completion_tokens or 0
        counts[2] += usage.cache_read_tokens or 0
        counts[3] += usage.cache_creation_tokens or 0
        counts[4] += usage.cached_tokens

    def sync(self) -> None:
        """Publish what the hot path counted since the last sync."""
        if self._pending_requests:
            pending, self._pending_requests = self._pending_requests, {}
            labels = self.requests.labels
            for (model, upstream, klass), count in pending.items():
                labels(model, upstream, _STATUS_CLASSES[min(klass, 9)]).inc(count)
        if self._pending_errors:
            errors, self._pending_errors = self._pending_errors, {}
            for (status, code), count in errors.items():
                self.errors.labels(str(status), code).inc(count)
        if self._pending_tokens:
            tokens, self._pending_tokens = self._pending_tokens, {}
            labels = self.tokens.labels
            by_key = self.key_tokens.labels
            for (model, upstream, key_name), counts in tokens.items():
                for kind, count in zip(_TOKEN_TYPES, counts, strict=False):
                    if count:
                        labels(model, upstream, kind).inc(count)
                prompt, completion, cache_read, cache_creation, cached = counts
                # Per key: input not read from a cache (OpenAI's prompt counts
                # its cached part, Anthropic's leaves its cache reads out),
                # cached input, output.
                if prompt - cached + cache_creation > 0:
                    by_key(key_name, model, "input").inc(prompt - cached + cache_creation)
                if cached + cache_read:
                    by_key(key_name, model, "cached").inc(cached + cache_read)
                if completion:
                    by_key(key_name, model, "output").inc(completion)
        if self._pending_latency:
            latency, self._pending_latency = self._pending_latency, {}
            for upstream, seen in latency.items():
                _add_observations(self.duration, upstream, seen.duration, seen.duration_sum)
                _add_observations(self.ttfb, upstream, seen.ttfb, seen.ttfb_sum)
        self.in_flight.set(self.in_flight_now)
        self.open_streams.set(self.open_streams_now)

    def _schedule_sync(self) -> None:
        """Several workers: publish within a second, for the other workers' scrapes."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.sync()
            return
        self._sync_scheduled = True
        loop.call_later(_SYNC_SECONDS, self._scheduled_sync)

    def _scheduled_sync(self) -> None:
        self._sync_scheduled = False
        self.sync()

    def set_breaker(self, upstream: str, state: str) -> None:
        self.breaker_state.labels(upstream).set(BREAKER_STATES.get(state, 2.0))

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition (text, or OpenMetrics when asked for) and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    async def handle(self, request: web.Request) -> web.Response:
        """``GET /metrics``. Neither rate limited nor access-logged (scrapes would drown it)."""
        body, content_type = self.render(request.headers.get("Accept"))
        resp = web.Response(body=body, headers={"Server": SERVER})
        # Set whole: the type carries parameters (version, escaping) aiohttp must not re-split.
        resp.headers["Content-Type"] = content_type
        return resp


def _counter(family: Family, registry: CollectorRegistry | None) -> Counter:
    return Counter(family.name, family.help, family.labels, registry=registry)


def _histogram(family: Family, registry: CollectorRegistry | None) -> Histogram:
    return Histogram(family.name, family.help, family.labels, registry=registry, buckets=_BUCKETS)


def _gauge(family: Family, registry: CollectorRegistry | None) -> Gauge:
    return Gauge(
        family.name,
        family.help,
        family.labels,
        registry=registry,
        multiprocess_mode=family.multiprocess_mode,
    )


class _Observations:
    """Latency observations of one upstream since the last sync: a count per
    bucket (non-cumulative, in ``_BUCKETS`` order) and the sum of the values."""

    __slots__ = ("duration", "duration_sum", "ttfb", "ttfb_sum")

    def __init__(self) -> None:
        self.duration = [0] * len(_BUCKETS)
        self.duration_sum = 0.0
        self.ttfb = [0] * len(_BUCKETS)
        self.ttfb_sum = 0.0


def _add_observations(histogram: Histogram, upstream: str, counts: list[int], total: float) -> None:
    """Add a batch of observations to ``histogram``'s child for ``upstream``.

    prometheus_client's public ``observe()`` takes one value (and two locks)
    at a time: two calls per request measured 3-4% of the proxy's CPU in the
    benchmark. A child keeps one value per bucket and one for the sum
    (``_buckets``, ``_sum``: what ``observe()`` itself increments); batches
    are added to those, so the exposition (text, OpenMetrics, multiprocess
    files) stays the library's. tests/unit/test_observe_metrics.py checks the
    result against ``observe()``, so a library change fails a test, not a scrape.
    """
    if not any(counts):
        return
    child = histogram.labels(upstream)
    child._sum.inc(total)
    for value, count in zip(child._buckets, counts, strict=True):
        if count:
            value.inc(count)


class _SyncFirst(Collector):
    """Registered first in the exposed registry: a collection starts with a sync."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        self.metrics.sync()
        return ()

    def describe(self) -> Iterable[Metric]:
        return ()


def metrics_app(metrics: Metrics, path: str) -> web.Application:
    """A separate application serving only ``path`` (``metrics.listen``), so the
    metrics need not face the same network as the proxy."""
    app = web.Application()
    app.router.add_get(path, metrics.handle)
    app.on_response_prepare.append(_name_server)
    return app


async def _name_server(request: web.Request, response: web.StreamResponse) -> None:
    # Every answer of this listener, its 404s included (the main app's views
    # name their own answers).
    response.headers["Server"] = SERVER


def _use_multiprocess_values() -> None:
    """Make new metric values write to the shared files, for good, in this process.

    The library picks its value class when ``prometheus_client`` is first
    imported; the parent of ``--workers`` imports it before it exports the
    directory, so each worker switches after the fork. (The multiprocess
    class notices a changed pid by itself, so a class inherited already
    switched is kept.)
    """
    if values.ValueClass is values.MutexValue:
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def share_metrics_across_workers() -> str:
    """In the parent of ``--workers``, before forking: the directory the workers
    write their samples to, exported as ``PROMETHEUS_MULTIPROC_DIR``.

    A directory the operator exported is used as it is (it must start empty:
    the library's own rule). Otherwise a fresh private one is made and removed
    when the parent exits (workers leave with ``os._exit`` and never run it).
    """
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        return given
    directory = tempfile.mkdtemp(prefix="oaimux-metrics-")
    os.environ[MULTIPROC_ENV] = directory
    atexit.register(_remove_directory, directory)
    return directory


def forget_worker(pid: int) -> None:
    """In the parent of ``--workers``, once worker ``pid`` died and the others
    serve on: its live gauges (requests in flight, open streams) leave the
    shared samples; its counters stay in the totals."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]  # unannotated upstream


def _remove_directory(directory: str) -> None:
    if os.environ.get(MULTIPROC_ENV) == directory:
        del os.environ[MULTIPROC_ENV]
    shutil.rmtree(directory, ignore_errors=True)


async def serve_metrics(
    metrics: Metrics, path: str, host: str, port: int, reuse_port: bool = False
) -> web.AppRunner:
    """Start the separate metrics listener (``metrics.listen``); the caller
    cleans the returned runner up. With ``--workers`` every worker binds the
    address (SO_REUSEPORT); whichever answers reads every worker's samples."""
    runner = web.AppRunner(metrics_app(metrics, path), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
    return runner
