"""CPU threads chosen on purpose: as many as the cores that other work leaves free.

A second OpenMP thread on a core another process keeps busy stalls every parallel region of the many small
ops in GPTQ and the clip search (2.5x slower for GPTQ on one linear here, benchmarks/bench_threads.py), so by
default the CLI measures how busy the machine is for a moment and uses only the idle cores.
"""

from __future__ import annotations

import os
import time


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat, or None where there is no such file."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]  # user .. steal (guest is inside user)
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields)  # idle + iowait


def idle_cores(sample_s: float = 0.2) -> float | None:
    """Cores' worth of idle CPU over the next `sample_s` seconds (None where the kernel does not say)."""
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(sample_s)
    second = _cpu_times()
    total = second[1] - first[1] if second else 0
    if total <= 0:
        return None
    return (os.cpu_count() or 1) * (second[0] - first[0]) / total


def pick_threads(requested: int | None) -> tuple[int | None, str | None]:
    """(threads, a note for the user or None): `requested` when given; None (keep torch's) when the user
    set OMP_NUM_THREADS; else one per usable core that is idle now (at least 1)."""
    if requested:
        return requested, None
    if os.environ.get("OMP_NUM_THREADS"):
        return None, None
    cores = usable_cores()
    idle = idle_cores()
    if idle is None or cores == 1:
        return cores, None
    threads = max(1, min(cores, round(idle)))
    if threads == cores:
        return cores, None
    return threads, (f"{idle:.1f} of {cores} cores idle (other work runs): using {threads} thread"
                     f"{'s' if threads > 1 else ''} (--threads N to choose)")
