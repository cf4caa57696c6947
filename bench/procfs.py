"""Read CPU time and memory of process trees from /proc (Linux only).

Contract: every function takes a list of pids and quietly skips pids that have gone away,
so a sample taken while a worker restarts is short rather than an exception. Nothing here
writes to /proc except ``reset_peak_rss`` (which needs to own the process, or root).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
HAVE_SCHEDSTAT = os.path.exists("/proc/self/schedstat")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may contain spaces)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def tree_pids(root: int) -> list[int]:
    """``root`` plus all its live descendants (workers forked by a server, nginx's worker)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = [root]
    while todo and len(out) < 10_000:  # bounded: a tree this large is a bug, not a proxy
        pid = todo.pop()
        if os.path.exists(f"/proc/{pid}"):
            out.append(pid)
            todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime of the given processes (all their threads), in seconds.

    The kernel reports it in clock ticks (10 ms here); callers measure runs long enough
    (seconds of busy CPU) that the tick granularity is well under 1%.
    """
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # Fields 14 and 15 of stat (1-based); index 11/12 after dropping pid and comm.
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def cpu_ns(pids: list[int]) -> int:
    """Time on CPU of the given processes, summed over their threads, in ns.

    From each thread's ``schedstat`` (exact, where ``cpu_seconds`` counts 10 ms ticks), for
    reading short windows such as the phases of one token-rate run. Falls back to ticks when
    the kernel has no schedstat. Threads that exited between two reads are not counted.
    """
    if not HAVE_SCHEDSTAT:
        return int(cpu_seconds(pids) * 1e9)
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # the process has gone
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except OSError:
                continue  # the thread has gone
    return total


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_bytes(pids: list[int]) -> int:
    """Sum of resident set sizes (VmRSS)."""
    return sum(_status_kb(p, "VmRSS:") for p in pids) * 1024


def peak_rss_bytes(pids: list[int]) -> int:
    """Sum of peak resident set sizes (VmHWM) since start or the last ``reset_peak_rss``."""
    return sum(_status_kb(p, "VmHWM:") for p in pids) * 1024


def reset_peak_rss(pids: list[int]) -> bool:
    """Reset VmHWM to the current RSS (writes 5 to clear_refs). False if not permitted."""
    ok = True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            ok = False
    return ok


@dataclass(frozen=True)
class CoreTimes:
    """Busy and total jiffies of one CPU, from /proc/stat."""

    busy: int
    total: int


def core_times(cpu: int) -> CoreTimes | None:
    """Jiffies of ``cpu`` so a run can report how busy the proxy's core was in total.

    Busy minus the proxy's own CPU is load from something else on the machine (this box
    is shared), which we report so a noisy figure can be recognised as noise.
    """
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith(f"cpu{cpu} "):
                    vals = [int(v) for v in line.split()[1:]]
                    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
                    return CoreTimes(busy=sum(vals[:8]) - idle, total=sum(vals[:8]))
    except OSError:
        pass
    return None


def busy_fraction(a: CoreTimes | None, b: CoreTimes | None) -> float | None:
    """Fraction of time the core was busy between two samples."""
    if a is None or b is None or b.total <= a.total:
        return None
    return (b.busy - a.busy) / (b.total - a.total)


def set_autogroup_nice(pid: int, nice: int) -> bool:
    """Set the nice value of ``pid``'s scheduler autogroup (Linux with autogroup enabled).

    With autogroup on, the CPU is first shared between session groups and only then by nice
    inside a group, so a process's own nice value does not help against another session's
    jobs; the group's does. False when autogroup is off or the write is not permitted.
    """
    try:
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(str(nice))
        return True
    except OSError:
        return False
