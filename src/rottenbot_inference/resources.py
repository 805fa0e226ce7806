"""How many CPUs this process may really use: the container's quota, not the host's cores."""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_v2_limit(root: Path) -> float | None:
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return int(quota) / int(period)


def _cgroup_v1_limit(root: Path) -> float | None:
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs available: min(affinity mask, cgroup CPU quota rounded up), at least 1."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        available = os.cpu_count() or 1
    limit = _cgroup_v2_limit(cgroup_root) or _cgroup_v1_limit(cgroup_root)
    if limit is not None:
        available = min(available, math.ceil(limit))
    return max(1, available)


def lower_thread_priority(niceness: int) -> None:
    """Raise the calling thread's niceness (Linux: per thread); e.g. a pool's initializer, so
    explanation and shadow work yield the cores to predictions.

    Not SCHED_IDLE: a thread of that class waits long for a core while it holds, or has asked
    for, the GIL, and CPython makes the thread that hands the GIL over wait until it runs (the
    shadow challenger measured 1.6-2.1x the champion's p99 at 1x capacity with it)."""
    if niceness <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < niceness:  # never raise it back
            os.setpriority(os.PRIO_PROCESS, tid, niceness)
    except OSError:  # not permitted (or not per-thread here): run at normal priority
        logging.getLogger(__name__).debug("could not lower a thread's priority", exc_info=True)
