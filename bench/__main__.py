"""``python -m bench``: measure oaimux against direct-to-mock and nginx in one interleaved run.

Phases, each over every peer, with the peer order rotated every round (A B C, B C A, ...)
so slow drift of the machine spreads over all peers instead of biasing one:

1. smoke - every peer answers chat, SSE and binary byte-for-byte like the mock; a peer that
   fails is dropped from the later phases (and the report says so).
2. hold - memory per open stream, and upstream connections left 2 s after clients hang up
   (first, on fresh processes, so memory already grown by earlier phases does not hide it).
3. non-stream - req/s, p50/p99 latency at each connection count, proxy CPU per request.
4. SSE - TTFB, per-chunk delay and coalescing at each stream count.
5. large bodies - a 10 MB JSON request (model key first and last) and a 10 MB binary answer.
6. token rate - K streams of small chunks at 50 chunks/s (burst and ramped starts): proxy CPU
   per chunk, added chunk delay, TTFB, memory per stream, and the largest K each proxy carries.
7. profile (only with --profile) - py-spy samples oaimux under the non-stream load, after
   everything else, so its overhead is in no reported figure.

Everything talks to 127.0.0.1 only, every loop is bounded in count and time, and every
process started here is stopped before exit (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import peers as peers_mod
from bench import procfs, report
from bench import profile as pyspy
from bench.http1 import fetch
from bench.loadgen import CHAT_BODY, have_wrk, run_load
from bench.mock_upstream import binary_payload
from bench.peers import DEFAULT_OAIMUX_CMD, REPO_ROOT, Direct, Mock, Nginx, Oaimux, Peer
from bench.streams import hold_streams, run_streams, stream_body
from bench.tokenrate import ClientPool, TokenPhase, TokenPlan

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL = "bench-model"


def log(*parts: object) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


def rotate(items: list[Peer], n: int) -> list[Peer]:
    if not items:
        return items
    n %= len(items)
    return items[n:] + items[:n]


def raise_fd_limit(want: int = 65536) -> int:
    """1,000 streams through a proxy need ~2,000 fds in the client alone; lift the soft limit
    to the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_priority(nice: int) -> dict[str, object]:
    """Lower the nice value (root only) of the driver and of everything it spawns, so every
    peer, the mock and the client run at the same raised priority. On a shared machine this
    keeps other jobs' bursts from preempting the measured processes; it favours no peer.

    With scheduler autogroups on, each session is one group and nice only ranks processes
    inside it, so the driver's group and each spawned process's group get the value too.
    Returns what took effect (recorded in the JSON)."""
    autogroup = False
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except OSError:
            pass  # not permitted: measure at normal priority, the JSON says so
        autogroup = procfs.set_autogroup_nice(os.getpid(), nice)
        peers_mod.NICE = nice
    return {"nice": os.getpriority(os.PRIO_PROCESS, 0), "autogroup": autogroup}


def plan_cpus(workers: int) -> tuple[set[int] | None, set[int] | None, set[int] | None]:
    """(client+mock cores, 1-worker proxy core, N-worker proxy cores).

    On this 2-core box: client and mock on core 0, proxy on core 1, so the proxy's CPU is
    its own and the client cannot steal it. N workers get cores 1..N when there are enough,
    else every core (and then share with the client - the report notes it).
    """
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None, None, None
    many = set(cores[1 : 1 + workers]) if len(cores) > workers else set(cores)
    return {cores[0]}, {cores[1]}, many


class Bench:
    """One run: the mock, the peers, the phases and the results dict."""

    def __init__(self, a: argparse.Namespace, workdir: Path) -> None:
        self.a = a
        self.workdir = workdir
        self.client_cpus, self.proxy_cpus, self.multi_cpus = plan_cpus(a.workers)
        self.mock = Mock(workdir, self.client_cpus)
        self.peers: list[Peer] = []
        self.multi: list[Peer] = []  # oaimux with N workers: non-stream phase only
        self.spawned: list[Peer] = []  # everything ever started, so stop() misses nothing
        self.results: dict[str, Any] = {
            "meta": {},
            "peers": {},
            "smoke": {},
            "nonstream": [],
            "sse": [],
            "hold": {},
            "large_body": {},
            "binary": {},
            "tokenrate": {},
            "skipped": {},
        }
        self.profile_raw = ""  # py-spy's collapsed stacks, written next to the JSON
        self.proxy_core = min(self.proxy_cpus) if self.proxy_cpus else None

    # -- set-up -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self.client_cpus:
            os.sched_setaffinity(0, self.client_cpus)  # the driver is the client
        await self.mock.start()
        log(f"mock upstream on :{self.mock.port}")
        wanted = [p.strip() for p in self.a.peers.split(",") if p.strip()]
        candidates: list[Peer] = []
        if "direct" in wanted:
            candidates.append(Direct(self.mock))
        if "nginx" in wanted:
            if Nginx.available():
                candidates.append(Nginx(self.workdir, self.proxy_cpus, self.mock))
            else:
                self.results["skipped"]["nginx"] = "nginx is not installed"
        if "oaimux" in wanted:

            def oaimux(cpus: set[int] | None, workers: int, token_limit: bool = False) -> Oaimux:
                a = self.a
                return Oaimux(
                    self.workdir, cpus, self.mock, workers, a.observability, a.oaimux_cmd,
                    token_limit=token_limit,
                )  # fmt: skip

            candidates.append(oaimux(self.proxy_cpus, 1))
            if self.a.workers > 1:
                self.multi.append(oaimux(self.multi_cpus, self.a.workers))
            if self.a.token_limit:  # on the same core as oaimux, measured beside it
                self.multi.append(oaimux(self.proxy_cpus, 1, token_limit=True))
        for peer in candidates + self.multi:
            self.spawned.append(peer)  # before start(): an interrupt mid-start still stops it
            try:
                await peer.start()
            except (RuntimeError, OSError) as exc:
                log(f"{peer.name} did not start: {exc}")
                self.results["skipped"][peer.name] = f"did not start: {exc}"[:2000]
                peer.stop()
                if peer in self.multi:
                    self.multi.remove(peer)
                continue
            if peer in candidates:
                self.peers.append(peer)
            self.results["peers"][peer.name] = {
                "describe": peer.describe(),
                "port": peer.port,
                "startup_s": peer.startup_s,
                "cpus": sorted(peer.cpus) if peer.cpus else None,
                "workers": peer.workers,
            }
            log(f"{peer.name} ready on :{peer.port} ({peer.describe()})")

    def stop(self) -> None:
        for peer in self.spawned:
            peer.stop()
        self.mock.stop()

    # -- phase 1: smoke -----------------------------------------------------------------------
    async def smoke(self) -> None:
        """Byte-for-byte checks; drops peers that cannot carry the rest of the bench."""
        direct_chat = await fetch(self.mock.port, "POST", "/v1/chat/completions", CHAT_BODY)
        want_sse = _mask_ts(
            (await fetch(self.mock.port, "POST", "/v1/chat/completions", stream_body(3, 20))).body
        )
        speech_len = 1024 * 1024
        want_sha = _sha256(binary_payload(speech_len))
        speech_body = json.dumps(
            {"mock_bytes": speech_len, "model": MODEL, "input": "hello"}
        ).encode()
        for peer in list(self.peers) + self.multi:
            chat = await fetch(peer.port, "POST", "/v1/chat/completions", CHAT_BODY)
            sse = await fetch(peer.port, "POST", "/v1/chat/completions", stream_body(3, 20))
            speech = await fetch(
                peer.port, "POST", "/v1/audio/speech", speech_body, keep_body=False
            )
            models = await fetch(peer.port, "GET", "/v1/models?model=bench-model")
            res = {
                "chat_status": chat.status,
                "chat_exact": chat.body == direct_chat.body,
                "sse_status": sse.status,
                "sse_exact": _mask_ts(sse.body) == want_sse,
                "sse_content_type": sse.headers.get("content-type", ""),
                "speech_status": speech.status,
                "speech_exact": speech.sha256 == want_sha,
                "models_status": models.status,
                "errors": [r.error for r in (chat, sse, speech, models) if r.error],
            }
            self.results["smoke"][peer.name] = res
            log(f"smoke {peer.name}: {res}")
            if chat.status != 200 or sse.status != 200:
                log(f"dropping {peer.name}: it cannot serve chat/SSE")
                self.results["skipped"][peer.name] = f"failed smoke test: {res}"
                if peer in self.peers:
                    self.peers.remove(peer)
                else:
                    self.multi.remove(peer)
                peer.stop()

    # -- phase 3: non-streaming load ----------------------------------------------------------
    async def nonstream(self) -> None:
        a = self.a
        peers = self.peers + self.multi
        for peer in peers:  # warm-up: connection pools, JIT-less caches, page faults
            await run_load(
                peer.port, "/v1/chat/completions", 16, a.warmup, self.workdir, use_wrk=not a.no_wrk
            )
        for rnd in range(a.rounds):
            for i, conns in enumerate(a.conns):
                for peer in rotate(peers, rnd + i):
                    row = await self._measure(
                        peer,
                        lambda p=peer, c=conns: run_load(
                            p.port,
                            "/v1/chat/completions",
                            c,
                            a.duration,
                            self.workdir,
                            use_wrk=not a.no_wrk,
                        ),
                    )
                    res = row.pop("value")
                    row.update(res.as_dict())
                    row.update(peer=peer.name, round=rnd)
                    row["cpu_us_per_req"] = (
                        row["proxy_cpu_s"] / res.requests * 1e6
                        if peer.pids() and res.requests
                        else None
                    )
                    row["mock_cpu_us_per_req"] = (
                        row["mock_cpu_s"] / res.requests * 1e6 if res.requests else None
                    )
                    self.results["nonstream"].append(row)
                    log(
                        f"non-stream r{rnd} c{conns:<3} {peer.name:<10} {res.rps:9,.0f} req/s "
                        f"p50 {res.p50_ms:.3f} p99 {res.p99_ms:.3f} ms  "
                        f"cpu/req {_fmt(row['cpu_us_per_req'])} us  err {res.errors}  "
                        f"foreign {_fmt(row['foreign_pct'])}%"
                    )

    async def _measure(self, peer: Peer, work: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
        """Run ``work`` and record the CPU the proxy and the mock spent on it, and how busy
        the proxy's core was with anything else (foreign load, e.g. another job on the box)."""
        pids, mock_pids = peer.pids(), self.mock.pids()
        core = self.proxy_core
        waited = await self._wait_quiet()
        c0, m0 = procfs.cpu_seconds(pids), procfs.cpu_seconds(mock_pids)
        k0 = procfs.core_times(core) if core is not None else None
        t0 = time.monotonic()
        value = await work()
        wall = time.monotonic() - t0
        c1, m1 = procfs.cpu_seconds(pids), procfs.cpu_seconds(mock_pids)
        k1 = procfs.core_times(core) if core is not None else None
        busy = procfs.busy_fraction(k0, k1)
        own = (c1 - c0) / wall if wall > 0 else 0.0
        # Foreign load only means something when the peer has the proxy core to itself
        # (not for direct, whose "proxy core" idles, nor for N workers spread over all cores).
        single = peer.cpus is not None and peer.cpus == self.proxy_cpus
        return {
            "value": value,
            "proxy_cpu_s": c1 - c0,
            "mock_cpu_s": m1 - m0,
            "wall_s": wall,
            "waited_for_quiet_s": waited,
            "proxy_core_busy_pct": None if busy is None else busy * 100,
            "foreign_pct": (max(0.0, busy - own) * 100 if busy is not None and single else None),
        }

    async def _wait_quiet(self) -> float:
        """Wait (at most ``--quiet-wait`` s) until the proxy core is mostly idle.

        Between measurements nothing of ours runs there, so a busy core means another job on
        the machine; starting in a lull keeps bursts of it out of more measurements.
        """
        core, limit = self.proxy_core, self.a.quiet_wait
        if core is None or limit <= 0:
            return 0.0
        t0 = time.monotonic()
        prev = procfs.core_times(core)
        while time.monotonic() - t0 < limit:
            await asyncio.sleep(0.25)
            cur = procfs.core_times(core)
            busy = procfs.busy_fraction(prev, cur)
            prev = cur
            if busy is None or busy < 0.15:
                break
        return round(time.monotonic() - t0, 2)

    # -- phase 4: SSE -------------------------------------------------------------------------
    async def sse(self) -> None:
        a = self.a
        for rnd in range(a.stream_rounds):
            for i, k in enumerate(a.streams):
                reps = a.single_reps if k == 1 else 1
                for peer in rotate(self.peers, rnd + i):
                    row = await self._measure(
                        peer,
                        lambda p=peer, k=k, reps=reps: run_streams(
                            p.port, k, a.chunks, a.interval_ms, reps=reps
                        ),
                    )
                    res = row.pop("value")
                    row.update(asdict(res))
                    row.update(peer=peer.name, round=rnd, failed=k * reps - res.ok)
                    row["cpu_us_per_chunk"] = (
                        row["proxy_cpu_s"] / res.events * 1e6
                        if peer.pids() and res.events
                        else None
                    )
                    self.results["sse"].append(row)
                    log(
                        f"sse r{rnd} K={k:<5} {peer.name:<8} ok {res.ok}/{k * reps} "
                        f"ttfb p50 {res.ttfb_p50_ms:.2f} p99 {res.ttfb_p99_ms:.2f} ms  "
                        f"delay p50 {res.delay_p50_ms:.3f} p99 {res.delay_p99_ms:.2f} ms  "
                        f"coalesced {res.coalesced}  {res.errors[:1]}"
                    )
                    await asyncio.sleep(0.3)  # let closed sockets drain between runs

    # -- phase 2: held streams, memory, hang-up -------------------------------------------------
    async def hold(self) -> None:
        a = self.a
        for peer in self.peers:
            pids = peer.pids()
            before = await self._mock_stats()
            idle_rss = procfs.rss_bytes(pids)
            held = await hold_streams(peer.port, a.hold, a.hold_timeout)
            await asyncio.sleep(0.5)  # let the proxy settle its buffers
            pids = peer.pids()
            open_rss = procfs.rss_bytes(pids)
            during = await self._mock_stats()
            n_open = held.open_count
            held.hang_up()
            await asyncio.sleep(2.0)
            after = await self._mock_stats()
            after_rss = procfs.rss_bytes(peer.pids())
            res = {
                "streams_wanted": a.hold,
                "streams_open": n_open,
                "time_to_open_all_ms": held.t_all_first_ms or None,
                "idle_rss_mb": idle_rss / 1e6 if pids else None,
                "open_rss_mb": open_rss / 1e6 if pids else None,
                "after_rss_mb": after_rss / 1e6 if pids else None,
                "kb_per_stream": (
                    (open_rss - idle_rss) / n_open / 1024 if pids and n_open else None
                ),
                "mock_active_streams": [
                    before.get("active_streams"),
                    during.get("active_streams"),
                    after.get("active_streams"),
                ],
                "mock_open_connections": [
                    before.get("open_connections"),
                    during.get("open_connections"),
                    after.get("open_connections"),
                ],
                # Streams the mock is still serving 2 s after every client left: each one is
                # an upstream connection the proxy did not close.
                "upstream_left_open": after.get("active_streams"),
            }
            self.results["hold"][peer.name] = res
            log(f"hold {peer.name}: {res}")
            # Bounded wait for leftovers to drain so the next peer starts clean.
            for _ in range(20):
                if (await self._mock_stats()).get("active_streams", 0) == 0:
                    break
                await asyncio.sleep(0.5)

    async def _mock_stats(self) -> dict[str, Any]:
        resp = await fetch(self.mock.port, "GET", "/_stats", timeout=10)
        try:
            return dict(json.loads(resp.body))
        except ValueError:
            return {}

    # -- phase 5: large bodies --------------------------------------------------------------------
    async def large(self) -> None:
        a = self.a
        size = int(a.body_mb * 1024 * 1024)
        filler = "A" * size  # ASCII payload: JSON-escaping-free, like base64 audio or images
        messages = [{"role": "user", "content": filler}]
        # Same bytes but for where "model" sits: first lets a router stop reading early,
        # last makes it scan the whole 10 MB to find it.
        first = json.dumps({"model": MODEL, "messages": messages}).encode()
        last = json.dumps({"messages": messages, "model": MODEL}).encode()
        del filler, messages
        bodies = {"model_first": first, "model_last": last}
        times: dict[str, dict[str, list[float]]] = {
            p.name: {k: [] for k in bodies} for p in self.peers
        }
        growth: dict[str, list[float]] = {p.name: [] for p in self.peers}
        errors: dict[str, list[str]] = {p.name: [] for p in self.peers}
        for rep in range(a.reps + 1):  # rep 0 is a warm-up, not recorded
            for i, (variant, body) in enumerate(bodies.items()):
                for peer in rotate(self.peers, rep + i):
                    pids = peer.pids()
                    procfs.reset_peak_rss(pids)
                    base = procfs.rss_bytes(pids)
                    resp = await fetch(peer.port, "POST", "/v1/chat/completions", body, timeout=60)
                    peak = procfs.peak_rss_bytes(peer.pids())
                    whole = b'"prompt_tokens":%d' % len(body) in resp.body
                    if not resp.ok or not whole:
                        errors[peer.name].append(
                            resp.error or f"status {resp.status}, body arrived whole: {whole}"
                        )
                        continue
                    if rep == 0:
                        continue
                    times[peer.name][variant].append(resp.elapsed_ms)
                    if pids:
                        growth[peer.name].append((peak - base) / 1e6)
        for peer in self.peers:
            t = times[peer.name]
            self.results["large_body"][peer.name] = {
                "body_mb": len(first) / 1e6,
                "model_first_ms": _med(t["model_first"]),
                "model_last_ms": _med(t["model_last"]),
                "all_ms": t,
                "peak_growth_mb": max(growth[peer.name], default=None),
                "errors": errors[peer.name][:5],
            }
            log(f"large body {peer.name}: {self.results['large_body'][peer.name]}")
        del bodies, first, last

        # Binary answer: /v1/audio/speech streamed back, checked by sha256.
        size = int(a.binary_mb * 1024 * 1024)
        want = _sha256(binary_payload(size))
        req = json.dumps({"mock_bytes": size, "model": MODEL, "input": "hello"}).encode()
        ms: dict[str, list[float]] = {p.name: [] for p in self.peers}
        bad: dict[str, int] = {p.name: 0 for p in self.peers}
        for rep in range(a.reps + 1):
            for peer in rotate(self.peers, rep):
                resp = await fetch(
                    peer.port, "POST", "/v1/audio/speech", req, keep_body=False, timeout=60
                )
                if not resp.ok or resp.sha256 != want:
                    bad[peer.name] += 1
                elif rep:
                    ms[peer.name].append(resp.elapsed_ms)
        for peer in self.peers:
            med = _med(ms[peer.name])
            self.results["binary"][peer.name] = {
                "bytes": size,
                "median_ms": med,
                "all_ms": ms[peer.name],
                "mb_per_s": size / 1e6 / (med / 1000) if med else None,
                "bad": bad[peer.name],
            }
            log(f"binary {peer.name}: {self.results['binary'][peer.name]}")

    # -- phase 6: token rate --------------------------------------------------------------------
    async def tokenrate(self) -> None:
        """Many long streams of small chunks (see bench/tokenrate.py and bench/README.md)."""
        a = self.a
        await self._restart_proxies()
        peers = self.peers + self.multi
        # auto: the proxies on one core of their own (nginx, oaimux with 1 worker).
        search = (
            [p.name for p in self.peers if p.name != "direct"]
            if a.token_search == "auto"
            else [n for n in a.token_search.split(",") if n and n != "none"]
        )
        plan = TokenPlan(
            levels=tuple(a.token_streams),
            modes=tuple(a.token_modes),
            chunks=a.token_chunks,
            rate=a.token_rate,
            ramp_ms=a.token_ramp_ms,
            grace_s=a.token_grace,
            rounds=a.token_rounds,
            search=tuple(search),
            search_steps=a.token_search_steps,
            search_limit_ms=a.token_search_ms,
            search_max_k=max(a.token_streams),
        )
        procs = a.client_procs or max(2, len(self.client_cpus or ()))
        pool = ClientPool(procs)
        try:
            phase = TokenPhase(
                plan,
                peers,
                self.mock,
                pool,
                self.client_cpus,
                self.proxy_cpus,
                resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                self._wait_quiet,
                log,
            )
            out = await phase.run()
        finally:
            pool.close()
        out["plan"] = asdict(plan)
        out["client_procs"] = procs
        self.results["tokenrate"] = out

    async def _restart_proxies(self) -> None:
        """Fresh proxy processes, so memory per stream is not hidden by memory an earlier
        phase grew (a Python process keeps it and reuses it)."""
        for peer in self.peers + self.multi:
            if not peer.pids():
                continue  # direct: nothing to restart
            peer.stop()
            await peer.start()
            log(f"{peer.name} restarted on :{peer.port}")

    # -- phase 7: profile (optional) --------------------------------------------------------------
    async def profile(self) -> None:
        """Sample oaimux with py-spy during a 16-connection non-stream load."""
        peer = next((p for p in self.peers if p.name == "oaimux"), None)
        if peer is None or not pyspy.available():
            self.results["skipped"]["profile"] = "needs py-spy on PATH and a running oaimux"
            return
        seconds = self.a.duration
        out = self.workdir / "oaimux.pyspy.txt"
        proc = await asyncio.create_subprocess_exec(
            *pyspy.record_command(peer.pids(), seconds + 1, out),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        await asyncio.sleep(0.5)  # let py-spy attach before the load starts
        load = await run_load(
            peer.port, "/v1/chat/completions", 16, seconds, self.workdir, use_wrk=not self.a.no_wrk
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), seconds + 30)
        except TimeoutError:
            proc.kill()
            err = b"py-spy did not finish"
        self.profile_raw = out.read_text() if out.exists() else ""
        summary = pyspy.summarize_collapsed(self.profile_raw)
        summary["load_rps"] = load.rps
        if not self.profile_raw:
            summary["error"] = err.decode(errors="replace")[-500:]
        self.results["profile"] = summary
        log(f"profile: {summary.get('samples')} samples")


def _mask_ts(body: bytes) -> bytes:
    import re

    return re.sub(rb"ts=\d+", b"ts=#", body)


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def versions() -> dict[str, Any]:
    def run(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return ""

    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for mod in ("aiohttp", "uvloop", "yaml"):
        try:
            info[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            info[mod] = None
    info["nginx"] = run(["nginx", "-v"]) if shutil.which("nginx") else None
    info["wrk"] = run(["wrk", "--version"]) if shutil.which("wrk") else None
    info["git"] = run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), ""
            )
    except OSError:
        info["cpu"] = ""
    info["cores"] = os.cpu_count()
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (under ~2 minutes)")
    ap.add_argument(
        "--peers",
        default="direct,nginx,oaimux",
        help="comma list of direct,nginx,oaimux (default: all)",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="also run oaimux with N workers (non-stream phase) to see scaling "
        "from 1 to N (default 2; 1 in --quick)",
    )
    ap.add_argument(
        "--token-limit",
        action="store_true",
        help="also run oaimux with a token budget (non-stream phase), to price it",
    )
    ap.add_argument(
        "--observability",
        action="store_true",
        help="run oaimux with the JSON access log and metrics on",
    )
    ap.add_argument(
        "--oaimux-cmd",
        default=DEFAULT_OAIMUX_CMD,
        help="command template for oaimux; placeholders {python} {config} {port} "
        "{workers} (default: %(default)s)",
    )
    ap.add_argument(
        "--phases",
        default="smoke,hold,nonstream,sse,large,tokenrate",
        help="comma list of phases to run",
    )
    ap.add_argument("--rounds", type=int, help="interleaved rounds of the non-stream phase")
    ap.add_argument("--duration", type=float, help="seconds per non-stream measurement")
    ap.add_argument("--conns", default="1,16,64", help="connection counts (non-stream)")
    ap.add_argument("--streams", default="1,100,1000", help="concurrent stream counts (SSE)")
    ap.add_argument("--stream-rounds", type=int, help="interleaved rounds of the SSE phase")
    ap.add_argument("--chunks", type=int, help="SSE chunks per stream")
    ap.add_argument("--interval-ms", type=float, help="gap between SSE chunks")
    ap.add_argument("--hold", type=int, default=1000, help="streams held open (memory test)")
    ap.add_argument(
        "--hold-timeout",
        type=float,
        default=30.0,
        help="max seconds to wait for all held streams to open",
    )
    ap.add_argument("--body-mb", type=float, default=10.0, help="size of the big JSON body")
    ap.add_argument("--binary-mb", type=float, default=10.0, help="size of the binary answer")
    ap.add_argument("--reps", type=int, help="repetitions of each big-body request")
    ap.add_argument(
        "--token-streams",
        help="concurrent stream counts K of the token-rate phase "
        "(default 100,1000,3000; 100 in --quick)",
    )
    ap.add_argument(
        "--token-modes",
        default="burst,ramp",
        help="how the K streams start: all at once (burst), spread evenly over "
        "--token-ramp-ms (ramp), or both (default)",
    )
    ap.add_argument(
        "--token-chunks", type=int, help="chunks per stream (default 200; 50 in --quick)"
    )
    ap.add_argument(
        "--token-rate",
        type=float,
        default=50.0,
        help="chunks per second per stream (default %(default)s)",
    )
    ap.add_argument(
        "--token-ramp-ms",
        type=float,
        help="ramp over which ramped starts spread (default 1000; 250 in --quick)",
    )
    ap.add_argument(
        "--token-grace",
        type=float,
        help="seconds past a run's schedule before its streams are cut (default 3; 2 in --quick)",
    )
    ap.add_argument(
        "--token-rounds",
        type=int,
        default=1,
        help="interleaved rounds of the token-rate levels (default %(default)s)",
    )
    ap.add_argument(
        "--token-search",
        default=None,
        help="peers whose largest K (added chunk-delay p99 within "
        "--token-search-ms) is searched for: comma list (e.g. "
        "nginx,oaimux,oaimux-w2), 'auto' = nginx and 1-worker oaimux "
        "(default), 'none' (default in --quick)",
    )
    ap.add_argument(
        "--token-search-steps",
        type=int,
        default=4,
        help="runs per peer the search may take (default %(default)s)",
    )
    ap.add_argument(
        "--token-search-ms",
        type=float,
        default=10.0,
        help="added chunk-delay p99 a proxy may add and still carry K (default %(default)s)",
    )
    ap.add_argument(
        "--client-procs",
        type=int,
        default=None,
        help="client processes reading the token-rate streams (default: the "
        "load side's cores, at least 2)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after the run, sample oaimux with py-spy under load (needs py-spy)",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="max seconds to wait for a quiet proxy core before each measurement "
        "(default 4; 1 in --quick; 0 = never wait)",
    )
    ap.add_argument(
        "--nice",
        type=int,
        default=-10,
        help="nice value for everything the bench runs (needs root to go below "
        "0; 0 = leave as is; default %(default)s)",
    )
    ap.add_argument("--no-wrk", action="store_true", help="use the built-in load generator")
    ap.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for results JSON")
    ap.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="only print the table of an earlier results file",
    )
    a = ap.parse_args(argv)
    quick = a.quick
    defaults = {  # (full, quick)
        "rounds": (3, 1),
        "duration": (8.0, 2.0),
        "stream_rounds": (2, 1),
        "chunks": (20, 10),
        "interval_ms": (100.0, 50.0),
        "reps": (5, 2),
        "workers": (2, 1),
        "quiet_wait": (4.0, 1.0),
        "token_streams": ("100,1000,3000", "100"),
        "token_chunks": (200, 50),
        "token_ramp_ms": (1000.0, 250.0),
        "token_grace": (3.0, 2.0),
        "token_search": ("auto", "none"),
    }
    for key, (full, short) in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, short if quick else full)
    a.warmup = 1.0 if quick else 2.0
    a.single_reps = 3 if quick else 5
    a.conns = [int(c) for c in a.conns.split(",") if c]
    a.streams = [int(k) for k in a.streams.split(",") if k]
    a.token_streams = [int(k) for k in a.token_streams.split(",") if k]
    a.token_modes = [m for m in a.token_modes.split(",") if m in ("burst", "ramp")]
    a.phases = {p.strip() for p in a.phases.split(",") if p.strip()}
    if a.profile:
        a.phases.add("profile")
    return a


async def run(a: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="oaimux-bench-"))
    bench = Bench(a, workdir)
    started = time.time()
    bench.results["meta"] = {
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "args": {
            k: (sorted(v) if isinstance(v, set) else v)
            for k, v in vars(a).items()
            if k not in ("out", "report")
        },
        "versions": versions(),
        "fd_limit": raise_fd_limit(),
        "priority": raise_priority(a.nice),
        "load_tool": "wrk" if have_wrk() and not a.no_wrk else "asyncio",
        "cpus": {
            "client_and_mock": sorted(bench.client_cpus or []),
            "proxy": sorted(bench.proxy_cpus or []),
            "proxy_multi_worker": sorted(bench.multi_cpus or []),
        },
    }
    try:
        await bench.start()
        phases: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            # hold runs first, on fresh processes: after 1,000-stream runs a Python proxy keeps
            # the memory it grew to, and "RSS with N open - idle RSS" would read near zero.
            ("smoke", bench.smoke),
            ("hold", bench.hold),
            ("nonstream", bench.nonstream),
            ("sse", bench.sse),
            ("large", bench.large),
            ("tokenrate", bench.tokenrate),
            ("profile", bench.profile),
        ]
        for name, phase in phases:
            if name in a.phases and bench.peers:
                t0 = time.monotonic()
                log(f"phase {name}")
                await phase()
                bench.results["meta"][f"phase_{name}_s"] = round(time.monotonic() - t0, 1)
    finally:
        bench.stop()
        bench.results["meta"]["seconds"] = round(time.time() - started, 1)
        bench.results["profile_raw"] = bench.profile_raw
        if a.keep_tmp:
            log(f"configs and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return bench.results


def print_report(results: dict[str, Any]) -> None:
    rows = report.summarize(results)
    meta = results.get("meta", {})
    print()
    print(report.render(rows))
    print()
    print(report.goals_summary(rows))
    foreign = [
        r["foreign_pct"] for r in results.get("nonstream", []) if r.get("foreign_pct") is not None
    ]
    if foreign:
        print(
            f"foreign load on the proxy core during non-stream runs: median "
            f"{statistics.median(foreign):.0f}% (other work on this machine; high = noisy)"
        )
    for name, why in results.get("skipped", {}).items():
        print(f"skipped {name}: {' '.join(why.splitlines()[:2])[:300]}")
    tokens = report.render_tokenrate(results)
    if tokens:
        tr = results["tokenrate"]
        plan = tr.get("plan", {})
        print(
            f"\ntoken rate: K streams of {plan.get('chunks')} chunks at {plan.get('rate'):g}/s "
            f"(60-120-byte deltas), {tr.get('client_procs')} client processes. Delay: "
            f"direct's as measured, a proxy's as added over direct's; TTFB as measured."
        )
        print(tokens)
        for k, why in (tr.get("skipped") or {}).items():
            print(f"skipped token-rate K={k}: {why}")
    prof = results.get("profile") or {}
    if prof.get("samples"):
        print(f"\nwhere oaimux spends CPU (py-spy, {prof['samples']} samples, 16 conns):")
        for title, key in (
            ("self time by package", "self_by_package"),
            ("self time by function", "self"),
            ("inclusive time of oaimux's own functions", "inclusive"),
        ):
            print(f"  {title}:")
            for name, share in prof.get(key, [])[:12]:
                print(f"    {share:5.1f}%  {name}")
    if meta.get("seconds"):
        print(f"run took {meta['seconds']:.0f} s; load tool: {meta.get('load_tool')}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.report:
        print_report(json.loads(a.report.read_text()))
        return 0
    try:
        import uvloop
    except ImportError:
        results = asyncio.run(run(a))
    else:
        results = uvloop.run(run(a))
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = a.out / f"{stamp}{'-quick' if a.quick else ''}{'-obs' if a.observability else ''}.json"
    rows = report.summarize(results)
    results["summary"] = [asdict(r) for r in rows]
    raw = results.pop("profile_raw", "")
    if raw:
        path.with_suffix(".pyspy.txt").write_text(raw)  # collapsed stacks for flame graphs
    path.write_text(json.dumps(results, indent=1, default=str))
    print_report(results)
    print(f"results: {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
