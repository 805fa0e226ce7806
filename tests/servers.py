"""Real servers for tests, on loopback: `redis-server` (password-protected, no persistence).

Use the `redis_server` fixture by importing it into a test module:

    from tests.servers import redis_server_fixture  # noqa: F401  (registers `redis_server`)

or `RedisServer` directly for a server a test stops and restarts itself.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port, in_ci, stop_process

REDIS_BINARY = "redis-server"


def require_redis_server() -> str:
    """The redis-server binary; without it the test fails in CI and is skipped elsewhere."""
    binary = shutil.which(REDIS_BINARY)
    if binary is None:
        reason = "redis-server is not installed (apt-get install -y redis-server)"
        if in_ci():
            pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
        pytest.skip(reason)
    return binary


class RedisServer:
    """A `redis-server` process on 127.0.0.1 with a password; stop/start keep the port."""

    def __init__(self, folder: Path, port: int | None = None, password: str | None = None):
        self.binary = require_redis_server()
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password or secrets.token_hex(16)
        self.host = "127.0.0.1"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = folder / "redis.log"

    @property
    def env(self) -> dict[str, str]:
        """The service's settings for this server."""
        return {
            "REDIS_HOST": self.host,
            "REDIS_PORT": str(self.port),
            "REDIS_PASSWORD": self.password,
        }

    @property
    def settings(self) -> dict[str, object]:
        return {"redis_host": self.host, "redis_port": self.port, "redis_password": self.password}

    def start(self, timeout_s: float = 20.0) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        command = [
            self.binary,
            "--bind", self.host,
            "--port", str(self.port),
            "--requirepass", self.password,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.folder),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait(lambda: self.ping(), timeout_s, "redis-server did not start")

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the server and wait until the port refuses connections."""
        if self.process is None:
            return
        self.resume()  # a paused server would not act on SIGTERM
        stop_process(self.process, timeout_s)
        self.process = None
        self._wait(lambda: not self.ping(), timeout_s, "redis-server still answers")

    def pause(self) -> None:
        """SIGSTOP: a hung Redis. The kernel still accepts connections on the port (its listen
        backlog) and takes in requests, but nothing answers until `resume`."""
        assert self.process is not None and self.process.poll() is None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: the paused server answers again, what was sent meanwhile included."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def client(self):  # -> redis.Redis
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return redis.Redis(
            host=self.host, port=self.port, password=self.password, db=0,
            socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0),
        )

    def ping(self) -> bool:
        import redis

        with (
            contextlib.suppress(redis.RedisError, OSError),
            contextlib.closing(self.client()) as client,
        ):
            return bool(client.ping())
        return False

    def revoke(self, jti: str, ttl_s: int = 3600) -> None:
        """Exactly what the RottenBot auth service does at logout."""
        with contextlib.closing(self.client()) as client:
            client.set(jti, "", ex=ttl_s)

    @staticmethod
    def _wait(condition, timeout_s: float, message: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.05)
        raise TimeoutError(message)


@contextlib.contextmanager
def running_redis(folder: Path, **kwargs: object) -> Iterator[RedisServer]:
    server = RedisServer(folder, **kwargs)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh password-protected redis-server on a free loopback port (skips if absent)."""
    with running_redis(tmp_path / "redis") as server:
        yield server
