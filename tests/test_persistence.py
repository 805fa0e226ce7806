"""Saved predictions against real servers on loopback: PostgreSQL (initdb/pg_ctl) and moto's S3
server, through the production S3 client code. Outages are real: pg_ctl stop/start, SIGSTOP /
SIGCONT of the S3 server, and `kill -9` of a real service process.

Without PostgreSQL or moto these tests fail when CI=true and are skipped otherwise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from rottenbot_inference.storage.db import VERSION_TABLE, migrate
from tests.helpers import auth, jpeg_bytes, process_env, random_photo
from tests.servers_storage import (
    COLOURS,
    PREDICTIONS,
    MotoS3Server,
    PostgresServer,
    ServiceProcess,
    bucket_fixture,  # noqa: F401  (registers the `bucket` fixture)
    bucket_objects,
    database_fixture,  # noqa: F401  (registers the `database` fixture)
    history,
    moto_s3_fixture,  # noqa: F401  (registers the module-scoped `moto_s3` fixture)
    outbox_rows,
    poll,
    postgres_fixture,  # noqa: F401  (registers the module-scoped `postgres` fixture)
    prediction_rows,
    save,
    solid_jpeg,
    storage_overrides,
)


def rows(postgres: PostgresServer, database: str, where: str = "true") -> list[list[str]]:
    return prediction_rows(
        postgres, database, "uid, user_uid, image_path, model_version, content_type, "
        "predicted_class_name, image_bytes", where, order_by="created_at",
    )


def store_of(client: TestClient) -> Any:
    return client.app.state.rottenbot.predictions  # type: ignore[attr-defined]


# --- migrations ---------------------------------------------------------------------------------


def test_postgres_migrations_from_empty_concurrent_rerun_and_legacy_table(
    postgres: PostgresServer,
) -> None:
    fresh = postgres.create_database("mig")
    env = {**os.environ, "DATABASE_URL": postgres.url(fresh, driver="postgresql")}
    command = [sys.executable, "-m", "rottenbot_inference.storage.migrate"]
    # Two replicas starting at once: both succeed (the advisory lock serialises them).
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for _ in range(2)]
    outputs = [run.communicate(timeout=120)[0].decode() for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert postgres.psql(f"SELECT version_num FROM {VERSION_TABLE}", fresh) == "0004"
    indexes = postgres.psql("SELECT indexname FROM pg_indexes WHERE tablename='predictions'", fresh)
    assert {"ix_predictions_user_created_uid", "ix_predictions_user_class_created_uid"} <= set(
        indexes.splitlines()
    )
    assert postgres.psql(
        "SELECT data_type FROM information_schema.columns WHERE table_name='predictions' "
        "AND column_name='created_at'", fresh,
    ) == "timestamp with time zone"
    # Re-run: nothing to do, nothing broken.
    asyncio.run(migrate(make_url(postgres.url(fresh))))
    assert postgres.psql(f"SELECT count(*) FROM {VERSION_TABLE}", fresh) == "1"

    # The previous service's table (no Alembic, naive timestamps) is adopted, rows kept.
    legacy = postgres.create_database("legacy")
    postgres.psql(
        "CREATE TABLE predictions (uid uuid PRIMARY KEY, image_path text UNIQUE, "
        "predicted_class int, predicted_class_name text, confidence float, user_uid uuid, "
        "created_at timestamp);"
        "INSERT INTO predictions VALUES ('11111111-1111-1111-1111-111111111111', 'old.jpg', 3, "
        "'Apple__Rotten', 0.95, '22222222-2222-2222-2222-222222222222', '2024-03-04 05:06:07')",
        legacy,
    )
    asyncio.run(migrate(make_url(postgres.url(legacy))))
    assert postgres.psql(
        "SELECT image_path, model_version IS NULL, "
        "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') FROM predictions",
        legacy,
    ) == "old.jpg|t|2024-03-04 05:06:07"


# --- round trip, history ----------------------------------------------------------------------


def test_round_trip_row_and_object_with_key_type_user_and_model_version(
    make_client: Callable[..., TestClient], postgres: PostgresServer, database: str,
    moto_s3: MotoS3Server, bucket: str,
) -> None:
    assert bucket not in {b["Name"] for b in moto_s3.client().list_buckets()["Buckets"]}
    client = make_client(**storage_overrides(postgres, database, moto_s3, bucket))
    user = uuid.uuid4()
    photo = jpeg_bytes(random_photo(seed=11))
    before = dt.datetime.now(dt.UTC)
    response = save(client, user, image=photo)
    after = dt.datetime.now(dt.UTC)
    assert response.status_code == 200, response.text
    body = response.json()
    uid = body["prediction_uid"]

    found = poll(lambda: rows(postgres, database), message="the row never arrived")
    assert len(found) == 1
    row_uid, row_user, key, model_version, content_type, class_name, size = found[0]
    assert (row_uid, row_user) == (uid, str(user))  # the token's user
    assert model_version == body["model_version"] and class_name == body["predicted_class_name"]
    assert content_type == "image/jpeg" and int(size) == len(photo)
    # <user>/<yyyy>/<mm>/<dd>/<uid>.jpg, dated when it was saved (either side of a midnight).
    assert key in {f"{user}/{day:%Y/%m/%d}/{uid}.jpg" for day in (before, after)}

    # The bucket was created by the service; the object has the right key, type and bytes.
    s3 = moto_s3.client()
    head = s3.head_object(Bucket=bucket, Key=key)
    assert head["ContentType"] == "image/jpeg"
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == photo
    image = client.get(f"{PREDICTIONS}/{uid}/image", headers=auth(user))
    assert image.status_code == 200 and image.content == photo
    assert image.headers["content-type"] == "image/jpeg"
    assert store_of(client).backlog == 0


def test_history_pagination_filter_scoping_and_delete_on_postgres_and_s3(
    make_client: Callable[..., TestClient], postgres: PostgresServer, database: str,
    moto_s3: MotoS3Server, bucket: str,
) -> None:
    client = make_client(**storage_overrides(postgres, database, moto_s3, bucket))
    alice, bob = uuid.uuid4(), uuid.uuid4()
    saved = [save(client, alice, image=solid_jpeg(COLOURS[i % len(COLOURS)])).json()
             for i in range(9)]
    bob_uid = save(client, bob, seed=2).json()["prediction_uid"]
    poll(lambda: len(rows(postgres, database)) == 10 and store_of(client).backlog == 0)

    items = history(client, alice, limit=4)  # 3 pages through opaque cursors
    assert [i["uid"] for i in items] == [s["prediction_uid"] for s in reversed(saved)]
    assert {i["status"] for i in items} == {"stored"}
    name = saved[1]["predicted_class_name"]
    expected = [s["prediction_uid"] for s in reversed(saved) if s["predicted_class_name"] == name]
    assert [i["uid"] for i in history(client, alice, limit=1, class_name=name)] == expected
    assert [i["uid"] for i in history(client, bob)] == [bob_uid]

    victim = saved[0]["prediction_uid"]
    for method, suffix in (("GET", ""), ("GET", "/image"), ("DELETE", "")):
        response = client.request(method, f"{PREDICTIONS}/{victim}{suffix}", headers=auth(bob))
        assert response.status_code == 404, (method, suffix)
    key = rows(postgres, database, f"uid = '{victim}'")[0][2]
    assert key in bucket_objects(moto_s3, bucket)

    assert client.delete(f"{PREDICTIONS}/{victim}", headers=auth(alice)).status_code == 204
    assert rows(postgres, database, f"uid = '{victim}'") == []
    assert key not in bucket_objects(moto_s3, bucket) and len(bucket_objects(moto_s3, bucket)) == 9
    assert client.get(f"{PREDICTIONS}/{victim}/image", headers=auth(alice)).status_code == 404


# --- outages ------------------------------------------------------------------------------------

COUNT = 100  # acknowledged saves per outage: enough for losses that need volume to show


def test_s3_hung_then_back_every_acknowledged_save_arrives_and_full_outbox_is_503(
    make_client: Callable[..., TestClient], postgres: PostgresServer, database: str,
    moto_s3: MotoS3Server, bucket: str,
) -> None:
    count = COUNT
    client = make_client(
        **storage_overrides(
            postgres, database, moto_s3, bucket, outbox_max_items=count, s3_max_attempts=1
        )
    )
    store = store_of(client)
    user = uuid.uuid4()
    moto_s3.pause()
    try:
        uids = []
        for seed in range(count):
            response = save(client, user, seed=seed)
            assert response.status_code == 200, response.text  # answered while S3 is hung
            uids.append(response.json()["prediction_uid"])
        full = save(client, user, seed=99)
        assert full.status_code == 503 and "retry-after" in full.headers
        poll(lambda: store.drainer.failures >= 2, message="the hung S3 was never retried")
        assert rows(postgres, database) == []  # the row waits for its image
        assert store.backlog == count
    finally:
        moto_s3.resume()
    poll(lambda: len(rows(postgres, database)) == count and store.backlog == 0,
         message="acknowledged saves did not all arrive after S3 came back")
    assert sorted(r[0] for r in rows(postgres, database)) == sorted(uids)
    keys = bucket_objects(moto_s3, bucket)
    assert len(keys) == count and all(any(k.endswith(f"{u}.jpg") for k in keys) for u in uids)
    assert save(client, user, seed=100).status_code == 200  # room again


def test_database_down_then_back_every_acknowledged_save_arrives(
    make_client: Callable[..., TestClient], postgres: PostgresServer, database: str,
    moto_s3: MotoS3Server, bucket: str,
) -> None:
    client = make_client(**storage_overrides(postgres, database, moto_s3, bucket))
    store = store_of(client)
    poll(lambda: store.schema_ready, message="migrations did not run on start")
    user = uuid.uuid4()
    postgres.stop()
    try:
        uids = []
        for seed in range(COUNT):
            response = save(client, user, seed=seed)
            assert response.status_code == 200, response.text
            uids.append(response.json()["prediction_uid"])
        # History needs the database: 503 + Retry-After ...
        listing = client.get(PREDICTIONS, headers=auth(user))
        assert listing.status_code == 503 and "retry-after" in listing.headers
        # ... but a pending save can still be read back by its uid.
        pending = client.get(f"{PREDICTIONS}/{uids[0]}", headers=auth(user))
        assert pending.status_code == 200 and pending.json()["status"] == "pending"
        poll(lambda: store.drainer.failures >= 2, message="the database was never retried")
        assert store.backlog == COUNT
    finally:
        postgres.start()
    poll(lambda: len(rows(postgres, database)) == COUNT and store.backlog == 0,
         message="acknowledged saves did not all arrive after the database came back")
    assert sorted(r[0] for r in rows(postgres, database)) == sorted(uids)
    assert len(bucket_objects(moto_s3, bucket)) == COUNT
    assert [i["uid"] for i in history(client, user)] == list(reversed(uids))


def test_shutdown_keeps_draining_for_the_grace_period(
    make_client: Callable[..., TestClient], postgres: PostgresServer, database: str,
    moto_s3: MotoS3Server, bucket: str,
) -> None:
    """Saves pending at shutdown are stored if storage comes back within the grace period."""
    client = make_client(
        **storage_overrides(
            postgres, database, moto_s3, bucket, outbox_shutdown_grace_s=60, s3_max_attempts=1
        )
    )
    store = store_of(client)
    user = uuid.uuid4()
    moto_s3.pause()
    try:
        for seed in range(5):
            assert save(client, user, seed=seed).status_code == 200
        poll(lambda: store.drainer.failures >= 1)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            shutdown = pool.submit(client.__exit__, None, None, None)  # lifespan shutdown
            poll(lambda: store.drainer.closing, message="shutdown did not begin")
            assert not shutdown.done()  # waiting for the pending saves, not abandoning them
            moto_s3.resume()
            shutdown.result(timeout=120)
    finally:
        if moto_s3.paused:
            moto_s3.resume()
    assert store.backlog == 0
    assert len(rows(postgres, database)) == 5 and len(bucket_objects(moto_s3, bucket)) == 5


def test_kill_9_after_acknowledged_saves_loses_nothing_and_duplicates_nothing(
    tiny_model: Path, shared_cache: Path, tmp_path: Path, postgres: PostgresServer,
    database: str, moto_s3: MotoS3Server, bucket: str,
) -> None:
    data_dir = tmp_path / "data"
    env = {
        **process_env(tiny_model, shared_cache, data_dir),
        "DATABASE_URL": postgres.url(database),
        **moto_s3.env(bucket),
        "S3_TIMEOUT_S": "3",
        "OUTBOX_RETRY_MAX_S": "1",
    }
    service = ServiceProcess(env, tmp_path / "service.log")
    user = uuid.uuid4()
    headers = auth(user)

    def post(seed: int) -> str:
        response = httpx.post(
            f"{service.base_url}/api/v1/inference/predict?save_prediction=True",
            files={"file": ("a.jpg", jpeg_bytes(random_photo(seed=seed)), "image/jpeg")},
            headers=headers, timeout=60,
        )
        assert response.status_code == 200, response.text
        return response.json()["prediction_uid"]

    acknowledged: list[str] = []
    try:
        # Round 1: S3 hung, so every acknowledged save is still only in the outbox at the kill.
        service.start()
        moto_s3.pause()
        acknowledged += [post(seed) for seed in range(10)]
        service.kill()
        assert outbox_rows(data_dir) == 10  # durable on disk, nothing reached the database
        assert rows(postgres, database) == []
        moto_s3.resume()

        # Round 2: storage up; 12 concurrent saves, killed right after the last answer
        # (the drainer is mid-way: some stored, some not, some perhaps half-done).
        service.start()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            acknowledged += list(pool.map(post, range(100, 112)))
        service.kill()

        # Restart: everything acknowledged arrives exactly once.
        service.start()
        poll(lambda: len(rows(postgres, database)) >= len(acknowledged)
             and outbox_rows(data_dir) == 0, timeout_s=120,
             message=f"saves lost after kill -9; log:\n{service.log_tail()}")
    finally:
        if moto_s3.paused:
            moto_s3.resume()
        service.stop()
    stored = rows(postgres, database)
    assert sorted(r[0] for r in stored) == sorted(acknowledged)  # all of them, no duplicates
    assert {r[1] for r in stored} == {str(user)}
    keys = bucket_objects(moto_s3, bucket)
    assert sorted(keys) == sorted(r[2] for r in stored)
    assert all(size > 0 for size in keys.values())


def test_a_row_the_database_rejects_is_parked_without_holding_up_the_others(
    make_client: Callable[..., TestClient], postgres: PostgresServer, database: str,
    moto_s3: MotoS3Server, bucket: str,
) -> None:
    """A permanent failure of one item (here a CHECK constraint an operator added rejects one
    user's rows) parks that item, counted by reason; the saves behind it are stored at once;
    once the cause is gone, the parked item is stored at its next retry."""
    client = make_client(**storage_overrides(
        postgres, database, moto_s3, bucket, outbox_park_retry_s=2.0, outbox_batch_size=16,
    ))
    store = store_of(client)
    poll(lambda: store.schema_ready, message="migrations did not run on start")
    poisoned, others = uuid.uuid4(), uuid.uuid4()
    postgres.psql(
        "ALTER TABLE predictions ADD CONSTRAINT not_this_user "
        f"CHECK (user_uid::text <> '{poisoned}')", database,
    )
    bad = save(client, poisoned, seed=1).json()["prediction_uid"]
    good = [save(client, others, seed=10 + n).json()["prediction_uid"] for n in range(20)]
    poll(lambda: sorted(r[0] for r in rows(postgres, database)) == sorted(good),
         message="saves behind the rejected one were held up")
    poll(lambda: store.outbox.parked == 1, message="the rejected save was not parked")
    assert store.drainer.failures_by_reason["database_rejected"] >= 1
    assert store.outbox.get(uuid.UUID(bad)) is not None  # kept, never dropped
    postgres.psql("ALTER TABLE predictions DROP CONSTRAINT not_this_user", database)
    poll(lambda: bad in {r[0] for r in rows(postgres, database)} and store.backlog == 0,
         message="the parked save was not stored once the database accepted it")
    assert store.outbox.parked == 0
