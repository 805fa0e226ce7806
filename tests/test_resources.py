"""CPU quota detection from cgroup files."""

from __future__ import annotations

import os
from pathlib import Path

from rottenbot_inference.resources import cpu_quota

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
