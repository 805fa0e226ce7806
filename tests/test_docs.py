"""The documentation points only at files (and headings) that exist in this repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Files that commands write when run (named as output paths, not as documents to read).
COMMAND_OUTPUTS = {"bench/results/soak.md"}

_MD_MENTION = re.compile(r"[A-Za-z0-9_./-]*[A-Za-z0-9_-]\.md\b")
_MD_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *patterns],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    return [ROOT / name for name in out.splitlines() if (ROOT / name).is_file()]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    in_fence = False
    anchors = set()
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


def test_every_mentioned_markdown_file_exists() -> None:
    missing = []
    for path in _tracked("*.md", "*.py", "*.yaml", "*.yml", "*.sh", "*.example", "Dockerfile"):
        for mention in set(_MD_MENTION.findall(path.read_text(errors="replace"))):
            if mention in COMMAND_OUTPUTS or mention.startswith(("http", "//")):
                continue
            bases = (path.parent, ROOT, ROOT / "docs")
            if not any((base / mention).is_file() for base in bases):
                missing.append(f"{path.relative_to(ROOT)} mentions {mention}")
    assert not missing, "\n".join(missing)


def test_markdown_links_resolve_to_files_and_headings() -> None:
    broken = []
    for path in _tracked("*.md"):
        for target in _MD_LINK.findall(path.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            name, _, anchor = target.partition("#")
            linked = (path.parent / name).resolve() if name else path
            where = f"{path.relative_to(ROOT)} -> {target}"
            if not linked.exists():
                broken.append(f"{where}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{where}: no such heading")
    assert not broken, "\n".join(broken)
