"""Saved predictions with the embedded defaults (SQLite + a local folder), migrations and cursors.
No external servers. The outbox and the drainer alone: tests/test_outbox.py, test_drainer.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from rottenbot_inference.storage.db import (
    VERSION_TABLE,
    migrate,
)
from rottenbot_inference.storage.service import InvalidCursor, decode_cursor, encode_cursor
from tests.helpers import auth, free_port, jpeg_bytes, png_bytes, random_photo
from tests.servers_storage import COLOURS, PREDICT, PREDICTIONS, history, poll, save, solid_jpeg

# --- migrations, cursors -----------------------------------------------------------------------


def test_sqlite_migrations_from_empty_are_idempotent_and_adopt_a_legacy_table(
    tmp_path: Path,
) -> None:
    url = make_url(f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}")
    asyncio.run(migrate(url))
    asyncio.run(migrate(url))
    conn = sqlite3.connect(tmp_path / "fresh.db")
    assert conn.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchall() == [("0004",)]
    indexes = {row[1] for row in conn.execute("PRAGMA index_list(predictions)")}
    assert "ix_predictions_user_created_uid" in indexes

    legacy = tmp_path / "legacy.db"
    conn = sqlite3.connect(legacy)
    conn.execute(
        "CREATE TABLE predictions (uid CHAR(32) PRIMARY KEY, image_path TEXT UNIQUE, "
        "predicted_class INTEGER, predicted_class_name TEXT, confidence FLOAT, "
        "user_uid CHAR(32), created_at DATETIME)"
    )
    conn.execute(
        "INSERT INTO predictions VALUES ('0123456789abcdef0123456789abcdef', 'old.jpg', 3, "
        "'Apple__Rotten', 0.9, 'fedcba9876543210fedcba9876543210', '2024-01-02 03:04:05.000000')"
    )
    conn.commit()
    conn.close()
    asyncio.run(migrate(make_url(f"sqlite+aiosqlite:///{legacy}")))
    conn = sqlite3.connect(legacy)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(predictions)")}
    assert {"model_version", "image_width", "top_k", "content_type"} <= columns
    assert conn.execute("SELECT count(*), max(image_path) FROM predictions").fetchone() == (
        1, "old.jpg",
    )


def test_cursors_are_opaque_and_validated() -> None:
    key = (dt.datetime(2025, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC), uuid.uuid4())
    cursor = encode_cursor(key)
    assert "2025" not in cursor and decode_cursor(cursor) == key
    for bad in ("", "nope", "e30", encode_cursor(key)[:-3] + "!!!"):
        with pytest.raises(InvalidCursor):
            decode_cursor(bad)


# --- through the API, embedded defaults ------------------------------------------------------


def test_saved_prediction_round_trip_sqlite_and_local_folder(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    client = make_client()
    user = uuid.uuid4()
    photo = jpeg_bytes(random_photo(seed=3))
    response = save(client, user, image=photo)
    assert response.status_code == 200, response.text
    body = response.json()
    uid = uuid.UUID(body["prediction_uid"])
    assert {"predicted_class", "predicted_class_name", "confidence"} <= body.keys()

    stored = poll(lambda: client.get(f"{PREDICTIONS}/{uid}", headers=auth(user)).json()
                  .get("status") == "stored", message="save never reached the database")
    assert stored
    item = client.get(f"{PREDICTIONS}/{uid}", headers=auth(user)).json()
    assert item["predicted_class_name"] == body["predicted_class_name"]
    assert item["model_version"] == body["model_version"]
    assert item["content_type"] == "image/jpeg" and item["image_bytes"] == len(photo)
    assert item["image_width"] == 640 and item["image_height"] == 480
    assert len(item["top_k"]) == 5 and item["top_k"][0]["class"] == body["predicted_class"]

    # The object key is ours (user/date/uid.ext), never the client's "../../etc/passwd.jpg".
    day = dt.datetime.fromisoformat(item["created_at"]).astimezone(dt.UTC)
    path = tmp_path / "data" / "images" / str(user) / f"{day:%Y/%m/%d}" / f"{uid}.jpg"
    assert path.read_bytes() == photo
    row = sqlite3.connect(tmp_path / "data" / "predictions.db").execute(
        "SELECT user_uid, image_path, model_version, image_sha256 FROM predictions"
    ).fetchall()
    assert len(row) == 1 and row[0][0] == user.hex
    assert row[0][1] == f"{user}/{day:%Y/%m/%d}/{uid}.jpg" and row[0][2] == body["model_version"]

    image = client.get(f"{PREDICTIONS}/{uid}/image", headers=auth(user))
    assert image.status_code == 200 and image.content == photo
    assert image.headers["content-type"] == "image/jpeg"

    # PNG: extension and content type from the detected format, not from the declared one.
    png = png_bytes(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (50, 40), "red"))
    response = save(client, user, image=png, content_type="application/octet-stream",
                    filename="photo.jpg")
    assert response.status_code == 200, response.text
    png_uid = response.json()["prediction_uid"]
    poll(lambda: client.get(f"{PREDICTIONS}/{png_uid}", headers=auth(user)).json()
         .get("status") == "stored")
    image = client.get(f"{PREDICTIONS}/{png_uid}/image", headers=auth(user))
    assert image.headers["content-type"] == "image/png" and image.content == png
    assert list((tmp_path / "data" / "images").rglob(f"{png_uid}.png"))


def test_without_save_prediction_nothing_is_stored(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    client = make_client()
    user = uuid.uuid4()
    for flag in ("False", "false", None):
        query = "" if flag is None else f"?save_prediction={flag}"
        response = client.post(
            f"{PREDICT}{query}", files={"file": ("a.jpg", solid_jpeg((0, 0, 0)), "image/jpeg")},
            headers=auth(user),
        )
        assert response.status_code == 200 and "prediction_uid" not in response.json()
    store = client.app.state.rottenbot.predictions  # type: ignore[attr-defined]
    assert store.backlog == 0 and store.outbox.transactions == 0
    assert history(client, user) == []
    assert not list((tmp_path / "data").glob("images/**/*.jpg"))


def test_history_pages_filters_scopes_and_deletes(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    client = make_client()
    alice, bob = uuid.uuid4(), uuid.uuid4()
    saved = []
    for index in range(12):
        response = save(client, alice, image=solid_jpeg(COLOURS[index % len(COLOURS)]))
        assert response.status_code == 200, response.text
        saved.append(response.json())
    assert save(client, bob, seed=1).status_code == 200
    store = client.app.state.rottenbot.predictions  # type: ignore[attr-defined]
    poll(lambda: store.backlog == 0, message="outbox never drained")

    items = history(client, alice, limit=5)
    assert [i["uid"] for i in items] == [s["prediction_uid"] for s in reversed(saved)]
    assert all(i["status"] == "stored" for i in items)
    created = [i["created_at"] for i in items]
    assert created == sorted(created, reverse=True)

    name = saved[0]["predicted_class_name"]
    filtered = history(client, alice, limit=2, class_name=name)
    expected = [s["prediction_uid"] for s in reversed(saved) if s["predicted_class_name"] == name]
    assert [i["uid"] for i in filtered] == expected and 0 < len(expected) < 12

    assert client.get(PREDICTIONS, params={"cursor": "garbage"},
                      headers=auth(alice)).status_code == 400
    assert client.get(PREDICTIONS, params={"limit": 1000}, headers=auth(alice)).status_code == 422
    assert client.get(PREDICTIONS).status_code == 401

    victim = saved[0]["prediction_uid"]
    for method, suffix in (("GET", ""), ("GET", "/image"), ("DELETE", "")):
        response = client.request(method, f"{PREDICTIONS}/{victim}{suffix}", headers=auth(bob))
        assert response.status_code == 404, (method, suffix, response.text)
    assert len(history(client, bob)) == 1

    image_files = list((tmp_path / "data" / "images").rglob(f"{victim}.jpg"))
    assert len(image_files) == 1
    assert client.delete(f"{PREDICTIONS}/{victim}", headers=auth(alice)).status_code == 204
    assert not image_files[0].exists()
    assert client.get(f"{PREDICTIONS}/{victim}", headers=auth(alice)).status_code == 404
    assert client.delete(f"{PREDICTIONS}/{victim}", headers=auth(alice)).status_code == 404
    assert len(history(client, alice)) == 11


def _dead_s3(**extra: object) -> dict[str, object]:
    """An S3 endpoint nothing listens on (loopback): uploads fail fast, saves stay pending."""
    return {
        "image_store": "s3",
        "local_s3_proxy_service_url": f"http://127.0.0.1:{free_port()}",
        "minio_root_user": "x",
        "minio_root_password": "y",
        "s3_timeout_s": 0.5,
        "s3_max_attempts": 1,
        "outbox_retry_base_s": 0.05,
        "outbox_retry_max_s": 0.5,
        "outbox_shutdown_grace_s": 0.5,
        **extra,
    }


def test_outbox_full_answers_503_with_retry_after(make_client: Callable[..., TestClient]) -> None:
    client = make_client(**_dead_s3(outbox_max_items=3))
    user = uuid.uuid4()
    for seed in range(3):
        assert save(client, user, seed=seed).status_code == 200
    response = save(client, user, seed=9)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"  # RETRY_AFTER_S
    assert "retry" in response.json()["detail"].lower()
    # Predictions without saving still work while the outbox is full.
    plain = client.post(PREDICT, files={"file": ("a.jpg", solid_jpeg((0, 0, 0)), "image/jpeg")},
                        headers=auth(user))
    assert plain.status_code == 200


def test_pending_saves_are_visible_deletable_and_survive_a_restart(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    client = make_client(**_dead_s3())
    user = uuid.uuid4()
    photo = jpeg_bytes(random_photo(seed=5))
    uids = [save(client, user, image=photo).json()["prediction_uid"] for _ in range(4)]
    store = client.app.state.rottenbot.predictions  # type: ignore[attr-defined]
    poll(lambda: store.drainer.failures > 0, message="the dead store was never tried")
    assert store.backlog == 4 and 0 < store.oldest_pending_age_s < 300

    # Read-your-writes while storage is down: listed, fetched, image served from the outbox.
    items = history(client, user, limit=3)
    assert [i["uid"] for i in items] == list(reversed(uids))
    assert {i["status"] for i in items} == {"pending"}
    image = client.get(f"{PREDICTIONS}/{uids[0]}/image", headers=auth(user))
    assert image.status_code == 200 and image.content == photo
    assert client.get(f"{PREDICTIONS}/{uids[0]}", headers=auth(uuid.uuid4())).status_code == 404

    # Deleting a pending save needs the image store (it may hold a partial upload): 503, kept.
    response = client.delete(f"{PREDICTIONS}/{uids[0]}", headers=auth(user))
    assert response.status_code == 503 and "retry-after" in response.headers
    assert store.backlog == 4

    client.__exit__(None, None, None)  # shutdown: the grace period passes, the rest stays

    restarted = make_client()  # same DATA_DIR, the local image store works
    store = restarted.app.state.rottenbot.predictions  # type: ignore[attr-defined]
    poll(lambda: store.backlog == 0, message="pending saves were not resumed")
    items = history(restarted, user)
    assert sorted(i["uid"] for i in items) == sorted(uids)
    assert {i["status"] for i in items} == {"stored"}
    for uid in uids:
        assert list((tmp_path / "data" / "images").rglob(f"{uid}.jpg"))
    assert restarted.delete(f"{PREDICTIONS}/{uids[0]}", headers=auth(user)).status_code == 204
