"""scripts/install.sh runs pip only when the lock or pyproject.toml changed.

The script runs in a copy of the files it reads, with a stand-in Python whose `-m venv` creates
a `.venv/bin/python` that records each pip call instead of installing: the script's logic is
real, nothing is downloaded.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
# `python -m venv DIR`: a venv whose python appends its arguments to DIR/pip-calls.
set -eu
[ "$1 $2" = "-m venv" ] || exit 3
mkdir -p "$3/bin"
cat > "$3/bin/python" <<'INNER'
#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../pip-calls"
INNER
chmod +x "$3/bin/python"
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    (copy / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "install.sh", copy / "scripts")
    shutil.copytree(ROOT / "requirements", copy / "requirements")
    shutil.copy(ROOT / "pyproject.toml", copy)
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    return copy


def _install(repo: Path, profile: str = "runtime") -> list[str]:
    """Run install.sh; the pip calls it made this time."""
    calls = repo / ".venv" / "pip-calls"
    before = calls.read_text().splitlines() if calls.exists() else []
    done = subprocess.run(
        ["bash", "scripts/install.sh", profile], cwd=repo, capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(repo.parent / "python3")}, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    after = calls.read_text().splitlines() if calls.exists() else []
    return after[len(before):]


def test_first_run_installs_everything(repo: Path) -> None:
    assert _install(repo) == [
        "-m pip install -q --disable-pip-version-check --upgrade pip",
        "-m pip install -q --disable-pip-version-check -r requirements/runtime.txt",
        "-m pip install -q --disable-pip-version-check --no-deps -e .",
    ]


def test_later_runs_install_only_after_a_change(repo: Path) -> None:
    assert len(_install(repo)) == 3
    assert _install(repo) == []  # nothing changed: no pip at all
    with (repo / "requirements" / "runtime.txt").open("a") as lock:
        lock.write("example==1.0\n")
    assert len(_install(repo)) == 3
    assert _install(repo) == []
    pyproject = repo / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('version = "', 'version = "9', 1))
    assert len(_install(repo)) == 3
    assert _install(repo) == []


def test_each_profile_has_its_own_stamp(repo: Path) -> None:
    assert len(_install(repo, "runtime")) == 3
    assert "-r requirements/test.txt" in " ".join(_install(repo, "test"))
    assert _install(repo, "test") == [] and _install(repo, "runtime") == []


def test_an_interrupted_install_is_redone(repo: Path) -> None:
    _install(repo)
    (repo / ".venv" / ".installed-runtime").write_text("a run that did not finish\n")
    assert len(_install(repo)) == 3


def test_an_unknown_profile_is_refused(repo: Path) -> None:
    done = subprocess.run(
        ["bash", "scripts/install.sh", "tset"], cwd=repo, capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(repo.parent / "python3")}, timeout=60,
    )
    assert done.returncode == 2 and "no requirements/tset.txt" in done.stderr
    assert not (repo / ".venv").exists()
