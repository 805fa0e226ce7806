"""deploy/docker-compose.yaml brought up for real with podman-compose and the stand-in override
(deploy/docker-compose.standins.yaml: PostgreSQL, Redis, an S3 server, an OTLP receiver and
Prometheus built from Debian/PyPI packages; no Grafana, no MLflow - docs/containers.md).

Checks, in order on one stack: every service with a health check turns healthy (podman here has
no timer to run them: the test runs each one); migrations ran exactly once; a saved prediction
lands as a row in PostgreSQL and an object in the bucket; traces reach the OTLP receiver;
Prometheus scrapes /metrics and every query of deploy/grafana/inference-dashboard.json evaluates
and returns data after some traffic (including a save while the S3 stand-in is paused and a
request refused with 503 while Redis is paused); restarting the inference container under a
stream of saves loses no acknowledged save; `down -v` leaves no container, network or volume.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

from rottenbot_inference.storage.db import VERSION_TABLE
from tests.containers import REPO, build_image, podman, require_podman
from tests.deploy_files import venv_tool
from tests.helpers import TEST_SECRET, auth, free_port, jpeg_bytes, random_photo
from tests.servers_storage import PREDICT, poll

DEPLOY = REPO / "deploy"
FILES = (DEPLOY / "docker-compose.yaml", DEPLOY / "docker-compose.standins.yaml")
DASHBOARD = DEPLOY / "grafana" / "inference-dashboard.json"
EXAMPLES = sorted((REPO / "examples").glob("*.jpg"))
UP_TIMEOUT_S = 600  # `up -d` can hang when a container fails to start (podman-compose)
HEALTHY = ("postgres", "redis", "minio", "inference")
MIGRATIONS = sorted((REPO / "src/rottenbot_inference/storage/migrations/versions").glob("0*.py"))


@dataclass
class Stack:
    env: dict[str, str]
    project: str
    env_file: Path
    api: str
    compose: Path

    def compose_run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        command = [str(self.compose), "-p", self.project, "--env-file", str(self.env_file)]
        for path in FILES:
            command += ["-f", str(path)]
        return subprocess.run([*command, *args], capture_output=True, text=True, env=self.env,
                              timeout=timeout, cwd=REPO)

    def container(self, service: str) -> str:
        out = podman(self.env, "ps", "-a", "--format", "{{.Names}}",
                     "--filter", f"label=io.podman.compose.project={self.project}",
                     "--filter", f"label=com.docker.compose.service={service}").stdout.split()
        assert len(out) == 1, f"{service}: containers {out}"
        return out[0]

    def psql(self, sql: str) -> list[str]:
        result = podman(self.env, "exec", self.container("postgres"), "psql", "-U", "admin",
                        "-d", "db", "-At", "-c", sql)
        return [line for line in result.stdout.splitlines() if line]

    def bucket_keys(self) -> list[str]:
        script = ("import boto3, json; s3 = boto3.client('s3', endpoint_url="
                  "'http://127.0.0.1:9000', region_name='us-east-1', aws_access_key_id='x', "
                  "aws_secret_access_key='y'); print(json.dumps([o['Key'] for o in "
                  "s3.list_objects_v2(Bucket='images').get('Contents', [])]))")
        out = podman(self.env, "exec", self.container("minio"), "python", "-c", script).stdout
        return json.loads(out.strip().splitlines()[-1])

    def stored_images(self, uids: list[str]) -> set[str]:
        """The uids among `uids` whose row's image_path is an object in the bucket."""
        keys = set(self.bucket_keys())
        rows = self.psql("SELECT uid, image_path FROM predictions WHERE uid IN ("
                         + ", ".join(f"'{uid}'" for uid in uids) + ")")
        found = set()
        for row in rows:
            uid, _, path = row.partition("|")
            if any(path == key or path.endswith("/" + key) for key in keys):
                found.add(uid)
        return found

    def prometheus(self, path: str, **params: str) -> dict:
        """GET Prometheus's HTTP API from inside its container (its port is not published)."""
        url = f"http://127.0.0.1:9090{path}?{urlencode(params)}"
        script = ("import sys, urllib.request, urllib.error\ntry:\n    print(urllib.request"
                  ".urlopen(sys.argv[1], timeout=10).read().decode())\nexcept urllib.error."
                  "HTTPError as exc:\n    print(exc.read().decode())")
        out = podman(self.env, "exec", self.container("prometheus"), "python3", "-c", script,
                     url).stdout
        return json.loads(out)

    def healthy(self, service: str) -> bool:
        result = podman(self.env, "healthcheck", "run", self.container(service), check=False)
        return result.returncode == 0


def _leftovers(env: dict[str, str], project: str) -> dict[str, list[str]]:
    label = f"label=io.podman.compose.project={project}"
    containers = podman(env, "ps", "-a", "--filter", label, "--format", "{{.Names}}").stdout
    networks = podman(env, "network", "ls", "--format", "{{.Name}}").stdout
    volumes = podman(env, "volume", "ls", "--format", "{{.Name}}").stdout
    return {
        "containers": containers.split(),
        "networks": [n for n in networks.split() if n.startswith(project)],
        "volumes": [v for v in volumes.split() if v.startswith(project)],
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = require_podman()
    compose = venv_tool("podman-compose")
    folder = tmp_path_factory.mktemp("compose")
    build_image(env, "runtime", "rottenbot-inference:local", folder / "build.log")
    standins = subprocess.run(["bash", str(REPO / "scripts" / "image.sh"), "--standins"],
                              capture_output=True, text=True, env=env, timeout=1800, cwd=REPO)
    assert standins.returncode == 0, (standins.stdout + standins.stderr)[-4000:]
    api_port = free_port()
    env_file = folder / ".env"
    env_file.write_text("\n".join([
        f"JWT_SECRET={TEST_SECRET}",
        f"REDIS_PASSWORD={secrets.token_hex(12)}",
        f"POSTGRES_PASSWORD={secrets.token_hex(12)}",
        f"MINIO_ROOT_PASSWORD={secrets.token_hex(12)}",
        f"GRAFANA_ADMIN_PASSWORD={secrets.token_hex(12)}",
        f"INFERENCE_PORT={api_port}",
        "",
    ]))
    built = Stack(env=env, project=f"rbtest{uuid.uuid4().hex[:8]}", env_file=env_file,
                  api=f"http://127.0.0.1:{api_port}", compose=compose)
    try:
        up = built.compose_run("up", "-d", timeout=UP_TIMEOUT_S)
        assert up.returncode == 0, (up.stdout + up.stderr)[-4000:]
        yield built
    finally:
        if any(_leftovers(env, built.project).values()):
            built.compose_run("down", "-v", "-t", "5", timeout=300)


def test_every_service_turns_healthy_and_the_bucket_job_succeeds(stack: Stack) -> None:
    for service in HEALTHY:
        poll(lambda service=service: stack.healthy(service), timeout_s=300,
             message=f"{service} never healthy")
    state = json.loads(podman(stack.env, "inspect", "--format", "{{json .State}}",
                              stack.container("minio-init")).stdout)
    assert state["Status"] == "exited" and state["ExitCode"] == 0
    assert httpx.get(f"{stack.api}/health/ready", timeout=5).status_code == 200


def _upgrades(stack: Stack) -> int:
    """Alembic upgrade steps the inference container logged, over all its starts."""
    result = podman(stack.env, "logs", stack.container("inference"))
    logs = result.stdout + result.stderr  # the service logs to stderr
    return len(re.findall(r'"logger":"alembic[.]runtime[.]migration","message":"Running upgrade',
                          logs))


def test_migrations_ran_exactly_once(stack: Stack) -> None:
    poll(lambda: stack.psql("SELECT to_regclass('predictions') IS NOT NULL") == ["t"],
         message="predictions table never created")
    assert len(stack.psql(f"SELECT version_num FROM {VERSION_TABLE}")) == 1
    assert _upgrades(stack) == len(MIGRATIONS)  # each migration once


def _save(client: httpx.Client, seed: int) -> str | None:
    """One saved prediction; its uid when acknowledged (200), else None."""
    user = uuid.uuid4()
    with contextlib.suppress(httpx.HTTPError):
        response = client.post(
            f"{PREDICT}?save_prediction=true&user_uid={user}", headers=auth(user),
            files={"file": ("photo.jpg", jpeg_bytes(random_photo(seed=seed)), "image/jpeg")},
        )
        if response.status_code == 200:
            return response.json()["prediction_uid"]
    return None


def test_a_saved_prediction_lands_in_postgresql_and_the_bucket(stack: Stack) -> None:
    with httpx.Client(base_url=stack.api, timeout=30) as client:
        uid = _save(client, seed=1)
    assert uid is not None
    poll(lambda: stack.psql(f"SELECT count(*) FROM predictions WHERE uid = '{uid}'") == ["1"],
         message="row not in PostgreSQL")
    poll(lambda: stack.stored_images([uid]) == {uid}, message="image not in the bucket")


def test_traces_reach_the_otlp_receiver(stack: Stack) -> None:
    def status() -> dict:
        out = podman(stack.env, "exec", stack.container("otel-collector"), "python", "-c",
                     "import urllib.request as r; print(r.urlopen('http://127.0.0.1:13133/')"
                     ".read().decode())").stdout
        return json.loads(out.strip().splitlines()[-1])

    poll(lambda: status()["spans"] > 0, message="no span reached the OTLP receiver")
    assert status()["services"], "spans without a service.name"


def _outbox_failures(stack: Stack) -> float:
    text = httpx.get(f"{stack.api}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("inference_outbox_failures_total"))


def _traffic(stack: Stack) -> None:
    """Predictions, saves, client errors, a save while S3 hangs (the outbox failure panel) and
    requests while Redis hangs (fail closed: 503, the rejection and 5xx panels)."""
    minio = stack.container("minio")
    podman(stack.env, "pause", minio)
    try:
        with httpx.Client(base_url=stack.api, timeout=30) as client:
            assert _save(client, seed=99) is not None  # acknowledged: it waits in the outbox
        poll(lambda: _outbox_failures(stack) > 0, timeout_s=120,
             message="no outbox failure counted while S3 hung")
    finally:
        podman(stack.env, "unpause", minio)
    with httpx.Client(base_url=stack.api, timeout=30) as client:
        redis = stack.container("redis")
        podman(stack.env, "pause", redis)
        try:
            refused = _predict(client, EXAMPLES[0])
            assert refused.status_code == 503, refused.text  # revocations unknown: fail closed
        finally:
            podman(stack.env, "unpause", redis)
        poll(lambda: _predict(client, EXAMPLES[0]).status_code == 200, timeout_s=60,
             message="no recovery after Redis came back")
        for path in EXAMPLES:
            response = _predict(client, path)
            assert response.status_code == 200, response.text
        for seed in range(3):
            assert _save(client, seed=100 + seed) is not None
        assert client.post(PREDICT, files={"file": ("x.jpg", b"x", "image/jpeg")}).status_code \
            == 401
        bad = client.post(PREDICT, headers=auth(), files={"file": ("x.jpg", b"no", "image/jpeg")})
        assert 400 <= bad.status_code < 500


def _predict(client: httpx.Client, path: Path) -> httpx.Response:
    return client.post(PREDICT, headers=auth(),
                       files={"file": (path.name, path.read_bytes(), "image/jpeg")})


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(dashboard.get("panels", []))
    for panel in list(panels):
        panels.extend(panel.get("panels", []))
    exprs = [t["expr"] for p in panels for t in p.get("targets", []) if t.get("expr")]
    return [e.replace("$__rate_interval", "1m").replace("$__range", "10m")
            .replace("${service}", ".+").replace("$service", ".+") for e in exprs]


def test_prometheus_scrapes_and_every_dashboard_query_returns_data(stack: Stack) -> None:
    queries = _dashboard_queries()
    assert len(queries) > 20
    _traffic(stack)

    def query(expr: str) -> dict:
        body = stack.prometheus("/api/v1/query", query=expr)
        assert body["status"] == "success", (expr, body)
        return body

    def targets_up() -> bool:
        active = stack.prometheus("/api/v1/targets")["data"]["activeTargets"]
        return any(t["labels"]["job"] == "inference_service" and t["health"] == "up"
                   for t in active)

    poll(targets_up, timeout_s=120, message="Prometheus never scraped the inference service")
    for expr in queries:
        query(expr)  # every query parses and evaluates
    deadline = time.monotonic() + 150
    # The challenger's panels have data only with CHALLENGER_URI (tests/test_challenger.py).
    empty = [expr for expr in queries if "inference_shadow_" not in expr
             and "inference_challenger_" not in expr]
    while empty and time.monotonic() < deadline:
        empty = [expr for expr in empty if not query(expr)["data"]["result"]]
        if empty:
            time.sleep(5)
    assert not empty, f"queries with no data after traffic: {empty}"


def test_restarting_the_inference_container_under_saves_loses_none(stack: Stack) -> None:
    acknowledged: list[str] = []
    stop = threading.Event()

    def stream() -> None:
        with httpx.Client(base_url=stack.api, timeout=30) as client:
            seed = 1000
            while not stop.is_set():
                uid = _save(client, seed)
                if uid:
                    acknowledged.append(uid)
                seed += 1
                time.sleep(0.1)

    writer = threading.Thread(target=stream)
    writer.start()
    try:
        poll(lambda: len(acknowledged) >= 5, message="no saves before the restart")
        podman(stack.env, "restart", "-t", "45", stack.container("inference"), timeout=120)
        before = len(acknowledged)
        poll(lambda: len(acknowledged) >= before + 5, timeout_s=180,
             message="no saves after the restart")
    finally:
        stop.set()
        writer.join(60)

    def missing() -> set[str]:
        rows = set(stack.psql("SELECT uid FROM predictions"))
        return set(acknowledged) - rows

    poll(lambda: not missing(), timeout_s=120, message="acknowledged saves lost")
    assert _upgrades(stack) == len(MIGRATIONS)  # the restart found the schema at head
    poll(lambda: stack.stored_images(acknowledged) == set(acknowledged),
         message="acknowledged images not in the bucket")


def test_down_leaves_no_container_network_or_volume(stack: Stack) -> None:
    assert _leftovers(stack.env, stack.project)["volumes"], "the stack made no volume?"
    down = stack.compose_run("down", "-v", "-t", "45")
    assert down.returncode == 0, (down.stdout + down.stderr)[-3000:]
    assert _leftovers(stack.env, stack.project) == {"containers": [], "networks": [],
                                                    "volumes": []}
