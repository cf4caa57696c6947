"""Optional: where does oaimux spend its CPU? Sample it with py-spy under load.

Used by ``python -m bench --profile`` after the measured phases (so the sampler's overhead
never touches a reported figure). Needs ``py-spy`` on PATH and permission to ptrace the proxy
(root, or ``kernel.yama.ptrace_scope = 0``); without them the phase is skipped with a note.

Contract: ``summarize_collapsed`` turns py-spy's "raw" (collapsed stack) output into the top
functions by *self* time (where the CPU actually is), self time per package (aiohttp, the
project's ``proxy``, asyncio, ...), and the project's own functions by *inclusive* time (which
of its call paths the CPU is under), each as a percentage of all samples.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

_FRAME_RE = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def available() -> bool:
    return shutil.which("py-spy") is not None


def record_command(pids: list[int], seconds: float, out: Path, rate: int = 250) -> list[str]:
    """py-spy command sampling the first pid (and its children) without pausing it."""
    return [
        "py-spy",
        "record",
        "--pid",
        str(pids[0]),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--output",
        str(out),
        "--nonblocking",
        "--subprocesses",
    ]


def _short(frame: str) -> str:
    """``func (path/to/pkg/mod.py:123)`` -> ``func (pkg/mod.py)``: group by function."""
    m = _FRAME_RE.match(frame.strip())
    if not m:
        return frame.strip()
    parts = m.group("file").replace("\\", "/").split("/")
    return f"{m.group('func')} ({'/'.join(parts[-2:])})"


def summarize_collapsed(text: str, top: int = 15) -> dict[str, object]:
    """Top-N functions by self and by inclusive share of samples (percent)."""
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    pkg_c: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if f]
        # py-spy puts the process/thread as the first frame; skip anything without a file.
        frames = [f for f in frames if "(" in f]
        if not frames:
            continue
        total += n
        self_c[frames[-1]] += n
        pkg_c[_package(frames[-1])] += n
        for f in set(frames):
            # Inclusive time only for the project's own functions: the frames above them
            # (runpy, the event loop, aiohttp's request handler) contain everything anyway.
            if "(proxy/" in f:
                incl_c[f] += n
    if not total:
        return {"samples": 0, "self": [], "inclusive": [], "self_by_package": []}

    if incl_c:
        # Entry points (the CLI, the serve loop) sit above every sample alike and say nothing
        # about where the time goes: drop the frames tied with the largest count.
        top_count = max(incl_c.values())
        for name in [k for k, v in incl_c.items() if v == top_count]:
            del incl_c[name]

    def pct(c: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in c.most_common(top)]

    return {
        "samples": total,
        "self": pct(self_c),
        "inclusive": pct(incl_c),
        "self_by_package": pct(pkg_c),
    }


def _package(short: str) -> str:
    """``func (aiohttp/client.py)`` -> ``aiohttp``; the event loop's own C time shows up as
    ``Runner.run`` / ``run_forever`` (uvloop has no Python frames), grouped as "event loop"."""
    func, _, where = short.partition(" (")
    if func in ("Runner.run", "run_forever", "BaseEventLoop.run_forever", "_run_once"):
        return "event loop (uvloop, C)"
    where = where.rstrip(")")
    if "/" not in where:  # py-spy names standard-library files without their directory
        return f"stdlib ({where})"
    return where.split("/")[0]
