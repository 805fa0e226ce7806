"""The user's own data: the streamed zip export and the durable erasure, against real
PostgreSQL and moto's S3 server (tests/servers_storage.py), with S3 really paused (SIGSTOP)
during an erasure. Without them these tests fail when CI=true and are skipped otherwise.
"""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from tests.helpers import auth, class_map, jpeg_bytes, random_photo
from tests.servers_storage import (
    PREDICTIONS,
    MotoS3Server,
    PostgresServer,
    bucket_fixture,  # noqa: F401  (registers the `bucket` fixture)
    bucket_objects,
    database_fixture,  # noqa: F401  (registers the `database` fixture)
    history,
    moto_s3_fixture,  # noqa: F401  (registers the module-scoped `moto_s3` fixture)
    poll,
    postgres_fixture,  # noqa: F401  (registers the module-scoped `postgres` fixture)
    prediction_rows,
    save,
    storage_overrides,
)

CLASSES = list(class_map().values())


def stored(client: TestClient, user: uuid.UUID, seed: int) -> tuple[str, bytes]:
    image = jpeg_bytes(random_photo(120, 160, seed=seed))
    response = save(client, user, image=image)
    assert response.status_code == 200, response.text
    uid = response.json()["prediction_uid"]
    poll(lambda: client.get(f"{PREDICTIONS}/{uid}", headers=auth(user)).json().get("status")
         == "stored", message="the save never reached the database")
    return uid, image


def rows_of(postgres: PostgresServer, database: str, user: uuid.UUID) -> list[list[str]]:
    return prediction_rows(postgres, database, where=f"user_uid = '{user}'")


def feedback_count(postgres: PostgresServer, database: str, user: uuid.UUID) -> int:
    return int(postgres.psql(
        f"SELECT count(*) FROM prediction_feedback WHERE user_uid = '{user}'", database))


def test_zip_export_has_every_image_and_a_manifest_and_only_the_callers(
    make_client: Callable[..., TestClient], postgres: PostgresServer, database: str,
    moto_s3: MotoS3Server, bucket: str,
) -> None:
    client = make_client(**storage_overrides(postgres, database, moto_s3, bucket))
    alice, bob = uuid.uuid4(), uuid.uuid4()
    saved = dict(stored(client, alice, seed) for seed in range(3))
    stored(client, bob, 9)
    first = next(iter(saved))
    assert client.put(f"{PREDICTIONS}/{first}/feedback", json={"correct_class": CLASSES[1]},
                      headers=auth(alice)).status_code == 200
    with client.stream("GET", f"{PREDICTIONS}/export", headers=auth(alice)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"] == "application/zip"
        assert "attachment" in response.headers["content-disposition"]
        assert "content-length" not in response.headers  # streamed, not buffered
        body = b"".join(response.iter_bytes())
    archive = zipfile.ZipFile(io.BytesIO(body))
    assert archive.testzip() is None
    manifest: dict[str, Any] = json.loads(archive.read("manifest.json"))
    assert manifest["user_uid"] == str(alice)
    by_uid = {item["uid"]: item for item in manifest["predictions"]}
    assert set(by_uid) == set(saved)
    for uid, image in saved.items():
        assert archive.read(by_uid[uid]["file"]) == image
        assert by_uid[uid]["file"] == f"images/{uid}.jpg"
    assert by_uid[first]["feedback"]["correct_class_name"] == CLASSES[1]
    assert sorted(archive.namelist()) == sorted(
        ["manifest.json", *(f"images/{uid}.jpg" for uid in saved)])
    assert client.get(f"{PREDICTIONS}/export").status_code == 401
    empty = zipfile.ZipFile(io.BytesIO(
        client.get(f"{PREDICTIONS}/export", headers=auth(uuid.uuid4())).content))
    assert json.loads(empty.read("manifest.json"))["predictions"] == []


def test_erasure_with_s3_down_is_pending_then_completes_and_spares_others(
    make_client: Callable[..., TestClient], postgres: PostgresServer, database: str,
    moto_s3: MotoS3Server, bucket: str,
) -> None:
    client = make_client(**storage_overrides(postgres, database, moto_s3, bucket))
    alice, bob = uuid.uuid4(), uuid.uuid4()
    uids = [stored(client, alice, seed)[0] for seed in range(3)]
    bob_uid, _ = stored(client, bob, 7)
    assert client.put(f"{PREDICTIONS}/{uids[0]}/feedback", json={"correct_class": 1},
                      headers=auth(alice)).status_code == 200
    keys = [key for key in bucket_objects(moto_s3, bucket) if key.startswith(f"{alice}/")]
    assert len(keys) == 3 and feedback_count(postgres, database, alice) == 1

    moto_s3.pause()
    try:
        response = client.delete(PREDICTIONS, headers=auth(alice))
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "pending"
        # Recorded: in the database (the export skips the user) and in the local journal.
        assert postgres.psql(
            f"SELECT count(*) FROM user_erasures WHERE user_uid = '{alice}'", database) == "1"
        assert client.delete(PREDICTIONS, headers=auth(alice)).status_code == 202
    finally:
        moto_s3.resume()

    # Completed in the background once S3 is back: rows, feedback, images, the mark.
    poll(lambda: rows_of(postgres, database, alice) == [], message="rows never erased")
    poll(lambda: postgres.psql(f"SELECT count(*) FROM user_erasures WHERE user_uid = '{alice}'",
                               database) == "0", message="the erasure never completed")
    assert feedback_count(postgres, database, alice) == 0
    assert not [key for key in bucket_objects(moto_s3, bucket) if key.startswith(f"{alice}/")]
    assert history(client, alice) == []
    assert client.delete(PREDICTIONS, headers=auth(alice)).status_code == 204
    # Bob's data is untouched.
    assert [item["uid"] for item in history(client, bob)] == [bob_uid]
    assert any(key.startswith(f"{bob}/") for key in bucket_objects(moto_s3, bucket))
    assert client.get(f"{PREDICTIONS}/{bob_uid}/image", headers=auth(bob)).status_code == 200


def test_a_pending_erasure_survives_a_restart_and_completes_after_it(
    make_client: Callable[..., TestClient], postgres: PostgresServer, database: str,
    moto_s3: MotoS3Server, bucket: str,
) -> None:
    overrides = storage_overrides(postgres, database, moto_s3, bucket)
    client = make_client(**overrides)
    alice = uuid.uuid4()
    for seed in range(2):
        stored(client, alice, seed)
    moto_s3.pause()
    try:
        assert client.delete(PREDICTIONS, headers=auth(alice)).status_code == 202
        client.__exit__(None, None, None)  # the replica stops with the erasure unfinished
    finally:
        moto_s3.resume()
    assert len(rows_of(postgres, database, alice)) == 2  # nothing erased by the stopped one

    restarted = make_client(**overrides)  # same DATA_DIR: it finds the journal
    poll(lambda: rows_of(postgres, database, alice) == [], message="never resumed")
    poll(lambda: not [k for k in bucket_objects(moto_s3, bucket) if k.startswith(f"{alice}/")],
         message="images never erased")
    assert restarted.delete(PREDICTIONS, headers=auth(alice)).status_code == 204
