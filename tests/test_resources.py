"""CPU quota detection from cgroup files."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from rottenbot_inference.resources import cpu_quota, lower_thread_priority

HOST = len(os.sched_getaffinity(0))


def test_cgroup_v2_quota_rounds_up(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpu_quota(tmp_path) == min(HOST, 2)


def test_cgroup_v2_fraction_of_a_cpu_is_one(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert cpu_quota(tmp_path) == 1


def test_unlimited_cgroup_uses_affinity(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(tmp_path) == HOST


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(tmp_path) == 1


def test_no_cgroup_files(tmp_path: Path) -> None:
    assert cpu_quota(tmp_path) == HOST


def test_lower_thread_priority_lowers_only_the_calling_thread() -> None:
    """Niceness and SCHED_IDLE are per thread on Linux: the shadow thread's must not reach
    the threads that answer requests."""
    seen: dict[str, int] = {}

    def lowered(idle_class: bool) -> None:
        lower_thread_priority(7, idle_class=idle_class)
        tid = threading.get_native_id()
        seen[f"nice-{idle_class}"] = os.getpriority(os.PRIO_PROCESS, tid)
        seen[f"policy-{idle_class}"] = os.sched_getscheduler(tid)

    for idle_class in (False, True):
        thread = threading.Thread(target=lowered, args=(idle_class,))
        thread.start()
        thread.join()
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen == {  # a process started niced stays as nice as it was
        "nice-False": max(base, 7),
        "policy-False": os.SCHED_OTHER,
        "nice-True": max(base, 7),
        "policy-True": os.SCHED_IDLE,
    }
    assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER
