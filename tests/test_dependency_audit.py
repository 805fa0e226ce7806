"""Dependency audit in CI: no known vulnerability in the locked requirements.

Runs scripts/audit_deps.py (pip-audit, with a fallback to PyPI's project endpoint where the
registry lacks the per-release one); it needs PyPI, which CI reaches. Ignored advisories, if
any, are listed with their reasons in scripts/audit_deps.py and docs/security.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_ignored_advisories_are_documented() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from audit_deps import IGNORED
    finally:
        sys.path.pop(0)
    security = (ROOT / "docs" / "security.md").read_text()
    for advisory, reason in IGNORED.items():
        assert reason.strip()
        assert advisory in security, f"{advisory} is ignored but not explained in security.md"
