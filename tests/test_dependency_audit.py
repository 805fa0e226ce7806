"""Dependency audit in CI: no known vulnerability in the locked requirements.

Runs scripts/audit_deps.py (pip-audit, with a fallback to PyPI's project endpoint where the
registry lacks the per-release one); it needs PyPI, which CI reaches. Ignored advisories, if
any, are listed with their reasons in scripts/audit_deps.py and docs/security.md, and so are
the packages that may go unaudited there (any other unaudited package fails the audit); the
tests after the first check those tables and that rule offline.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("requirements", ["requirements/runtime.txt", "requirements/test.txt"])
def test_no_known_vulnerabilities(requirements: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "audit_deps.py"), requirements],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "packages audited, 0 known vulnerabilities" in result.stdout


def _audit_deps() -> ModuleType:
    """scripts/audit_deps.py as a module (no network: only its tables and pure functions)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import audit_deps
    finally:
        sys.path.pop(0)
    return audit_deps


def test_ignored_advisories_are_documented() -> None:
    security = (ROOT / "docs" / "security.md").read_text()
    for advisory, reason in _audit_deps().IGNORED.items():
        assert reason.strip()
        assert advisory in security, f"{advisory} is ignored but not explained in security.md"


def test_packages_that_may_go_unaudited_are_pinned_and_documented() -> None:
    audit_deps = _audit_deps()
    security = (ROOT / "docs" / "security.md").read_text()
    assert set(audit_deps.MAY_GO_UNAUDITED) == {"runtime.txt", "test.txt"}
    for lock, names in audit_deps.MAY_GO_UNAUDITED.items():
        pinned = audit_deps.pins(ROOT / "requirements" / lock)
        for name in names:
            assert name in pinned, f"{name} may go unaudited in {lock} but is not pinned there"
            assert f"`{name}`" in security, f"{name} may go unaudited but security.md omits it"


def test_the_audit_fails_when_unaudited_packages_go_beyond_the_documented_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    audit_deps = _audit_deps()
    today = dt.date(2026, 12, 2)
    old = today - dt.timedelta(days=audit_deps.GRACE_DAYS + 1)
    allowed = sorted(audit_deps.MAY_GO_UNAUDITED["test.txt"])[0]
    listed = audit_deps.Unaudited(allowed, "1.0", "2.0", old)
    monkeypatch.setattr(audit_deps, "audit", lambda path: ([], [listed], 100))
    assert audit_deps.main(["requirements/test.txt"], today) == 0
    assert "NOT AUDITED" not in capsys.readouterr().out

    grown = [listed, audit_deps.Unaudited("left-pad", "1.0", "2.0", old)]
    monkeypatch.setattr(audit_deps, "audit", lambda path: ([], grown, 100))
    assert audit_deps.main(["requirements/test.txt"], today) == 1
    out = capsys.readouterr().out
    assert f"NOT AUDITED and not in MAY_GO_UNAUDITED: left-pad 1.0 (newest 2.0 of {old})" in out
    assert f"MAY_GO_UNAUDITED: {allowed}" not in out
    # Per lock file: what test.txt may leave unaudited, runtime.txt may not (unless listed).
    only_test = sorted(
        audit_deps.MAY_GO_UNAUDITED["test.txt"] - audit_deps.MAY_GO_UNAUDITED["runtime.txt"]
    )[0]
    outside = [audit_deps.Unaudited(only_test, "1", "2", old)]
    monkeypatch.setattr(audit_deps, "audit", lambda path: ([], outside, 9))
    assert audit_deps.main(["requirements/runtime.txt"], today) == 1


def test_a_newer_release_is_due_for_a_bump_first_and_fails_after_the_grace_days(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    audit_deps = _audit_deps()
    today = dt.date(2026, 12, 2)
    grace = audit_deps.GRACE_DAYS

    def outcome(released: dt.date | None) -> tuple[int, str]:
        entry = audit_deps.Unaudited("left-pad", "1.0", "2.0", released)
        monkeypatch.setattr(audit_deps, "audit", lambda path: ([], [entry], 100))
        return audit_deps.main(["requirements/test.txt"], today), capsys.readouterr().out

    status, out = outcome(today - dt.timedelta(days=grace))
    assert status == 0
    assert f"DUE FOR A BUMP: left-pad 1.0 (newest 2.0 of {today - dt.timedelta(days=grace)})" in out
    assert "NOT AUDITED" not in out
    status, out = outcome(today - dt.timedelta(days=grace + 1))
    assert status == 1 and "NOT AUDITED and not in MAY_GO_UNAUDITED: left-pad" in out
    status, out = outcome(None)  # age unknown: no grace
    assert status == 1 and "left-pad 1.0 (newest 2.0)" in out
