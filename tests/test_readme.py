"""The README's API examples run verbatim against a live service and print what it shows.

Every fenced ```bash block of README.md that calls the API with curl is run with bash from the
repository root, as a reader would after the first command (`bash scripts/serve.sh`: the
bundled demo model on embedded defaults). The only change is the address: the service listens on
a free loopback port instead of 8000. When a ```json block follows, the output must match it
(`"..."` stands for more of the same; numbers to the decimals shown).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DEV_JWT_SECRET, running_server

ROOT = Path(__file__).resolve().parents[1]
README_ADDRESS = "http://127.0.0.1:8000"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def api_examples(text: str) -> list[tuple[str, Any]]:
    """(bash block, the JSON shown after it or None) for every block that calls the API."""
    blocks = _FENCE.findall(text)
    examples = []
    for index, (language, body) in enumerate(blocks):
        if language == "bash" and re.search(r"^\s*curl\b", body, re.MULTILINE):
            following = blocks[index + 1] if index + 1 < len(blocks) else ("", "")
            shown = json.loads(following[1]) if following[0] == "json" else None
            examples.append((body, shown))
    return examples


def matches(shown: Any, actual: Any) -> bool:
    """`actual` is what `shown` documents: "..." elides, floats agree to the shown decimals."""
    if shown == "...":
        return True
    if isinstance(shown, dict):
        return (isinstance(actual, dict) and shown.keys() == actual.keys()
                and all(matches(value, actual[key]) for key, value in shown.items()))
    if isinstance(shown, list):
        elided = bool(shown) and shown[-1] == "..."
        items = shown[:-1] if elided else shown
        if not isinstance(actual, list) or len(actual) < len(items):
            return False
        if not elided and len(actual) != len(items):
            return False
        return all(matches(s, a) for s, a in zip(items, actual, strict=False))
    if isinstance(shown, float):
        decimals = len(repr(shown).partition(".")[2])
        return isinstance(actual, float) and round(actual, decimals) == shown
    return type(shown) is type(actual) and shown == actual


EXAMPLES = api_examples((ROOT / "README.md").read_text())


def test_the_readme_has_api_examples() -> None:
    assert EXAMPLES, "no ```bash block with curl found in README.md"
    assert all(shown is not None for _, shown in EXAMPLES), "show each example's output"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The service as `bash scripts/serve.sh` starts it: bundled demo model, embedded defaults."""
    folder = tmp_path_factory.mktemp("readme")
    env = {"DATA_DIR": str(folder / "data"), "JWT_SECRET": DEV_JWT_SECRET}
    with running_server(env, folder / "server.log") as base_url:
        yield base_url


@pytest.mark.parametrize(
    ("script", "shown"), EXAMPLES, ids=[f"example-{n + 1}" for n in range(len(EXAMPLES))]
)
def test_readme_api_example_runs_verbatim(service: str, script: str, shown: Any) -> None:
    assert README_ADDRESS in script
    environ = {key: value for key, value in os.environ.items() if key != "JWT_SECRET"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script.replace(README_ADDRESS, service)],
        cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr}"
    actual = json.loads(done.stdout)
    assert matches(shown, actual), f"README shows {shown}\nthe service printed {actual}"


@pytest.mark.parametrize(
    ("shown", "actual", "expected"),
    [
        ({"a": 0.95, "b": ["x", "..."]}, {"a": 0.9487, "b": ["x", "y"]}, True),
        ({"a": 0.95}, {"a": 0.94}, False),
        ({"a": 1}, {"a": 1, "extra": 2}, False),
        (["x"], ["x", "y"], False),
        ({"a": "x"}, {"a": "y"}, False),
    ],
)
def test_matches_is_strict_where_the_readme_is(shown: Any, actual: Any, expected: bool) -> None:
    assert matches(shown, actual) is expected
