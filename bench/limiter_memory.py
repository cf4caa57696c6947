"""Memory and latency of the in-memory rate limiter under a flood of distinct clients.

    python -m bench.limiter_memory                # 1,000,000 clients
    python -m bench.limiter_memory --clients 200000 --json

What it does, on a fake clock (no waiting: a minute or two of CPU for a million):

1. Flood: ``--clients`` distinct IPv4 addresses send one request each, 10 µs
   apart, against ``requests_per_minute: 1, burst: 100``. A bucket is full
   again 60 s after its request, so every bucket is still live at the end of
   the 10 s flood: the limiter holds all of them at once (the worst case).
2. Idle: the clock moves past the time to full, and the limiter's own sweeper
   (the coroutine the app runs once a second) drops them, a slice at a time.

It reports Python heap bytes (``tracemalloc``: the buckets, their key strings
and the eviction heaps) at the peak and after idle, and bytes per bucket; the
growth of the process's resident set (RSS, /proc) at the peak and after idle,
measured in a second run without tracemalloc; the time of each ``acquire``
during the flood (mean, 99.9th percentile, max, count over 1 ms: wall-clock,
so on a busy machine the max is mostly the scheduler); and the longest the
event loop was held by the sweep (the app serves requests between slices),
next to the one-pass sweep the limiter used before (one list comprehension
over a million buckets).

Keys are made exactly as the proxy makes them (``ip:203.0.113.7|global``).

``--tokens`` adds a token budget (``tokens_per_minute: 2000, tokens_per_day:
1000000``; README: Token budgets) and each request reserves 1,000 tokens with
its request token, as a model request does: every client then holds a request
bucket and its token state, and the idle step waits for the day window to
drain (86.4 s) before sweeping.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import gc
import json
import os
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from proxy.admission.admission import Caller, choose_limit
from proxy.admission.buckets import NS
from proxy.admission.buckets_memory import MemoryRateLimiter
from proxy.config import Settings, parse_settings

__all__ = ["main", "run"]

STEP_NS = 10_000  # 10 µs between requests on the fake clock


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _address(i: int) -> str:
    return f"{10 + (i >> 24) % 200}.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


class FakeClock:
    def __init__(self) -> None:
        self.now = 10**12

    def __call__(self) -> int:
        return self.now


TOKENS = {"tokens_per_minute": 2000, "tokens_per_day": 1_000_000}
RESERVED = 1000  # tokens reserved per request, in each window


def _settings(tokens: bool = False) -> Settings:
    return parse_settings(
        {
            "upstreams": {"u": {"url": "http://127.0.0.1:9/v1"}},
            "routes": [{"default": True, "upstream": "u"}],
            "rate_limit": {"requests_per_minute": 1, "burst": 100, **(TOKENS if tokens else {})},
        },
        environ={},
    )


def _request(limiter: MemoryRateLimiter, settings: Settings, key: str) -> None:
    """One request of the flood: a request token, and tokens when a budget is set."""
    limits = settings.rate_limit
    assert limits is not None and limits.requests is not None
    if limits.tokens is None:
        limiter.acquire_now(key, limits.requests)
    else:
        limiter.reserve_now(key, limits.requests, limits.tokens, RESERVED)


def _key(settings: Settings, i: int) -> str:
    """The bucket key the proxy makes for client number ``i``."""
    chosen = choose_limit(settings, Caller(_address(i), None, True), None)
    assert chosen is not None
    return chosen[1]


async def _longest_stall(work: Callable[[], Any]) -> tuple[float, float, Any]:
    """Run ``work()`` (a coroutine factory) next to a ticker. The longest gap the
    ticker saw is how long a request would have waited for the loop: as wall
    time, and as this thread's CPU time (which a busy machine does not inflate
    by preempting us)."""
    wall_gaps: list[float] = []
    cpu_gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        while not done.is_set():
            await asyncio.sleep(0)
            now_wall, now_cpu = time.perf_counter(), time.thread_time()
            wall_gaps.append(now_wall - wall)
            cpu_gaps.append(now_cpu - cpu)
            wall, cpu = now_wall, now_cpu

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    result = await work()
    done.set()
    await task
    return max(wall_gaps, default=0.0), max(cpu_gaps, default=0.0), result


def _old_sweep(buckets: dict[str, int], now: int) -> int:
    """The limiter's previous sweep: one pass over every bucket (for comparison)."""
    expired = [k for k, full_at in buckets.items() if full_at <= now]
    for k in expired:
        del buckets[k]
    return len(expired)


async def run(clients: int, tokens: bool = False) -> dict[str, Any]:
    settings = _settings(tokens)
    figures: dict[str, Any] = {"clients": clients, "limit": "1/min, burst 100"}
    idle = 61 * NS  # every request bucket is full again
    if tokens:
        figures["limit"] += f", {TOKENS}, {RESERVED} tokens a request"
        idle = 100 * NS  # and every token state has drained

    # Phase 1: Python heap, with tracemalloc on. Keys are made on the fly, as
    # requests make them, so their strings count.
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock)
    gc.collect()
    tracemalloc.start()
    heap_before = tracemalloc.get_traced_memory()[0]
    for i in range(clients):
        _request(limiter, settings, _key(settings, i))
        clock.now += STEP_NS
    gc.collect()
    heap_peak = tracemalloc.get_traced_memory()[0]
    figures["buckets_at_peak"] = len(limiter)
    figures["heap_bytes_per_client"] = round((heap_peak - heap_before) / clients, 1)
    figures["heap_mib_at_peak"] = round((heap_peak - heap_before) / 2**20, 1)
    clock.now += idle
    figures["buckets_swept"] = await limiter.sweep()
    gc.collect()
    figures["buckets_after_idle"] = len(limiter)
    figures["heap_kib_after_idle"] = round(
        (tracemalloc.get_traced_memory()[0] - heap_before) / 1024, 1
    )
    tracemalloc.stop()
    await limiter.close()
    del limiter
    gc.collect()

    # Phase 2: resident memory and latency, tracemalloc off (it doubles both).
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock)
    rss_before = _rss_bytes()
    took: list[int] = []
    for i in range(clients):
        key = _key(settings, i)
        t0 = time.perf_counter_ns()
        _request(limiter, settings, key)
        took.append(time.perf_counter_ns() - t0)
        clock.now += STEP_NS
    rss_peak = _rss_bytes()
    took.sort()
    figures["acquires_over_1ms"] = len(took) - bisect.bisect_right(took, 1_000_000)
    figures["acquire_mean_us"] = round(sum(took) / clients / 1000, 2)
    figures["acquire_p99_9_us"] = round(took[int(clients * 0.999)] / 1000, 1)
    figures["acquire_max_us"] = round(took[-1] / 1000, 1)
    del took
    clock.now += idle
    stall, stall_cpu, _ = await _longest_stall(limiter.sweep)
    figures["sweep_longest_loop_stall_ms"] = round(stall * 1000, 2)
    figures["sweep_longest_loop_stall_cpu_ms"] = round(stall_cpu * 1000, 2)
    gc.collect()
    rss_idle = _rss_bytes()
    if rss_before is not None and rss_peak is not None and rss_idle is not None:
        figures["rss_mib_growth_at_peak"] = round((rss_peak - rss_before) / 2**20, 1)
        figures["rss_mib_growth_after_idle"] = round((rss_idle - rss_before) / 2**20, 1)
    await limiter.close()

    # The one-pass sweep the limiter used before, on a million-entry dict.
    snapshot = {_key(settings, i): clock.now - 1 for i in range(clients)}
    started, started_cpu = time.perf_counter(), time.thread_time()
    _old_sweep(snapshot, clock.now)
    figures["old_one_pass_sweep_stall_ms"] = round((time.perf_counter() - started) * 1000, 1)
    figures["old_one_pass_sweep_stall_cpu_ms"] = round((time.thread_time() - started_cpu) * 1000, 1)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.limiter_memory", description=__doc__)
    parser.add_argument("--clients", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--tokens", action="store_true", help="with a token budget too")
    args = parser.parse_args(argv)
    figures = asyncio.run(run(args.clients, args.tokens))
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    width = max(len(k) for k in figures)
    for name, value in figures.items():
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
