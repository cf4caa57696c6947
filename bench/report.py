"""Turn raw results into the one table of ratios, with each goal next to its figure.

Contract: ``summarize(results)`` reads the dict the driver writes to JSON (so a saved file can
be re-rendered with ``python -m bench --report FILE``) and returns rows; ``render`` formats
them as a Markdown table that also reads well in a terminal. Missing data (a peer that did
not run, nginx not installed) shows as "–" and its goal as "n/a", never as an error.

Aggregation: each figure is the median over the interleaved rounds; "added" figures are the
peer's median minus direct's median from the same run.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

SUBJECT = "oaimux"
PEER_COLUMNS = ("direct", "nginx", SUBJECT)
DASH = "–"


@dataclass
class Row:
    """One line of the table. ``values`` maps peer name to its figure (None = not measured)."""

    figure: str
    values: dict[str, float | None]
    vs_direct: str = DASH
    vs_nginx: str = DASH
    goal: str = ""
    met: bool | None = None  # None: no goal, or not measurable in this run
    fmt: str = "{:.2f}"


def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return DASH
    return f"{a / b:.2f}×"


def _added(a: float | None, b: float | None, unit: str = "ms") -> str:
    if a is None or b is None:
        return DASH
    return f"{a - b:+.2f} {unit}"


def _pick(rows: list[dict[str, Any]], key: str, **match: Any) -> dict[str, float | None]:
    """Median of ``key`` per peer over the rows matching ``match`` (i.e. over rounds)."""
    per_peer: dict[str, list[float | None]] = {}
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            per_peer.setdefault(r["peer"], []).append(r.get(key))
    return {peer: _median(vals) for peer, vals in per_peer.items()}


def _goal(ok: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "n/a"}[ok]


def _compared(
    figure: str,
    values: dict[str, float | None],
    direct: Callable[[float | None, float | None], str] | None = _ratio,
    **rest: Any,
) -> Row:
    """A row of ``values`` with the subject set against direct's figure (by
    ``direct``: ``_ratio`` or ``_added``; ``None``: not compared) and as a ratio of
    nginx's; ``rest``: the row's other fields."""
    subject = values.get(SUBJECT)
    vs_direct = DASH if direct is None else direct(subject, values.get("direct"))
    return Row(
        figure, values, vs_direct=vs_direct, vs_nginx=_ratio(subject, values.get("nginx")), **rest
    )


def summarize(results: dict[str, Any]) -> list[Row]:
    """The table's figures with their goals, in order, from a results dict (see the module)."""
    rows: list[Row] = []
    ns: list[dict[str, Any]] = results.get("nonstream", [])
    conns_levels = sorted({r["conns"] for r in ns})

    # -- non-streaming throughput, latency and CPU ------------------------------------------
    for c in conns_levels:
        rps = _pick(ns, "rps", conns=c)
        rows.append(_compared(f"non-stream req/s, {c} conn{_s(c)}", rps, fmt="{:,.0f}"))
    for c in conns_levels:
        p50 = _pick(ns, "p50_ms", conns=c)
        p99 = _pick(ns, "p99_ms", conns=c)
        row = _compared(f"latency p50 ms, {c} conn{_s(c)}", p50, _added, fmt="{:.3f}")
        if c == 1:
            added = _sub(p50.get(SUBJECT), p50.get("direct"))
            row.goal, row.met = "added ≤ 0.3 ms", _le(added, 0.3)
        rows.append(row)
        rows.append(_compared(f"latency p99 ms, {c} conn{_s(c)}", p99, _added, fmt="{:.3f}"))
    for c in conns_levels:
        cpu = _pick(ns, "cpu_us_per_req", conns=c)
        ratio = _div(cpu.get(SUBJECT), cpu.get("nginx"))
        row = _compared(f"proxy CPU µs/request, {c} conn{_s(c)}", cpu, None, fmt="{:.0f}")
        if c > 1:
            # At 1 connection every request also pays an idle wake-up of the proxy's core,
            # which says more about the VM than the proxy; the goal is about work per request.
            row.goal, row.met = "≤ 4× nginx", _le(ratio, 4.0)
        rows.append(row)
    if any(r["peer"] == f"{SUBJECT}-tokens" for r in ns):
        for c in conns_levels:
            cpu = _pick(ns, "cpu_us_per_req", conns=c)
            with_budget = cpu.get(f"{SUBJECT}-tokens")
            row = Row(
                f"proxy CPU µs/request with a token budget, {c} conn{_s(c)}",
                {SUBJECT: with_budget},
                vs_nginx=f"{_ratio(with_budget, cpu.get(SUBJECT))} of without",
                fmt="{:.0f}",
            )
            if c > 1:
                row.goal = "≤ 1.05× without"
                row.met = _le(_div(with_budget, cpu.get(SUBJECT)), 1.05)
            rows.append(row)
    for name in sorted({r["peer"] for r in ns if r["peer"].startswith(f"{SUBJECT}-w")}):
        for c in conns_levels:
            rps = _pick(ns, "rps", conns=c)
            cell = {SUBJECT: rps.get(name)}
            rows.append(
                Row(
                    f"{name} req/s, {c} conn (scaling vs 1 worker)",
                    cell,
                    vs_direct=_ratio(rps.get(name), rps.get("direct")),
                    vs_nginx=f"{_ratio(rps.get(name), rps.get(SUBJECT))} of 1 worker",
                    fmt="{:,.0f}",
                )
            )

    # -- SSE --------------------------------------------------------------------------------
    sse: list[dict[str, Any]] = results.get("sse", [])
    ks = sorted({r["k"] for r in sse})
    for k in ks:
        ttfb = _pick(sse, "ttfb_p50_ms", k=k)
        row = _compared(f"SSE TTFB p50 ms, {k} stream{_s(k)}", ttfb, _added)
        if k == 100:
            row.goal = "added ≤ 2 ms"
            row.met = _le(_sub(ttfb.get(SUBJECT), ttfb.get("direct")), 2.0)
        rows.append(row)
    for k in ks:
        delay = _pick(sse, "delay_p50_ms", k=k)
        row = _compared(f"SSE chunk delay p50 ms, {k} stream{_s(k)}", delay, _added, fmt="{:.3f}")
        if k == 1000:
            row.goal = "added ≤ 0.5 ms"
            row.met = _le(_sub(delay.get(SUBJECT), delay.get("direct")), 0.5)
        rows.append(row)
    if sse:
        coalesced = _sum_per_peer(sse, "coalesced")
        failed = {p: float(v) for p, v in _sum_per_peer(sse, "failed").items()}
        for figure, counts in (
            ("SSE chunks coalesced (all runs)", coalesced),
            ("SSE streams failed (all runs)", failed),
        ):
            met = _le(counts.get(SUBJECT), 0)
            rows.append(Row(figure, counts, goal="0", met=met, fmt="{:.0f}"))

    # -- memory and hang-up -----------------------------------------------------------------
    hold: dict[str, dict[str, Any]] = results.get("hold", {})
    if hold:
        n = max((h.get("streams_open") or 0) for h in hold.values())
        idle = {p: h.get("idle_rss_mb") for p, h in hold.items()}
        rows.append(_compared("proxy idle RSS MB", idle, None, fmt="{:.1f}"))
        kb = {p: h.get("kb_per_stream") for p, h in hold.items()}
        rows.append(
            _compared(
                f"memory KB per open stream ({n} open)",
                kb,
                None,
                goal="≤ 20 KB",
                met=_le(kb.get(SUBJECT), 20.0),
                fmt="{:.1f}",
            )
        )
        left = {p: h.get("upstream_left_open") for p, h in hold.items()}
        rows.append(
            Row(
                f"upstream conns open 2 s after {n} clients hung up",
                left,
                goal="0",
                met=_le(left.get(SUBJECT), 0),
                fmt="{:.0f}",
            )
        )

    # -- big bodies ---------------------------------------------------------------------------
    big: dict[str, dict[str, Any]] = results.get("large_body", {})
    if big:
        mb = next(iter(big.values())).get("body_mb", 0)
        lat = {p: b.get("model_first_ms") for p, b in big.items()}
        rows.append(
            _compared(
                f"{mb:.0f} MB JSON request, latency ms",
                lat,
                _added,
                goal="added ≤ 10 ms",
                met=_le(_sub(lat.get(SUBJECT), lat.get("direct")), 10.0),
                fmt="{:.1f}",
            )
        )
        growth = {p: b.get("peak_growth_mb") for p, b in big.items()}
        rows.append(
            Row(
                f"{mb:.0f} MB JSON request, peak RSS growth MB",
                growth,
                vs_direct=(
                    f"{growth[SUBJECT] / mb:.2f}× body"
                    if growth.get(SUBJECT) is not None and mb
                    else DASH
                ),
                goal="≤ 2× body",
                met=_le(_div(growth.get(SUBJECT), mb), 2.0),
                fmt="{:.1f}",
            )
        )
        route = {p: _sub(b.get("model_last_ms"), b.get("model_first_ms")) for p, b in big.items()}
        rows.append(
            Row(
                f"{mb:.0f} MB JSON, model last minus first, ms",
                route,
                vs_direct=_added(route.get(SUBJECT), route.get("direct")),
                fmt="{:+.1f}",
            )
        )
    binary: dict[str, dict[str, Any]] = results.get("binary", {})
    if binary:
        mbs = {p: b.get("mb_per_s") for p, b in binary.items()}
        ratio = _div(mbs.get(SUBJECT), mbs.get("nginx"))
        rows.append(
            _compared(
                "10 MB binary response, MB/s",
                mbs,
                goal="≥ 0.95× nginx",
                met=_ge(ratio, 0.95),
                fmt="{:.0f}",
            )
        )
    return rows


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _le(a: float | None, limit: float) -> bool | None:
    return None if a is None else a <= limit


def _ge(a: float | None, limit: float) -> bool | None:
    return None if a is None else a >= limit


def _sum_per_peer(rows: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for r in rows:
        out[r["peer"]] = (out.get(r["peer"]) or 0) + (r.get(key) or 0)
    return out


def render(rows: list[Row], columns: tuple[str, ...] = PEER_COLUMNS) -> str:
    """A Markdown table, padded so it also lines up in a terminal."""
    header = ["figure", *columns, f"{SUBJECT} vs direct", f"{SUBJECT} vs nginx", "goal", "status"]
    cells: list[list[str]] = [header]
    for r in rows:
        vals = [(DASH if r.values.get(c) is None else r.fmt.format(r.values[c])) for c in columns]
        status = "" if not r.goal else _goal(r.met)
        cells.append([r.figure, *vals, r.vs_direct, r.vs_nginx, r.goal, status])
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        rest = [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        parts = [row[0].ljust(widths[0]), *rest]
        return "| " + " | ".join(parts) + " |"

    sep = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def goals_summary(rows: list[Row]) -> str:
    with_goal = [r for r in rows if r.goal]
    met = sum(1 for r in with_goal if r.met)
    unknown = sum(1 for r in with_goal if r.met is None)
    return f"goals met: {met} of {len(with_goal)}" + (f" ({unknown} n/a)" if unknown else "")


# -- token rate ---------------------------------------------------------------------------------

_TOKEN_FIELDS = (
    "completed",
    "cpu_us_per_chunk",
    "setup_us_per_stream",
    "teardown_us_per_stream",
    "delay_p50_ms",
    "delay_p99_ms",
    "ttfb_p50_ms",
    "ttfb_p99_ms",
    "kb_per_stream",
    "mock_late_p99_ms",
    "load_cpu_pct",
    "foreign_pct",
    "coalesced",
    "chunks_received",
    "chunks_expected",
)


def token_cells(results: dict[str, Any]) -> dict[tuple[int, str, str], dict[str, float | None]]:
    """(K, start mode, peer) -> median over rounds of each token-rate figure (level runs only,
    not the search's)."""
    runs = [r for r in results.get("tokenrate", {}).get("runs", []) if not r.get("search")]
    groups: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["k"], r["mode"], r["peer"]), []).append(r)
    cells: dict[tuple[int, str, str], dict[str, float | None]] = {}
    for key, rows in groups.items():
        cell = {f: _median(r.get(f) for r in rows) for f in _TOKEN_FIELDS}
        # The largest growth over rounds: a Python process reuses memory an earlier run freed,
        # so later rounds read low.
        cell["kb_per_stream"] = max(
            (r["kb_per_stream"] for r in rows if r.get("kb_per_stream") is not None), default=None
        )
        # 1.0 when some round had no steady window (CPU per chunk is then over the whole run)
        cell["whole_run"] = float(any(r.get("cpu_window") == "whole run" for r in rows))
        cells[key] = cell
    return cells


def load_saturated(direct: dict[str, float | None], k: int, limit_ms: float) -> bool:
    """Direct's own run missed what a proxy is judged by (every stream complete, chunk-delay
    p99 and the mock's lateness p99 within the limit): the load side itself could not keep up,
    so that group's "added" figures say little about the proxies."""
    return bool(direct) and (
        (direct.get("completed") or 0) < k
        or (direct.get("delay_p99_ms") or 0.0) > limit_ms
        or (direct.get("mock_late_p99_ms") or 0.0) > limit_ms
    )


def render_tokenrate(results: dict[str, Any]) -> str:
    """The token-rate phase as two Markdown tables: every level run, and the search."""
    tr = results.get("tokenrate") or {}
    cells = token_cells(results)
    if not cells:
        return ""
    plan = tr.get("plan", {})
    peer_order = [
        p for p in (*PEER_COLUMNS, *sorted({k[2] for k in cells})) if any(k[2] == p for k in cells)
    ]
    peer_order = list(dict.fromkeys(peer_order))
    header = [
        "K",
        "start",
        "peer",
        "streams done",
        "CPU µs/chunk",
        "vs nginx",
        "set-up µs/stream",
        "teardown µs/stream",
        "delay p50 ms",
        "delay p99 ms",
        "TTFB p50 ms",
        "TTFB p99 ms",
        "KB/stream",
        "chunks merged",
        "mock late p99 ms",
        "load CPU %",
        "foreign %",
        "note",
    ]
    table: list[list[str]] = [header]
    limit = plan.get("search_limit_ms", 10.0)
    any_whole = False
    for k in sorted({key[0] for key in cells}):
        for mode in ("burst", "ramp"):
            direct = cells.get((k, mode, "direct"), {})
            nginx = cells.get((k, mode, "nginx"), {})
            note = "load side saturated" if load_saturated(direct, k, limit) else ""
            for peer in peer_order:
                c = cells.get((k, mode, peer))
                if c is None:
                    continue
                proxied = peer != "direct"
                # Set-up, teardown and memory only from burst starts: after a ramp the set-up
                # is CPU minus a second of relayed chunks (a difference of two large numbers),
                # and memory is what the burst run at this K already grew.
                burst = proxied and mode == "burst"
                whole = "*" if c["whole_run"] else ""
                any_whole = any_whole or bool(whole)
                table.append(
                    [
                        f"{k:,}",
                        mode,
                        peer,
                        _pct(c["completed"], k),
                        _f(c["cpu_us_per_chunk"], "{:.1f}") + whole if proxied else DASH,
                        (
                            _ratio(c["cpu_us_per_chunk"], nginx.get("cpu_us_per_chunk"))
                            if proxied and peer != "nginx"
                            else DASH
                        ),
                        _f(c["setup_us_per_stream"], "{:.0f}") if burst else DASH,
                        _f(c["teardown_us_per_stream"], "{:.0f}") if burst else DASH,
                        _vs_floor(c["delay_p50_ms"], direct.get("delay_p50_ms"), proxied),
                        _vs_floor(c["delay_p99_ms"], direct.get("delay_p99_ms"), proxied),
                        _f(c["ttfb_p50_ms"], "{:.1f}"),
                        _f(c["ttfb_p99_ms"], "{:.1f}"),
                        _f(c["kb_per_stream"], "{:.1f}") if burst else DASH,
                        _f(c["coalesced"], "{:,.0f}"),
                        _f(c["mock_late_p99_ms"], "{:.1f}"),
                        _f(c["load_cpu_pct"], "{:.0f}"),
                        _f(c["foreign_pct"], "{:.0f}"),
                        note,
                    ]
                )
    out = [_markdown(table)]
    if any_whole:
        out.append(
            "\n\\* no steady window (the first stream ended before the last one had its "
            "first chunk): CPU over the whole run, set-up included."
        )
    search = tr.get("search") or {}
    if search:
        ng = (search.get("nginx") or {}).get("largest_k")
        rows: list[list[str]] = [
            [
                "peer",
                "largest K carried",
                "first K not carried",
                "vs nginx",
                "CPU-bound K (1 core)",
                "note",
            ]
        ]
        for peer, s in search.items():
            best = s.get("largest_k")
            rows.append(
                [
                    peer,
                    _f(best, "{:,.0f}"),
                    _f(s.get("first_failing_k"), "{:,.0f}"),
                    _ratio(best, ng) if peer != "nginx" else DASH,
                    _f(s.get("cpu_bound_k"), "{:,.0f}") if "-w" not in peer else DASH,
                    "load side saturated above it: a lower bound"
                    if s.get("limited_by_load")
                    else "",
                ]
            )
        out.append(
            f"\nLargest K carried at {plan.get('rate', 50):g} chunks/s with ramped "
            f"starts: every stream complete and chunk-delay p99 at most "
            f"{plan.get('search_limit_ms', 10):g} ms above direct's at the same K.\n"
        )
        out.append(_markdown(rows))
    return "\n".join(out)


def _f(v: float | None, fmt: str) -> str:
    return DASH if v is None else fmt.format(v)


def _pct(done: float | None, k: int) -> str:
    return DASH if done is None else f"{done:,.0f}/{k:,}"


def _vs_floor(v: float | None, floor: float | None, proxied: bool) -> str:
    """Direct's figure as measured; a proxy's as what it adds over direct's."""
    if v is None:
        return DASH
    if not proxied:
        return f"{v:.2f}"
    return DASH if floor is None else f"{v - floor:+.2f}"


def _markdown(cells: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]

    def line(row: list[str]) -> str:
        parts = [
            c.ljust(w) if i < 3 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "| " + " | ".join(parts) + " |"

    sep = (
        "|" + "|".join("-" * (w + 1) + (":" if i >= 3 else "-") for i, w in enumerate(widths)) + "|"
    )
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])
