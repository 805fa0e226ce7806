"""Containers for tests: podman with scripts/image.sh's configuration, images built by that script,
and the service run the way deploy/kubernetes runs it.

podman is required under CI=true (a test fails when it is missing or cannot run a container);
elsewhere the tests skip with the reason. Images are built with `--engine podman` (the tests run
them with podman) and, unless ROTTENBOT_BASE says otherwise, on the base made from Debian
packages: cached in podman's storage, so only the first build on a machine makes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from tests.helpers import free_port
from tests.servers_storage import unavailable

REPO = Path(__file__).resolve().parents[1]
IMAGE_SCRIPT = REPO / "scripts" / "image.sh"
KUBERNETES_BASE = REPO / "deploy" / "kubernetes" / "base"
BUILD_TIMEOUT_S = 1800


def podman_env() -> dict[str, str]:
    """This process's environment plus scripts/image.sh's podman configuration."""
    result = subprocess.run(
        ["bash", str(IMAGE_SCRIPT), "--print-env"], capture_output=True, text=True, timeout=60,
        check=True,
    )
    env = dict(os.environ)
    for line in result.stdout.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = value
    return env


def require_podman() -> dict[str, str]:
    """The environment to run podman with; fails (CI) or skips with the reason it cannot run."""
    if shutil.which("podman") is None:
        # scripts/image.sh installs it with apt-get: try that once.
        attempt = subprocess.run(
            ["bash", "-c", f"source <(sed -n '/^as_root()/p;/^log()/p;/^install_podman()/,/^}}/p'"
                           f" {IMAGE_SCRIPT}) && install_podman"],
            capture_output=True, text=True, timeout=900,
        )
        if shutil.which("podman") is None:
            unavailable("podman is not installed and scripts/image.sh could not install it: "
                        + (attempt.stderr or attempt.stdout)[-500:])
    env = podman_env()
    probe = subprocess.run(["podman", "info", "--format", "json"], capture_output=True, text=True,
                           env=env, timeout=120)
    if probe.returncode != 0:
        unavailable(f"podman cannot run here: {probe.stderr.strip()[-800:]}")
    return env


def podman(env: dict[str, str], *args: str, timeout: float = 120,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, env=env,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} ... failed: {result.stderr[-2000:]}")
    return result


@dataclass
class Build:
    tag: str
    seconds: float
    log: str


def build_image(env: dict[str, str], target: str, tag: str, log_path: Path,
                model: Path | None = None) -> Build:
    """scripts/image.sh --target TARGET with podman; fails the test with the log's tail."""
    command = ["bash", str(IMAGE_SCRIPT), "--engine", "podman", "--target", target, "--tag", tag]
    if model is not None:
        command += ["--model", str(model)]
    build_env = {**env, "ROTTENBOT_BASE": os.environ.get("ROTTENBOT_BASE", "debian")}
    started = time.monotonic()
    with log_path.open("w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=build_env,
                                timeout=BUILD_TIMEOUT_S, cwd=REPO)
    text = log_path.read_text(errors="replace")
    if result.returncode != 0:
        raise AssertionError(f"image build failed ({result.returncode}):\n{text[-4000:]}")
    return Build(tag=tag, seconds=time.monotonic() - started, log=text)


# --- the Kubernetes pod spec, as podman flags --------------------------------------------------


@dataclass
class PodSpec:
    """What deploy/kubernetes/base says about running the container."""

    env: dict[str, str]
    user: str
    grace_s: int
    read_only: bool
    drop_all_caps: bool
    no_new_privileges: bool
    data_dir: str
    tmp_dir: str


def kubernetes_pod_spec() -> PodSpec:
    deployment = yaml.safe_load((KUBERNETES_BASE / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    env: dict[str, str] = {}
    for line in (KUBERNETES_BASE / "config.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    return PodSpec(
        env=env,
        user=f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}",
        grace_s=int(pod["terminationGracePeriodSeconds"]),
        read_only=bool(security["readOnlyRootFilesystem"]),
        drop_all_caps=security["capabilities"]["drop"] == ["ALL"],
        no_new_privileges=security["allowPrivilegeEscalation"] is False,
        data_dir=mounts["data"],
        tmp_dir=mounts["tmp"],
    )


ULIMITS = ("nofile=16384:16384", "nproc=16384:16384")  # a --ulimit replaces all defaults


@dataclass
class ServiceContainer:
    """The service image run like the Kubernetes pod: read-only root, uid 10001, no
    capabilities, no privilege escalation, DATA_DIR on a named volume, tmpfs /tmp, on the host
    network (the storage test servers listen on 127.0.0.1) at a free port."""

    env: dict[str, str]
    image: str
    volume: str
    spec: PodSpec = field(default_factory=kubernetes_pod_spec)
    name: str = field(default_factory=lambda: f"rottenbot-test-{uuid.uuid4().hex[:10]}")
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run_args(self, settings: dict[str, str]) -> list[str]:
        spec = self.spec
        args = ["run", "-d", "--name", self.name, "--network=host", "--user", spec.user,
                "-v", f"{self.volume}:{spec.data_dir}", "--tmpfs", spec.tmp_dir,
                "--stop-timeout", str(spec.grace_s)]
        if spec.read_only:
            args.append("--read-only")
        if spec.drop_all_caps:
            args.append("--cap-drop=ALL")
        if spec.no_new_privileges:
            args += ["--security-opt", "no-new-privileges"]
        for limit in ULIMITS:
            args += ["--ulimit", limit]
        env = {**spec.env, **settings, "HOST": "127.0.0.1", "PORT": str(self.port)}
        for name, value in env.items():
            args += ["-e", f"{name}={value}"]
        return [*args, self.image]

    def start(self, settings: dict[str, str]) -> float:
        """Starts the container; returns seconds from `podman run` to /health/ready 200."""
        podman(self.env, "rm", "-f", "--ignore", self.name)
        started = time.monotonic()
        podman(self.env, *self.run_args(settings))
        deadline = started + 300
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return time.monotonic() - started
            if self.state()["Status"] != "running":
                raise AssertionError(f"container exited: {self.logs()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"container not ready: {self.logs()[-3000:]}")

    def state(self) -> dict:
        out = podman(self.env, "inspect", "--format", "{{json .State}}", self.name).stdout
        return json.loads(out)

    def logs(self) -> str:
        result = podman(self.env, "logs", self.name, check=False)
        return result.stdout + result.stderr

    def exec(self, *command: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return podman(self.env, "exec", self.name, *command, check=check)

    def stop(self) -> int:
        """`podman stop` with the pod's grace period (SIGTERM, then SIGKILL): the exit code."""
        podman(self.env, "stop", "-t", str(self.spec.grace_s), self.name,
               timeout=self.spec.grace_s + 60)
        return int(self.state()["ExitCode"])

    def remove(self) -> None:
        podman(self.env, "rm", "-f", "--ignore", "-t", "0", self.name, check=False)


@contextlib.contextmanager
def volume(env: dict[str, str]) -> Iterator[str]:
    """A named podman volume, removed afterwards."""
    name = f"rottenbot-test-{uuid.uuid4().hex[:10]}"
    podman(env, "volume", "create", name)
    try:
        yield name
    finally:
        podman(env, "volume", "rm", "-f", name, check=False)


def image_size_mb(env: dict[str, str], tag: str) -> float:
    return int(podman(env, "image", "inspect", "--format", "{{.Size}}", tag).stdout) / 1e6
