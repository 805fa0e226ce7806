"""Two replicas on one machine: two service processes against the same PostgreSQL database,
redis-server and S3 bucket (each with its own DATA_DIR, so its own outbox).

Started at the same moment, so both run the migrations at once; a token revoked while both
serve is refused by both; saves sent to either arrive exactly once; history is the same
through either replica.
"""

from __future__ import annotations

import concurrent.futures
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rottenbot_inference.storage.db import VERSION_TABLE
from tests.helpers import TEST_SECRET, auth, jpeg_bytes, random_photo
from tests.servers import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (registers the `redis_server` fixture)
)
from tests.servers_storage import (
    PREDICT,
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
)
from tests.test_auth import assert_401, auth_service_token, bearer, utc_clock

__all__ = ["utc_clock"]  # a fixture, used by name
SAVES = 200  # 100 acknowledged saves per process: losses that need volume show


@pytest.fixture
def replicas(
    converted_tiny_model: Path, shared_cache: Path, tmp_path: Path, postgres: PostgresServer,
    database: str, moto_s3: MotoS3Server, bucket: str, redis_server: RedisServer,
) -> Iterator[list[ServiceProcess]]:
    shared = {
        "MODEL_PATH": str(converted_tiny_model),
        "MODEL_CACHE_DIR": str(shared_cache),
        "JWT_SECRET": TEST_SECRET,
        "MAX_BATCH_SIZE": "4",
        "DATABASE_URL": postgres.url(database),
        **moto_s3.env(bucket),
        **redis_server.env,
        "S3_TIMEOUT_S": "3",
        "OUTBOX_RETRY_MAX_S": "1",
        "LOG_FORMAT": "json",
    }
    services = [
        ServiceProcess({**shared, "DATA_DIR": str(tmp_path / name / "data")},
                       tmp_path / f"{name}.log")
        for name in ("a", "b")
    ]
    for service in services:
        service.database, service.bucket = database, bucket  # type: ignore[attr-defined]
    try:
        # Both at the same moment: both migrate the empty database at once.
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for started in [pool.submit(service.start) for service in services]:
                started.result()
        yield services
    finally:
        for service in services:
            service.stop()


def test_two_replicas_share_revocations_saves_and_history(
    replicas: list[ServiceProcess], postgres: PostgresServer, moto_s3: MotoS3Server,
    redis_server: RedisServer, utc_clock: None,
) -> None:
    a, b = replicas
    database: str = a.database  # type: ignore[attr-defined]
    bucket: str = a.bucket  # type: ignore[attr-defined]

    # Migrations started by both at once: each reached head without a failed attempt, and the
    # schema is there once.
    poll(lambda: all("database schema is at head" in s.log_tail(200000) for s in replicas),
         message="a replica never reported the schema at head")
    for service in replicas:
        assert "database migration failed" not in service.log_tail(200000)
    assert postgres.psql(f"SELECT count(*) FROM {VERSION_TABLE}", database) == "1"

    # A token revoked while both serve is refused by both.
    user = uuid.uuid4()
    access, jti = auth_service_token(user)
    photo = jpeg_bytes(random_photo(120, 160, seed=3))

    def predict(service: ServiceProcess) -> httpx.Response:
        return httpx.post(
            f"{service.base_url}{PREDICT}?save_prediction=False",
            files={"file": ("a.jpg", photo, "image/jpeg")}, headers=bearer(access), timeout=60,
        )

    assert [predict(s).status_code for s in replicas] == [200, 200]
    redis_server.revoke(jti)
    for service in replicas:
        assert_401(predict(service), access)

    # Saves sent alternately to both arrive exactly once each: one row, one object.
    saver = uuid.uuid4()
    acknowledged = []
    clients = [httpx.Client(base_url=s.base_url, timeout=60) for s in replicas]
    try:
        for n in range(SAVES):
            response = save(clients[n % 2], saver, seed=100 + n)
            assert response.status_code == 200, response.text
            acknowledged.append(response.json()["prediction_uid"])
    finally:
        for client in clients:
            client.close()
    data_dirs = [Path(s.env["DATA_DIR"]) for s in replicas]
    poll(lambda: len(prediction_rows(postgres, database, "uid, user_uid, image_path")) >= SAVES
         and all(outbox_rows(d) == 0 for d in data_dirs),
         timeout_s=120, message="saves did not all arrive")
    stored = prediction_rows(postgres, database, "uid, user_uid, image_path")
    assert sorted(uid for uid, _, _ in stored) == sorted(acknowledged)
    assert {owner for _, owner, _ in stored} == {str(saver)}
    keys = sorted(bucket_objects(moto_s3, bucket))
    assert keys == sorted(path for _, _, path in stored)

    # History through either replica is the same (newest first, every save, all stored).
    with httpx.Client(base_url=a.base_url, timeout=60) as client_a, httpx.Client(
        base_url=b.base_url, timeout=60
    ) as client_b:
        through_a = history(client_a, saver, limit=3)
        through_b = history(client_b, saver, limit=3)
        assert through_a == through_b
        assert [item["uid"] for item in through_a] == list(reversed(acknowledged))
        assert {item["status"] for item in through_a} == {"stored"}
        # One replica's cursor works on the other (cursors carry no replica state): pages
        # fetched alternately from a and b.
        items: list[dict[str, str]] = []
        cursor = None
        for page in range(SAVES):
            client = (client_a, client_b)[page % 2]
            params = {"limit": 40, **({"cursor": cursor} if cursor else {})}
            body = client.get("/api/v1/inference/predictions", params=params,
                              headers=auth(saver)).json()
            items += body["items"]
            cursor = body.get("next_cursor")
            if not cursor:
                break
        assert page >= 2  # both replicas' cursors were used
        assert [i["uid"] for i in items] == list(reversed(acknowledged))
