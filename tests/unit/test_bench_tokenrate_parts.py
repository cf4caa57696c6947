"""The token-rate bench phase's pure parts: delta chunk sizes, the client's SSE stamp reader
fed in every possible split, the CPU split at phase boundaries, and the search for the
largest K a proxy carries."""

from __future__ import annotations

import json
from array import array
from typing import Any

import pytest

from bench.mock_upstream import DELTA_MAX_BYTES, DELTA_MIN_BYTES, delta_event
from bench.tokenrate import (
    COMPLETED,
    ENDED,
    FIRST,
    Boundary,
    ClientJob,
    ClientResult,
    TokenRun,
    _fill_cpu,
    _Reader,
    _Stream,
    first_failing,
    judge,
    next_k,
)

TS = 1_234_567_890_123


def test_delta_events_span_60_to_120_bytes_and_parse_as_chunks() -> None:
    sizes = set()
    for seq in range(61):
        event = delta_event(TS, seq)
        sizes.add(len(event))
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        chunk = json.loads(event[len(b"data: ") :])
        assert chunk["choices"][0]["delta"]["content"].startswith(f"ts={TS}")
    # The shortest event a 13-digit stamp allows, then every size up to the largest.
    assert min(sizes) >= DELTA_MIN_BYTES and max(sizes) == DELTA_MAX_BYTES
    assert set(range(min(sizes), DELTA_MAX_BYTES + 1)) == sizes


def _response(stamps: list[int]) -> bytes:
    """A chunked SSE response as the mock sends it, then [DONE] and the last chunk."""
    out = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    for i, ts in enumerate(stamps):
        event = delta_event(ts, i)
        out += b"%x\r\n%s\r\n" % (len(event), event)
    tail = b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    return out + b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail)


def _reader() -> tuple[_Reader, _Stream, list[int]]:
    counters = [0, 0, 0]
    reader = _Reader(ClientJob(port=1, request=b"", starts_ns=[0], deadline_ns=0), counters, 0)
    return reader, _Stream(reader, 0), counters


def _feed_in_pieces(reader: _Reader, st: _Stream, data: bytes, cuts: list[int]) -> None:
    bounds = [0, *cuts, len(data)]
    for t, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False), start=1):
        if st.ended:
            break
        reader.feed(st, st.tail + data[lo:hi], TS + 1000 * t)


def test_reader_counts_every_stamp_whatever_the_read_boundaries() -> None:
    stamps = [TS + i for i in range(3)]
    data = _response(stamps)
    for cut in range(1, len(data)):
        reader, st, counters = _reader()
        _feed_in_pieces(reader, st, data, [cut])
        res = reader.res
        assert res.chunks[0] == 3, cut
        assert res.completed[0] == 1, cut
        assert counters[FIRST] == counters[COMPLETED] == counters[ENDED] == 1, cut
        assert list(res.delay_ns) == [t - ts for t, ts in zip(res.recv_ns, stamps, strict=True)]


def test_reader_counts_chunks_merged_into_one_read() -> None:
    reader, st, _ = _reader()
    data = _response([TS, TS + 1, TS + 2])
    first_event_end = data.index(b"\n\n") + 2
    # One read carrying the head and the first chunk, one carrying the other two and the end.
    _feed_in_pieces(reader, st, data, [first_event_end])
    assert reader.res.coalesced == 2
    assert reader.res.chunks[0] == 3


def test_reader_reports_a_non_200_status_and_counts_the_stream_as_failed() -> None:
    reader, st, counters = _reader()
    reader.feed(st, b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0\r\n\r\n", TS)
    assert reader.res.errors == {"status 429": 1}
    assert reader.res.completed[0] == 0
    assert counters[FIRST] == counters[ENDED] == 1 and counters[COMPLETED] == 0


def _run(k: int, chunks: int) -> TokenRun:
    return TokenRun(
        k=k, mode="burst", chunks=chunks, interval_ms=20.0, ramp_ms=0.0, chunks_received=k * chunks
    )


def test_cpu_split_charges_the_steady_window_per_chunk_and_the_rest_per_stream() -> None:
    # 2 streams x 10 chunks: 2 chunks before set-up ends, 16 in the steady window, 2 after.
    recv = array("q", [5, 5] + [100 + i for i in range(16)] + [950, 960])
    res = ClientResult(recv_ns=recv)
    start = Boundary(t_ns=0, cpu_ns=0, rss=0)
    at = {
        FIRST: Boundary(t_ns=10, cpu_ns=1_000_000, rss=0),  # 1 ms: set-up + 2 chunks
        COMPLETED: Boundary(t_ns=900, cpu_ns=1_320_000, rss=0),  # 16 chunks x 20 us
        ENDED: Boundary(t_ns=1000, cpu_ns=1_540_000, rss=0),
    }  # 2 chunks + teardown
    run = _run(2, 10)
    _fill_cpu(run, [res], start, at, at[ENDED])
    assert run.cpu_window == "steady"
    assert run.steady_chunks == 16
    assert run.cpu_us_per_chunk == pytest.approx(20.0)
    assert run.setup_us_per_stream == pytest.approx((1000 - 2 * 20) / 2)
    assert run.teardown_us_per_stream == pytest.approx((220 - 2 * 20) / 2)


def test_cpu_without_a_steady_window_is_over_the_whole_run() -> None:
    res = ClientResult(recv_ns=array("q", range(20)))
    start = Boundary(0, 0, 0)
    # The first stream ended before the last one had its first chunk: no steady window.
    at = {COMPLETED: Boundary(50, 300_000, 0), FIRST: Boundary(60, 350_000, 0)}
    end = Boundary(100, 400_000, 0)
    run = _run(2, 10)
    _fill_cpu(run, [res], start, at, end)
    assert run.cpu_window == "whole run"
    assert run.cpu_us_per_chunk == pytest.approx(400 / 20)
    assert run.setup_us_per_stream is None


def _row(k: int, p99: float, completed: int | None = None, late: float = 1.0) -> dict[str, Any]:
    return {
        "k": k,
        "completed": k if completed is None else completed,
        "delay_p99_ms": p99,
        "mock_late_p99_ms": late,
        "cpu_us_per_chunk": 30.0,
    }


def test_judge_compares_with_direct_at_the_same_k() -> None:
    assert judge(_row(100, 12.0), _row(100, 3.0), 10.0)["ok"]
    assert not judge(_row(100, 14.0), _row(100, 3.0), 10.0)["ok"]
    assert not judge(_row(100, 5.0, completed=99), _row(100, 3.0), 10.0)["ok"]
    slow_mock = judge(_row(100, 50.0), _row(100, 3.0, late=40.0), 10.0)
    assert not slow_mock["ok"] and slow_mock["load_bound"]


def _tried(**verdicts: bool) -> dict[int, dict[str, Any]]:
    return {int(k[1:]): {"ok": ok, "runs": 2, "load_bound": False} for k, ok in verdicts.items()}


@pytest.mark.parametrize(
    ("tried", "want"),
    [
        ({}, 100),
        (_tried(k100=True), 200),  # no failure yet: double
        (_tried(k100=True, k1000=False), 320),  # geometric middle, to 10
        (_tried(k100=False), 33),  # no success yet: a third
        (_tried(k100=True, k115=False), None),  # known within 1.2x: done
        (_tried(k3000=True), None),  # at the limit already
    ],
)
def test_next_k_bisects_geometrically_and_stops(
    tried: dict[int, dict[str, Any]], want: int | None
) -> None:
    assert next_k(tried, limit_k=3000) == want


def test_first_failing_is_the_smallest_failure_above_the_largest_success() -> None:
    # A lucky pass above a failure wins: the failure below it was noise.
    assert first_failing(_tried(k100=True, k200=False, k300=True, k1000=False)) == 1000
    assert first_failing(_tried(k100=True)) is None
