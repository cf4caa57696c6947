"""``python -m bench.counts`` on a real mock and a real oaimux process: the counts the
chunk-path work was guided by (bench/README.md, "Counting instead of timing")."""

from __future__ import annotations

import json
import subprocess
import sys

from bench.peers import REPO_ROOT


def counts(*args: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.counts", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, float] = json.loads(done.stdout)
    return result


def test_system_calls_per_stream_are_counted_whole() -> None:
    # A stream of 3 chunks takes 6 writes: the upstream request, the head with the first
    # chunk (7 when the upstream's head came alone), two more chunks, [DONE] and the last
    # chunk; one write per piece, never one per framing part.
    found = counts("syscalls", "--streams", "10")
    assert 6.0 <= found["writes_per_stream"] <= 7.0
    assert 4.0 <= found["reads_per_stream"] <= 8.0


def test_heap_per_open_stream_is_what_a_stream_holds() -> None:
    found = counts("heap", "--streams", "50")
    # Each open stream holds its two connections, parsers, request and response:
    # kilobytes, not bytes (nothing counted) nor megabytes (something leaked per stream).
    assert 5_000 < found["heap_bytes_per_open_stream"] < 60_000


def test_memory_per_open_stream_counts_the_c_heap_and_the_resident_set() -> None:
    found = counts("memory", "--streams", "50")
    # What malloc hands out per stream (~5 KB: Python's larger objects and the C
    # libraries' own) and the resident set (~20 KB): kilobytes, below megabytes.
    assert 1_000 < found["malloc_bytes_per_open_stream"] < 40_000
    assert found["malloc_bytes_per_open_stream"] < found["rss_bytes_per_open_stream"] < 100_000


def test_sites_says_what_the_open_streams_hold_and_the_heap_per_stream() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.counts", "sites", "--streams", "30"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    *sites, last = done.stdout.splitlines()
    assert 5_000 < json.loads(last)["heap_bytes_per_open_stream"] < 60_000
    assert "-- bytes per stream by traceback" in sites
    # Each open stream's server connection, by type, among the objects that appeared.
    assert any(line.split()[-1] == "GuardedRequestHandler" for line in sites if line[:1] == " ")
