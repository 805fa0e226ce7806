"""Graceful shutdown: SIGTERM drains the service (readiness 503, new requests 503, in-flight
requests and queued saves finish), a repeated signal hurries, nothing acknowledged is lost.

The process tests run `python -m rottenbot_inference serve` directly (no shell in between, so
the signal reaches the service) against real PostgreSQL and moto S3 servers on loopback.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import httpx
from fastapi.testclient import TestClient

from rottenbot_inference.api.deps import ready_state
from rottenbot_inference.api.draining import SHUTTING_DOWN
from rottenbot_inference.api.state import Phase
from rottenbot_inference.shutdown import GracefulShutdown, begin_draining
from tests.helpers import auth, jpeg_bytes, process_env, random_photo
from tests.servers_storage import (
    PREDICT,
    MotoS3Server,
    PostgresServer,
    ServiceProcess,
    bucket_fixture,  # noqa: F401  (registers the `bucket` fixture)
    bucket_objects,
    database_fixture,  # noqa: F401  (registers the `database` fixture)
    moto_s3_fixture,  # noqa: F401  (registers the module-scoped `moto_s3` fixture)
    outbox_rows,
    poll,
    postgres_fixture,  # noqa: F401  (registers the module-scoped `postgres` fixture)
    prediction_rows,
)

PHOTO = jpeg_bytes(random_photo(240, 320, seed=5))


# --- in process ---------------------------------------------------------------------------


def test_draining_refuses_new_api_requests_keeps_probes_and_admitted_requests(
    client: TestClient,
) -> None:
    state = client.app.state.rottenbot  # type: ignore[attr-defined]
    assert client.get("/health/ready").status_code == 200
    assert begin_draining(state, "SIGTERM") is True
    assert begin_draining(state, "SIGTERM") is False  # once

    ready = client.get("/health/ready")
    assert ready.status_code == 503
    assert ready.json()["status"] == "draining" and "SIGTERM" in ready.json()["detail"]
    assert ready.headers["connection"] == "close"  # every answer while draining
    live = client.get("/health/live")
    assert live.status_code == 200 and live.headers["connection"] == "close"
    assert client.get("/metrics").status_code == 200

    refused = client.post(
        f"{PREDICT}?save_prediction=True",
        files={"file": ("a.jpg", PHOTO, "image/jpeg")},
        headers=auth(),
    )
    assert refused.status_code == 503, refused.text
    assert refused.json() == {"detail": SHUTTING_DOWN}
    assert refused.headers["retry-after"] == str(state.settings.retry_after_s)
    assert refused.headers["connection"] == "close"
    assert client.get("/api/v1/inference/model", headers=auth()).status_code == 503
    assert client.get("/api/v1/inference/predictions", headers=auth()).status_code == 503
    # A request admitted before the signal is past the gate: the model is still there for it.
    assert asyncio.run(ready_state(state)) is state and state.service.bundle is not None


class _FakeStore:
    def __init__(self) -> None:
        self.hurried = 0

    def hurry(self) -> None:
        self.hurried += 1


def test_signal_chain_drains_first_passes_on_after_the_delay_and_hurries_on_a_repeat() -> None:
    """Real signals to this process, with a recording handler standing in for uvicorn's."""
    state = SimpleNamespace(phase=Phase.READY, detail=None, predictions=_FakeStore())
    passed_on: list[tuple[int, Phase]] = []

    def server_handler(signum: int, _frame: object) -> None:
        passed_on.append((signum, state.phase))

    async def until(condition: Callable[[], bool]) -> None:
        for _ in range(3000):  # a generous wait (30 s), not a timing check
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the handler did not react")

    async def scenario(shutdown: GracefulShutdown) -> None:
        undo = shutdown.install()
        try:
            assert signal.getsignal(signal.SIGTERM) is not server_handler  # ours, via the loop
            os.kill(os.getpid(), signal.SIGTERM)
            await until(lambda: state.phase is Phase.DRAINING)
            assert passed_on == []  # the server is told only after the delay
            await until(lambda: bool(passed_on))
            assert passed_on == [(signal.SIGTERM, Phase.DRAINING)]

            os.kill(os.getpid(), signal.SIGINT)  # another signal: not a repeat
            await asyncio.sleep(0.2)
            assert shutdown.repeats == 0 and state.predictions.hurried == 0

            os.kill(os.getpid(), signal.SIGTERM)  # the same again: hurry
            await until(lambda: state.predictions.hurried == 1)
            assert passed_on == [(signal.SIGTERM, Phase.DRAINING)]  # passed on once only
        finally:
            undo()
        assert signal.getsignal(signal.SIGTERM) is server_handler

    originals = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in originals:
        signal.signal(sig, server_handler)
    try:
        asyncio.run(scenario(GracefulShutdown(state, delay_s=0.5)))  # type: ignore[arg-type]
    finally:
        for sig, handler in originals.items():
            signal.signal(sig, handler)
    assert [s for s, _ in passed_on] == [signal.SIGTERM]


# --- a real service process -----------------------------------------------------------------


def service_env(
    model: Path, shared_cache: Path, data_dir: Path, postgres: PostgresServer,
    database: str, moto_s3: MotoS3Server, bucket: str, **extra: str,
) -> dict[str, str]:
    return {
        **process_env(model, shared_cache, data_dir),
        "MAX_BATCH_SIZE": "4",
        "DATABASE_URL": postgres.url(database),
        **moto_s3.env(bucket),
        "S3_TIMEOUT_S": "3",
        "S3_MAX_ATTEMPTS": "1",
        "OUTBOX_RETRY_BASE_S": "0.1",
        "OUTBOX_RETRY_MAX_S": "1",
        "LOG_FORMAT": "json",
        "ACCESS_LOG": "true",
        **extra,
    }


def exit_code(service: ServiceProcess, timeout_s: float = 120) -> int:
    assert service.process is not None
    code = service.process.wait(timeout=timeout_s)
    service.process = None
    return code


def access_log_statuses(log_path: Path, path: str) -> Counter[int]:
    """Statuses the service itself logged for `path` (one JSON access-log line per answer)."""
    counts: Counter[int] = Counter()
    for line in log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("logger") == "rottenbot_inference.access" and entry.get("path") == path:
                counts[int(entry["status"])] += 1
    return counts


def log_count(service: ServiceProcess, text: str) -> int:
    return service.log_path.read_text(errors="replace").count(text)


def post_save(base_url: str, user: uuid.UUID, seed: int) -> str:
    response = httpx.post(
        f"{base_url}{PREDICT}?save_prediction=True",
        files={"file": ("a.jpg", jpeg_bytes(random_photo(120, 160, seed=seed)), "image/jpeg")},
        headers=auth(user), timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.json()["prediction_uid"]


@dataclass
class Outcomes:
    """What the clients saw, request by request."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: Counter[int] = field(default_factory=Counter)
    saved: list[str] = field(default_factory=list)  # prediction_uid of every 200 with a save
    refused: int = 0  # connection refused: the listener was closed
    unanswered: list[str] = field(default_factory=list)  # connected, then no response at all
    problems: list[str] = field(default_factory=list)

    def add(self, response: httpx.Response, save: bool) -> None:
        with self.lock:
            self.statuses[response.status_code] += 1
            if response.status_code == 200:
                if save:
                    self.saved.append(response.json()["prediction_uid"])
            elif response.status_code == 503:
                if "retry-after" not in response.headers:
                    self.problems.append(f"503 without Retry-After: {response.text}")
            else:
                self.problems.append(f"{response.status_code}: {response.text[:200]}")


def stream_requests(base_url: str, outcomes: Outcomes, seed: int, stop: threading.Event) -> None:
    """A steady client: one request after another (keep-alive), every other one saved, until
    the listener refuses it twice."""
    user = uuid.uuid4()
    headers = auth(user)
    refusals = 0
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for n in range(100_000):
            if stop.is_set() or refusals >= 2:
                return
            save = n % 2 == 0
            photo = jpeg_bytes(random_photo(120, 160, seed=seed * 1000 + n))
            try:
                response = client.post(
                    f"{PREDICT}?save_prediction={save}",
                    files={"file": ("a.jpg", photo, "image/jpeg")}, headers=headers,
                )
            except httpx.ConnectError:
                refusals += 1
                with outcomes.lock:
                    outcomes.refused += 1
                time.sleep(0.05)
                continue
            except httpx.TransportError as exc:
                with outcomes.lock:
                    outcomes.unanswered.append(repr(exc))
                continue
            outcomes.add(response, save)


def watch_readiness(base_url: str, seen: list[str], closed: threading.Event) -> None:
    """Poll /health/ready (a new connection each time) until the listener refuses."""
    while True:
        try:
            response = httpx.get(f"{base_url}/health/ready", timeout=30)
        except httpx.ConnectError:
            seen.append("refused")
            closed.set()
            return
        except httpx.TransportError:
            seen.append("unanswered")
            continue
        seen.append(str(response.status_code) if response.status_code == 200
                    else f"{response.status_code} {response.json().get('status')}")
        time.sleep(0.02)


def in_flight_posts(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    match = re.search(r'^inference_api_requests_in_flight\{method="POST"[^}]*\} (\S+)$', text,
                      re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@contextlib.contextmanager
def slow_upload(base_url: str, release: threading.Event) -> Iterator[concurrent.futures.Future]:
    """A save whose body stops half-way until `release` is set: in flight across the signal."""
    boundary = "rottenbot-slow-upload"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="slow.jpg"'
        "\r\nContent-Type: image/jpeg\r\n\r\n"
    ).encode() + PHOTO + f"\r\n--{boundary}--\r\n".encode()
    half = len(body) // 2

    def chunks() -> Iterator[bytes]:
        yield body[:half]
        release.wait(120)
        yield body[half:]

    def send() -> httpx.Response:
        return httpx.post(
            f"{base_url}{PREDICT}?save_prediction=True",
            content=chunks(),
            headers={
                **auth(),
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Content-Length": str(len(body)),
            },
            timeout=120,
        )

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            yield pool.submit(send)
        finally:
            release.set()


def test_sigterm_in_a_steady_stream_loses_no_accepted_request(
    converted_tiny_model: Path, shared_cache: Path, tmp_path: Path, postgres: PostgresServer,
    database: str, moto_s3: MotoS3Server, bucket: str,
) -> None:
    data_dir = tmp_path / "data"
    env = service_env(
        converted_tiny_model, shared_cache, data_dir, postgres, database, moto_s3, bucket,
        SHUTDOWN_DELAY_S="1.5", OUTBOX_SHUTDOWN_GRACE_S="60",
    )
    service = ServiceProcess(env, tmp_path / "service.log")
    outcomes = Outcomes()
    readiness: list[str] = []
    closed, stop, release = threading.Event(), threading.Event(), threading.Event()
    try:
        base_url = service.start()
        post_save(base_url, uuid.uuid4(), seed=0)  # warm: first connection, first save
        # Steady state: storage connected and draining (the first save is in the database).
        poll(lambda: len(prediction_rows(postgres, database)) == 1, timeout_s=120,
             message="the first save never reached the database")
        with slow_upload(base_url, release) as slow, concurrent.futures.ThreadPoolExecutor(
            4
        ) as pool:
            # The slow save is inside the app (headers parsed, body half sent) before the signal.
            poll(lambda: in_flight_posts(base_url) >= 1, message="the slow upload never started")
            clients = [pool.submit(stream_requests, base_url, outcomes, n, stop)
                       for n in range(1, 4)]
            poll(lambda: outcomes.statuses[200] >= 6 or any(c.done() for c in clients),
                 message="the stream did not get going")
            watcher = pool.submit(watch_readiness, base_url, readiness, closed)
            assert service.process is not None
            service.process.send_signal(signal.SIGTERM)
            assert closed.wait(120), "the listener never closed"
            release.set()  # the in-flight upload finishes after the listener has closed
            answer = slow.result(timeout=120)
            code = exit_code(service)
            stop.set()
            for future in [*clients, watcher]:
                future.result(timeout=120)
    finally:
        stop.set()
        release.set()
        service.stop()
    log = service.log_tail(8000)
    assert code == 0, log

    # Readiness said 503 (draining) before the listener closed, and never 200 again after.
    first_503 = next(i for i, seen in enumerate(readiness) if seen.startswith("503"))
    assert readiness[first_503] == "503 draining", readiness
    assert all(seen != "200" for seen in readiness[first_503:]), readiness
    assert readiness[-1] == "refused"

    # Every request: 200, or 503 + Retry-After while draining, or refused; never anything else.
    assert outcomes.problems == [], outcomes.problems
    assert set(outcomes.statuses) <= {200, 503}
    assert outcomes.statuses[503] >= 1 and outcomes.refused >= 1  # both phases were hit
    # The admitted request survived the signal and the closing of the listener.
    assert answer.status_code == 200, answer.text
    acknowledged = [*outcomes.saved, answer.json()["prediction_uid"]]

    # The service answered exactly what the clients received: a request that got no response
    # (`unanswered`, a connection reset while still in the kernel's accept queue) never reached
    # the app, and no answer the app sent was lost on the way.
    served = access_log_statuses(service.log_path, PREDICT)
    client_seen = outcomes.statuses + Counter({200: 2})  # the warm-up and the slow upload
    assert served == client_seen, (served, client_seen, outcomes.unanswered)

    # Every acknowledged save is stored exactly once (drained before exit: the outbox is empty).
    assert outbox_rows(data_dir) == 0
    rows = prediction_rows(postgres, database)
    uids = sorted(uid for uid, _ in rows)
    assert len(uids) == len(set(uids))
    assert set(acknowledged) <= set(uids) and len(uids) == len(acknowledged) + 1  # + warm-up
    assert sorted(bucket_objects(moto_s3, bucket)) == sorted(path for _, path in rows)


def test_outbox_left_at_shutdown_is_resumed_and_a_second_sigterm_hurries(
    converted_tiny_model: Path, shared_cache: Path, tmp_path: Path, postgres: PostgresServer,
    database: str, moto_s3: MotoS3Server, bucket: str,
) -> None:
    data_dir = tmp_path / "data"
    env = service_env(
        converted_tiny_model, shared_cache, data_dir, postgres, database, moto_s3, bucket
    )
    service = ServiceProcess(env, tmp_path / "service.log")
    user = uuid.uuid4()
    acknowledged: list[str] = []
    try:
        # Round 1: S3 hung, a 1 s grace runs out: exit 0, the saves stay in the outbox.
        service.env["OUTBOX_SHUTDOWN_GRACE_S"] = "1"
        base_url = service.start()
        poll(lambda: "database schema is at head" in service.log_tail(100000),
             message="the service never migrated the database")
        moto_s3.pause()
        acknowledged += [post_save(base_url, user, seed) for seed in range(4)]
        assert service.process is not None
        service.process.send_signal(signal.SIGTERM)
        assert exit_code(service) == 0, service.log_tail()
        assert outbox_rows(data_dir) == 4 and prediction_rows(postgres, database) == []

        # Round 2: still hung, a grace far longer than the test waits; SIGTERM twice hurries.
        service.env["OUTBOX_SHUTDOWN_GRACE_S"] = "3600"
        failures_before = log_count(service, "saves not stored yet")
        base_url = service.start()
        acknowledged += [post_save(base_url, user, seed) for seed in range(10, 13)]
        poll(lambda: log_count(service, "saves not stored yet") > failures_before,
             message="the drainer never tried the hung S3")  # so the drain is under way
        drains_before = log_count(service, "SIGTERM: draining")
        service.process.send_signal(signal.SIGTERM)
        poll(lambda: log_count(service, "SIGTERM: draining") > drains_before,
             message="the first SIGTERM was not handled")  # else two signals could merge
        service.process.send_signal(signal.SIGTERM)
        assert exit_code(service, timeout_s=120) == 0, service.log_tail()
        assert log_count(service, "SIGTERM again: hurrying") == 1
        assert outbox_rows(data_dir) == 7 and prediction_rows(postgres, database) == []

        # Round 3: S3 back; the next start resumes the outbox and stores everything once.
        moto_s3.resume()
        service.env["OUTBOX_SHUTDOWN_GRACE_S"] = "60"
        service.start()
        poll(lambda: len(prediction_rows(postgres, database)) >= 7 and outbox_rows(data_dir) == 0,
             timeout_s=120, message=f"saves not resumed; log:\n{service.log_tail()}")
        service.process.send_signal(signal.SIGTERM)
        assert exit_code(service) == 0, service.log_tail()
    finally:
        if moto_s3.paused:
            moto_s3.resume()
        service.stop()
    rows = prediction_rows(postgres, database)
    assert sorted(uid for uid, _ in rows) == sorted(acknowledged)  # all of them, once each
    assert sorted(bucket_objects(moto_s3, bucket)) == sorted(path for _, path in rows)


def test_sigterm_right_after_start_still_drains_the_saves_within_the_grace(
    converted_tiny_model: Path, shared_cache: Path, tmp_path: Path, postgres: PostgresServer,
    database: str, moto_s3: MotoS3Server, bucket: str,
) -> None:
    """Storage connects after the model is ready; a signal before (or while) it connects still
    gets the acknowledged saves stored within the grace period, not only at the next start."""
    data_dir = tmp_path / "data"
    env = service_env(
        converted_tiny_model, shared_cache, data_dir, postgres, database, moto_s3, bucket,
        OUTBOX_SHUTDOWN_GRACE_S="60",
    )
    service = ServiceProcess(env, tmp_path / "service.log")
    try:
        base_url = service.start()
        user = uuid.uuid4()
        acknowledged = [post_save(base_url, user, seed) for seed in range(3)]
        assert service.process is not None
        service.process.send_signal(signal.SIGTERM)
        assert exit_code(service) == 0, service.log_tail()
    finally:
        service.stop()
    assert outbox_rows(data_dir) == 0, service.log_tail()
    rows = prediction_rows(postgres, database)
    assert sorted(uid for uid, _ in rows) == sorted(acknowledged)
    assert sorted(bucket_objects(moto_s3, bucket)) == sorted(path for _, path in rows)


def test_workers_each_drain_when_the_supervisor_gets_sigterm(
    converted_tiny_model: Path, shared_cache: Path, tmp_path: Path,
) -> None:
    """`--workers 2`: uvicorn's supervisor sends SIGTERM to each worker, each drains."""
    env = {
        **process_env(converted_tiny_model, shared_cache, tmp_path / "data"),
        "WORKERS": "2",
        "SHUTDOWN_DELAY_S": "1",
        "LOG_FORMAT": "json",
    }
    service = ServiceProcess(env, tmp_path / "service.log")
    readiness: list[str] = []
    closed = threading.Event()
    try:
        base_url = service.start()

        def both_workers_ready() -> bool:
            return service.log_tail(100000).count('"ready: model') >= 2

        poll(both_workers_ready, timeout_s=300, message="the second worker never got ready")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            watcher = pool.submit(watch_readiness, base_url, readiness, closed)
            poll(lambda: bool(readiness))
            assert service.process is not None
            service.process.send_signal(signal.SIGTERM)
            code = exit_code(service)
            closed.set()
            watcher.result(timeout=60)
    finally:
        service.stop()
    log = service.log_tail(100000)
    assert code == 0, log
    assert log.count("SIGTERM: draining") == 2, log
    assert log.count("Application shutdown complete") == 2, log
    assert "503 draining" in readiness, readiness
