"""Chaos: faults under a steady request stream, with every server real and on loopback.

One service process (bundled demo model) uses redis-server (revocations), PostgreSQL and
moto's S3 server. A background thread keeps sending predicts, half of them saved. In turn:
Redis is stopped and started, PostgreSQL is stopped and started, the S3 server is frozen
(SIGSTOP) and thawed, and the service is killed with SIGKILL and started again. Asserted:

- never a 500; every other failure is a 503 with Retry-After, and only while a dependency the
  request needs is down (Redis: every authenticated request; PostgreSQL: history, not saves,
  which the outbox absorbs; S3: nothing on the request path) or the service is restarting;
- the service recovers by itself after each fault;
- every acknowledged save (a 200 with a prediction_uid) ends up in PostgreSQL exactly once,
  with its image in S3.

Without redis-server, PostgreSQL or moto these tests fail when CI=true and skip otherwise.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.helpers import TEST_SECRET, auth, jpeg_bytes, random_photo
from tests.servers import RedisServer, redis_server_fixture  # noqa: F401  (`redis_server`)
from tests.servers_mlflow import metric_value
from tests.servers_storage import (
    PREDICT,
    PREDICTIONS,
    MotoS3Server,
    PostgresServer,
    ServiceProcess,
    bucket_fixture,  # noqa: F401  (registers the `bucket` fixture)
    bucket_objects,
    database_fixture,  # noqa: F401  (registers the `database` fixture)
    moto_s3_fixture,  # noqa: F401  (registers the module-scoped `moto_s3` fixture)
    poll,
    postgres_fixture,  # noqa: F401  (registers the module-scoped `postgres` fixture)
    prediction_rows,
)

# Phases in which a request may fail, and how. "recovering": the dependency is back, and the
# test waits for the service to notice (the first 200), bounded by the poll below.
NEEDS_REDIS = {"redis_down", "redis_recovering"}
RESTARTING = {"killed"}


@dataclass
class Outcome:
    sent_in: str
    answered_in: str
    save: bool
    status: int | str  # an HTTP status, or the exception's name (no answer)
    retry_after: str | None = None
    prediction_uid: str | None = None


@dataclass
class Stream:
    """Sends predicts back to back (a short pause between), recording every outcome."""

    service: ServiceProcess
    user: uuid.UUID = field(default_factory=uuid.uuid4)
    phase: str = "normal"
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        images = [jpeg_bytes(random_photo(120, 160, seed=seed)) for seed in range(8)]
        headers = auth(self.user)
        count = 0
        while not self.stop.is_set():
            save = count % 2 == 0
            sent_in = self.phase
            try:
                response = httpx.post(
                    f"{self.service.base_url}{PREDICT}",
                    params={"save_prediction": "True" if save else "False"},
                    files={"file": ("a.jpg", images[count % len(images)], "image/jpeg")},
                    headers=headers, timeout=30,
                )
                body = response.json() if response.status_code == 200 else {}
                outcome = Outcome(
                    sent_in, self.phase, save, response.status_code,
                    response.headers.get("retry-after"), body.get("prediction_uid"),
                )
            except httpx.HTTPError as exc:
                outcome = Outcome(sent_in, self.phase, save, type(exc).__name__)
            self.outcomes.append(outcome)
            count += 1
            time.sleep(0.02)

    def since(self, start: int) -> list[Outcome]:
        return self.outcomes[start:]

    def wait_for(self, predicate, count: int = 1, timeout_s: float = 60, what: str = "") -> None:
        """Until `count` new outcomes (from now on) satisfy `predicate`."""
        start = len(self.outcomes)
        poll(lambda: sum(map(predicate, self.since(start))) >= count, timeout_s,
             f"waiting for {what}; log:\n{self.service.log_tail()}")


def ok(outcome: Outcome) -> bool:
    return outcome.status == 200


def saved(outcome: Outcome) -> bool:
    return outcome.status == 200 and outcome.prediction_uid is not None


# Acknowledged saves during each storage outage: enough for losses that need volume to show.
OUTAGE_SAVES = 100


def test_faults_under_a_request_stream_lose_no_acknowledged_save(
    tmp_path: Path, postgres: PostgresServer, database: str, moto_s3: MotoS3Server, bucket: str,
    redis_server: RedisServer,
) -> None:
    env = {
        "DATA_DIR": str(tmp_path / "data"),
        "JWT_SECRET": TEST_SECRET,
        "MODEL_POLL_INTERVAL_S": "0",
        "ACCESS_LOG": "false",
        "DATABASE_URL": postgres.url(database),
        "DATABASE_TIMEOUT_S": "3",
        **moto_s3.env(bucket),
        "S3_TIMEOUT_S": "2",
        "S3_MAX_ATTEMPTS": "1",
        "OUTBOX_RETRY_BASE_S": "0.1",
        "OUTBOX_RETRY_MAX_S": "1",
        **redis_server.env,
    }
    service = ServiceProcess(env, tmp_path / "service.log")
    service.start()
    stream = Stream(service)
    thread = threading.Thread(target=stream.run, daemon=True)
    thread.start()
    try:
        stream.wait_for(saved, 3, what="saves before any fault")

        # Redis (revocation store) down: authenticated requests get 503 until it is back.
        stream.phase = "redis_down"
        redis_server.stop()
        stream.wait_for(lambda o: o.status == 503, 3, what="503s while Redis is down")
        stream.phase = "redis_recovering"
        redis_server.start()
        stream.wait_for(ok, what="recovery after Redis restarted")
        stream.phase = "normal"
        stream.wait_for(saved, 2, what="saves after the Redis restart")

        # PostgreSQL down: saves are still acknowledged (outbox); history is a clear 503.
        stream.phase = "postgres_down"
        postgres.stop()
        stream.wait_for(saved, OUTAGE_SAVES, what="saves while PostgreSQL is down", timeout_s=180)
        history = httpx.get(f"{service.base_url}{PREDICTIONS}", headers=auth(stream.user),
                            timeout=30)
        assert history.status_code == 503 and history.headers["retry-after"], history.text
        postgres.start()
        stream.phase = "normal"
        stream.wait_for(saved, 2, what="saves after the PostgreSQL restart")

        # S3 frozen: saves are still acknowledged and wait in the outbox.
        stream.phase = "s3_paused"
        moto_s3.pause()
        stream.wait_for(saved, OUTAGE_SAVES, what="saves while S3 is frozen", timeout_s=180)
        moto_s3.resume()
        stream.phase = "normal"
        stream.wait_for(saved, 2, what="saves after S3 thawed")

        # kill -9 in the middle of the stream, then a fresh start on the same DATA_DIR.
        stream.phase = "killed"
        service.kill()
        service.start()
        stream.phase = "normal"
        stream.wait_for(saved, 3, what="saves after the restart")
    finally:
        stream.stop.set()
        thread.join(60)
        if moto_s3.paused:
            moto_s3.resume()
        if not postgres.running:
            postgres.start()

    try:
        outcomes = stream.outcomes
        acknowledged = [o.prediction_uid for o in outcomes if saved(o)]
        # Everything acknowledged reaches PostgreSQL and S3 (the outbox drains).
        poll(lambda: metric_value(
                 httpx.get(f"{service.base_url}/metrics", timeout=30).text,
                 "inference_outbox_backlog") == 0,
             120, f"the outbox did not drain; log:\n{service.log_tail()}")
    finally:
        service.stop()

    # No 500s; failures are 503 + Retry-After, or no answer while the service restarted.
    assert not [o for o in outcomes if o.status == 500]
    for outcome in outcomes:
        if outcome.status == 200:
            continue
        phases = {outcome.sent_in, outcome.answered_in}
        if outcome.status == 503:
            assert outcome.retry_after, outcome
            assert phases & (NEEDS_REDIS | RESTARTING), outcome
        else:  # a refused or reset connection
            assert phases & RESTARTING, outcome
    for phase in ("postgres_down", "s3_paused"):
        during = [o for o in outcomes if o.sent_in == phase and o.answered_in == phase]
        assert during and all(o.status == 200 for o in during), phase
    assert any(o.status == 503 and o.sent_in == "redis_down" for o in outcomes)

    # Every acknowledged save exactly once in PostgreSQL, its image in S3.
    assert len(acknowledged) == len(set(acknowledged)) >= 2 * OUTAGE_SAVES
    stored = prediction_rows(postgres, database)
    uids = [uid for uid, _ in stored]
    assert len(uids) == len(set(uids))  # no duplicates
    assert set(acknowledged) <= set(uids)  # nothing acknowledged is lost
    keys = set(bucket_objects(moto_s3, bucket))
    by_uid = dict(stored)
    assert all(by_uid[uid] in keys for uid in acknowledged)
