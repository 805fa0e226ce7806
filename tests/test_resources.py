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
    """Niceness is per thread on Linux: the shadow thread's must not reach the threads that
    answer requests, and a process started nicer than asked stays as nice as it was."""
    seen: list[int] = []
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def lowered() -> None:
        lower_thread_priority(7)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=lowered)
    thread.start()
    thread.join()
    assert seen == [max(base, 7)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # not this one
