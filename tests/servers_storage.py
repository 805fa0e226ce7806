"""Real storage servers for tests, on loopback: PostgreSQL (initdb/pg_ctl) and moto's S3 server.

If a server cannot be started, the test fails when CI=true and is skipped (with the reason)
otherwise. Outages are simulated for real: `PostgresServer.stop()/start()` (pg_ctl, same port
and data) and `MotoS3Server.pause()/resume()` (SIGSTOP/SIGCONT: moto keeps objects in memory,
so it is frozen rather than restarted; clients then time out as with a hung server).
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.helpers import auth, free_port, jpeg_bytes, random_photo, stop_process

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Fail loudly in CI, skip with the reason elsewhere."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: storage servers are required)", pytrace=False)
    pytest.skip(reason)


def _wait(condition: Callable[[], bool], timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise TimeoutError(message)


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def postgres_bin_dir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (password auth over TCP).

    initdb refuses to run as root, so as root the cluster belongs to the `postgres` user, in a
    temporary folder it owns (pytest's own tmp folders are private to root).
    """

    user = "admin"

    def __init__(self) -> None:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            unavailable("PostgreSQL binaries (initdb) not found; apt-get install postgresql")
        self.bin_dir = bin_dir
        self.run_as = "postgres" if os.geteuid() == 0 else None
        self.root = Path(tempfile.mkdtemp(prefix="rottenbot-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.socket_dir.mkdir()
        self.port = free_port()
        self.password = secrets.token_hex(12)
        if self.run_as:
            shutil.chown(self.root, self.run_as)
            shutil.chown(self.socket_dir, self.run_as)
        self.running = False

    def _cmd(self, *args: str) -> list[str]:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        return ["runuser", "-u", self.run_as, "--", *command] if self.run_as else command

    def init(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password)
        if self.run_as:
            shutil.chown(pwfile, self.run_as)
        subprocess.run(
            self._cmd(
                "initdb", "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}",
                "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync",
            ),
            check=True, capture_output=True, timeout=120,
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "fsync = off\nfull_page_writes = off\nsynchronous_commit = off\n"
                "max_connections = 100\nshared_buffers = 32MB\n"
            )

    def start(self, timeout_s: float = 60) -> None:
        subprocess.run(
            self._cmd("pg_ctl", "-D", str(self.data), "-l", str(self.root / "pg.log"), "-w",
                      "-t", str(int(timeout_s)), "start"),
            check=True, capture_output=True, timeout=timeout_s + 10,
        )
        _wait(lambda: _port_open(self.port), timeout_s, "PostgreSQL does not listen")
        self.running = True

    def stop(self, timeout_s: float = 60) -> None:
        """`pg_ctl stop -m fast`: clients get their connections closed, new ones are refused."""
        subprocess.run(
            self._cmd("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"),
            check=True, capture_output=True, timeout=timeout_s,
        )
        self.running = False
        _wait(lambda: not _port_open(self.port), timeout_s, "PostgreSQL still listens")

    def destroy(self) -> None:
        if self.running:
            with contextlib.suppress(Exception):
                self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres", driver: str = "postgresql+asyncpg") -> str:
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL through psql over the unix socket; returns unaligned tuples-only output."""
        result = subprocess.run(
            self._cmd("psql", "-h", str(self.socket_dir), "-p", str(self.port), "-U", self.user,
                      "-d", database, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql),
            check=True, capture_output=True, text=True, timeout=60,
        )
        return result.stdout.strip()

    def has_table(self, table: str, database: str) -> bool:
        """Whether `table` exists yet (a service migrates in the background after it starts)."""
        return self.psql(f"SELECT to_regclass('{table}') IS NOT NULL", database) == "t"

    def create_database(self, prefix: str = "t") -> str:
        name = f"{prefix}_{secrets.token_hex(6)}"
        self.psql(f'CREATE DATABASE "{name}"')
        return name


def start_postgres() -> PostgresServer:
    server = PostgresServer()
    try:
        server.init()
        server.start()
    except (OSError, subprocess.SubprocessError, TimeoutError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        server.destroy()
        unavailable(f"PostgreSQL could not be started: {exc} {detail[-500:]!r}")
    return server


class MotoS3Server:
    """moto's standalone server (`python -m moto.server`) on a free loopback port."""

    access_key = "rottenbot-test"
    secret_key = "rottenbot-test-secret"

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
            )

        def up() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{self.url}/", timeout=5).status_code < 500
            return False

        _wait(up, timeout_s, "moto server did not start")

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers (a hung server)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        if self.process is None:
            return
        if self.paused:
            self.resume()
        stop_process(self.process, 10)
        self.process = None

    def client(self):  # -> botocore S3 client, for the tests' own checks
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2},
                          connect_timeout=5, read_timeout=10),
        )

    def env(self, bucket: str) -> dict[str, str]:
        """The service's environment (the original deployment's names) for this server."""
        return {
            "LOCAL_S3_PROXY_SERVICE_URL": self.url,
            "MINIO_ROOT_USER": self.access_key,
            "MINIO_ROOT_PASSWORD": self.secret_key,
            "S3_BUCKET": bucket,
        }


class RcloneS3Server(MotoS3Server):
    """rclone's S3 server (`rclone serve s3`, Go, a folder behind it) on a free loopback port.

    The benchmarks' S3 stand-in: it costs about what MinIO (also Go) costs per upload, a third
    of moto's CPU, so the serving machine's figures are not a Python mock's. Tests use moto.
    """

    def __init__(self, log_path: Path) -> None:
        super().__init__(log_path)
        self.root = log_path.parent / f"rclone-s3-{self.port}"

    def start(self, timeout_s: float = 60) -> None:
        binary = shutil.which("rclone", path=str(Path(sys.executable).parent)) or "rclone"
        self.root.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [binary, "serve", "s3", "--addr", f"127.0.0.1:{self.port}", "--auth-key",
                 f"{self.access_key},{self.secret_key}", "--force-path-style=true",
                 str(self.root)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        _wait(lambda: self._up(), timeout_s, "rclone S3 server did not start")

    def _up(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"rclone exited with {self.process.returncode}")
        return _port_open(self.port)


def start_s3(log_path: Path, kind: str = "moto") -> MotoS3Server:
    """An S3 stand-in: "moto" (the tests') or "rclone" (the benchmarks')."""
    if kind == "moto":
        return start_moto(log_path)
    server = RcloneS3Server(log_path)
    server.start()
    return server


def start_moto(log_path: Path) -> MotoS3Server:
    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        unavailable(f"moto[server] is not installed: {exc}")
    server = MotoS3Server(log_path)
    try:
        server.start()
    except (OSError, RuntimeError, TimeoutError) as exc:
        server.stop()
        unavailable(f"moto S3 server could not be started: {exc}")
    return server


# Module-scoped fixtures: importing `postgres_fixture` / `moto_s3_fixture` into a test module
# registers `postgres` / `moto_s3` there (see test_persistence.py).


@pytest.fixture(scope="module", name="postgres")
def postgres_fixture() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster per test module (tests create their own databases on it)."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="module", name="moto_s3")
def moto_s3_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3Server]:
    """One moto S3 server per test module (tests use their own buckets on it)."""
    server = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        server.stop()


def storage_overrides(
    postgres: PostgresServer, database: str, moto_s3: MotoS3Server, bucket: str, **extra: object
) -> dict[str, object]:
    """Settings of a service using these servers. Timeouts are short enough for outages to show
    within seconds, long enough for a loaded 2-core machine (the request path's S3 calls for
    image/delete use them too)."""
    return {
        "database_url": postgres.url(database),
        "local_s3_proxy_service_url": moto_s3.url,
        "minio_root_user": moto_s3.access_key,
        "minio_root_password": moto_s3.secret_key,
        "s3_bucket": bucket,
        "s3_timeout_s": 3.0,
        "s3_max_attempts": 2,
        "database_timeout_s": 5.0,
        "outbox_retry_base_s": 0.1,
        "outbox_retry_max_s": 1.0,
        "outbox_shutdown_grace_s": 1.0,
        **extra,
    }


def outbox_rows(data_dir: Path) -> int:
    """Saves still in a service's durable outbox (every slot file under DATA_DIR/outbox)."""
    total = 0
    for path in (data_dir / "outbox").glob("outbox-*.sqlite3"):
        conn = sqlite3.connect(path)
        try:
            total += conn.execute("SELECT count(*) FROM items").fetchone()[0]
        finally:
            conn.close()
    return total


# --- saving through the API, polling ------------------------------------------------------

PREDICT = "/api/v1/inference/predict"
PREDICTIONS = "/api/v1/inference/predictions"
T = TypeVar("T")


def poll(condition: Callable[[], T], timeout_s: float = 90, message: str = "timed out") -> T:
    """Wait until `condition()` is truthy (a wait with a generous deadline, not a timing check)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} (after {timeout_s} s)")
        time.sleep(0.1)


def save(
    client: Any, user: uuid.UUID, seed: int = 0, image: bytes | None = None,
    content_type: str = "image/jpeg", filename: str = "../../etc/passwd.jpg",
) -> httpx.Response:
    """POST a prediction with save_prediction=True (the frontend's Python-style boolean)."""
    data = image if image is not None else jpeg_bytes(random_photo(seed=seed))
    return client.post(
        f"{PREDICT}?save_prediction=True&user_uid={user}",
        files={"file": (filename, data, content_type)},
        headers=auth(user),
    )


def history(client: Any, user: uuid.UUID, **params: object) -> list[dict[str, Any]]:
    """Every page of the user's history, following next_cursor."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = client.get(PREDICTIONS, params=query, headers=auth(user))
        assert response.status_code == 200, response.text
        body = response.json()
        items.extend(body["items"])
        cursor = body.get("next_cursor")
        if not cursor:
            return items


# Solid colours the tiny test model tells apart (several classes for the filter tests).
COLOURS = ((0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 255, 0), (255, 255, 0))


def solid_jpeg(colour: tuple[int, int, int], height: int = 120, width: int = 160) -> bytes:
    import numpy as np

    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:] = colour
    return jpeg_bytes(pixels)


class ServiceProcess:
    """`python -m rottenbot_inference serve` on a free loopback port, with its Popen handle
    (tests.helpers.running_server hides it) so a test can `kill -9` it and start it again."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.base_url = ""

    def start(self, timeout_s: float = 300, port: int | None = None) -> str:
        from tests.helpers import wait_ready

        port = port or free_port()
        env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), **self.env}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rottenbot_inference", "serve"],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        self.base_url = f"http://127.0.0.1:{port}"
        wait_ready(self.base_url, timeout_s=timeout_s, process=self.process)
        return self.base_url

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, nothing is flushed."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.process = None

    def stop(self, timeout_s: float = 60) -> None:
        if self.process is None:
            return
        stop_process(self.process, timeout_s)
        self.process = None

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""


@pytest.fixture(name="database")
def database_fixture(postgres: PostgresServer) -> str:
    """A fresh, empty database on the module's server (restarted if a test left it down)."""
    if not postgres.running:
        postgres.start()
    return postgres.create_database()


@pytest.fixture(name="bucket")
def bucket_fixture(moto_s3: MotoS3Server) -> str:
    """A fresh bucket name on the module's S3 server (resumed if a test left it paused)."""
    if moto_s3.paused:
        moto_s3.resume()
    return f"images-{uuid.uuid4().hex[:12]}"


def prediction_rows(
    postgres: PostgresServer, database: str, columns: str = "uid, image_path",
    where: str = "true", order_by: str = "uid",
) -> list[list[str]]:
    """Rows of the predictions table, duplicates included ([] before the service migrated)."""
    if not postgres.has_table("predictions", database):
        return []
    out = postgres.psql(
        f"SELECT {columns} FROM predictions WHERE {where} ORDER BY {order_by}", database
    )
    return [line.split("|") for line in out.splitlines() if line]


def bucket_objects(moto_s3: MotoS3Server, bucket: str) -> dict[str, int]:
    """Key -> size of every object in the bucket ({} if it does not exist yet)."""
    client = moto_s3.client()
    with contextlib.suppress(client.exceptions.NoSuchBucket):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {item["Key"]: item["Size"] for page in pages for item in page.get("Contents", [])}
    return {}
