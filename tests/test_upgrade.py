"""Upgrade in place from the original RottenBot inference service (see docs/upgrading.md).

The original service's database and bucket are rebuilt the way it wrote them: its table as its
model declared it (no Alembic, VARCHAR, naive `timestamp`), rows inserted through asyncpg with
naive datetimes, images under flat keys `<yyyymmdd_hhmmss>_<hex>.jpg` stored without a content
type. Then our migrations run on it (twice) and this service starts on the same database and
bucket. During a rolling upgrade the original service keeps writing, so it inserts again after
the migration, with its columns only.

Every future migration must keep this test passing (CONTRIBUTING.md, "Database migrations").
Without PostgreSQL or moto it fails when CI=true and is skipped otherwise.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from alembic.script import ScriptDirectory
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.engine import make_url

from rottenbot_inference.storage.db import MIGRATIONS_DIR, VERSION_TABLE, create_engine, migrate
from tests.helpers import auth, jpeg_bytes, png_bytes, random_photo
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

# The original service's table, as its SQLModel class created it (str -> VARCHAR, datetime ->
# timestamp without time zone, every field NOT NULL, image_path unique). Its writes go through
# this definition too: only these columns, naive datetimes.
ORIGINAL = sa.Table(
    "predictions",
    sa.MetaData(),
    sa.Column("uid", sa.Uuid(), primary_key=True),
    sa.Column("image_path", sa.String(), nullable=False, unique=True),
    sa.Column("predicted_class", sa.Integer(), nullable=False),
    sa.Column("predicted_class_name", sa.String(), nullable=False),
    sa.Column("confidence", sa.Float(), nullable=False),
    sa.Column("user_uid", sa.Uuid(), nullable=False),
    sa.Column("created_at", sa.DateTime(), nullable=False),
)
ORIGINAL_COLUMNS = [column.name for column in ORIGINAL.columns]


def original_key(created_at: dt.datetime) -> str:
    """The original service's object key: flat, timestamped, always `.jpg`."""
    return f"{created_at:%Y%m%d_%H%M%S}_{secrets.token_hex(4)}.jpg"


def original_row(user: uuid.UUID, created_at: dt.datetime, class_index: int) -> dict[str, Any]:
    return {
        "uid": uuid.uuid4(),
        "image_path": original_key(created_at),
        "predicted_class": class_index,
        "predicted_class_name": f"Class__{class_index}",
        "confidence": 0.5 + class_index / 100,
        "user_uid": user,
        "created_at": created_at,  # naive, UTC wall time (the containers ran in UTC)
    }


async def _original_writes(url: str, rows: list[dict[str, Any]], create: bool) -> None:
    engine = create_engine(make_url(url))  # asyncpg, as the original service used
    try:
        async with engine.begin() as connection:
            if create:
                await connection.run_sync(ORIGINAL.metadata.create_all)
            await connection.execute(ORIGINAL.insert(), rows)
    finally:
        await engine.dispose()


def original_save(
    postgres: PostgresServer, database: str, moto_s3: MotoS3Server, bucket: str,
    rows: list[dict[str, Any]], images: list[bytes], create: bool = False,
) -> None:
    """What the original service did for each save: the object (no content type), then the row."""
    s3 = moto_s3.client()
    for row, data in zip(rows, images, strict=True):
        s3.put_object(Bucket=bucket, Key=row["image_path"], Body=data)
    asyncio.run(_original_writes(postgres.url(database), rows, create))


def schema(postgres: PostgresServer, database: str) -> dict[str, str]:
    """Columns (type, nullability, default), indexes and constraints of `predictions`."""
    columns = postgres.psql(
        "SELECT column_name, data_type || '|' || is_nullable || '|' || "
        "coalesce(column_default, '') FROM information_schema.columns "
        "WHERE table_name = 'predictions' ORDER BY column_name", database,
    )
    indexes = postgres.psql(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'predictions'", database
    )
    constraints = postgres.psql(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = 'predictions'::regclass", database,
    )
    return {
        f"{kind}:{line.split('|', 1)[0]}": line.split("|", 1)[1]
        for kind, text in (("column", columns), ("index", indexes), ("constraint", constraints))
        for line in text.splitlines()
    }


def stored_values(postgres: PostgresServer, database: str) -> list[list[str]]:
    """uid, image_path, class name and created_at (as UTC) of every row, by uid."""
    created = "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')"
    return prediction_rows(
        postgres, database, f"uid, image_path, predicted_class_name, {created}", order_by="uid"
    )


def expected_values(rows: list[dict[str, Any]]) -> list[list[str]]:
    return sorted(
        [str(row["uid"]), row["image_path"], row["predicted_class_name"],
         f"{row['created_at']:%Y-%m-%d %H:%M:%S.%f}"]
        for row in rows
    )


def set_time_zone(postgres: PostgresServer, database: str, zone: str) -> None:
    """The database's default TimeZone for new sessions."""
    postgres.psql(f"ALTER DATABASE \"{database}\" SET timezone TO '{zone}'")


def served_as(image: bytes) -> str:
    return "image/png" if image.startswith(b"\x89PNG") else "image/jpeg"


def test_upgrade_in_place_from_the_original_service(
    make_client: Callable[..., TestClient], postgres: PostgresServer, database: str,
    moto_s3: MotoS3Server, bucket: str,
) -> None:
    # --- the original deployment: its table, rows, bucket and objects --------------------------
    # A server time zone other than UTC for the migration: old values must still be read as UTC.
    set_time_zone(postgres, database, "Asia/Kolkata")
    moto_s3.client().create_bucket(Bucket=bucket)
    alice, bob = uuid.uuid4(), uuid.uuid4()
    old_rows = [
        original_row(alice, dt.datetime(2024, 3, 4, 5, 6, 7, 123456), 1),
        original_row(bob, dt.datetime(2024, 3, 5, 8, 0, 0), 2),
        # A PNG upload: the original service still named it `.jpg`.
        original_row(alice, dt.datetime(2024, 4, 1, 23, 59, 59), 3),
    ]
    old_images = [
        jpeg_bytes(random_photo(seed=1)),
        jpeg_bytes(random_photo(seed=2)),
        png_bytes(Image.fromarray(random_photo(120, 160, seed=3))),
    ]
    original_save(postgres, database, moto_s3, bucket, old_rows, old_images, create=True)
    head = moto_s3.client().head_object(Bucket=bucket, Key=old_rows[0]["image_path"])
    assert head["ContentType"] == "binary/octet-stream"  # what S3 says when none was given

    # --- our migrations, twice: the second run changes nothing --------------------------------
    url = make_url(postgres.url(database))
    asyncio.run(migrate(url))
    migrated = schema(postgres, database)
    asyncio.run(migrate(url))
    assert schema(postgres, database) == migrated
    head_revision = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    assert postgres.psql(f"SELECT version_num FROM {VERSION_TABLE}", database) == head_revision
    assert stored_values(postgres, database) == expected_values(old_rows)  # times read as UTC

    # Additive only: the original columns are all there, and every column we added can be left
    # out of an insert (nullable or defaulted), so the original service keeps working.
    for name in ORIGINAL_COLUMNS:
        assert f"column:{name}" in migrated, f"{name} was dropped or renamed"
    for key, definition in migrated.items():
        if key.startswith("column:") and key.removeprefix("column:") not in ORIGINAL_COLUMNS:
            _, nullable, default = definition.split("|", 2)
            assert nullable == "YES" or default, f"{key} is NOT NULL without a default"

    # --- this service on the same database and bucket ----------------------------------------
    # The original replicas write naive times, which PostgreSQL now reads in the session's time
    # zone: UTC, as the postgres image runs (docs/upgrading.md).
    set_time_zone(postgres, database, "UTC")
    client = make_client(**storage_overrides(postgres, database, moto_s3, bucket))
    assert schema(postgres, database) == migrated  # its migration on start did nothing either

    # Mixed fleet: an original replica, still running, saves after the migration.
    mixed_row = original_row(alice, dt.datetime(2024, 6, 1, 12, 0, 0), 4)
    mixed_image = jpeg_bytes(random_photo(seed=4))
    original_save(postgres, database, moto_s3, bucket, [mixed_row], [mixed_image])

    listed = history(client, alice)
    assert [item["uid"] for item in listed] == [
        str(row["uid"]) for row in (mixed_row, old_rows[2], old_rows[0])
    ]
    assert [item["uid"] for item in history(client, bob)] == [str(old_rows[1]["uid"])]
    by_uid = {item["uid"]: item for item in listed}
    for row in (mixed_row, old_rows[2], old_rows[0]):
        item = by_uid[str(row["uid"])]
        assert dt.datetime.fromisoformat(item["created_at"]) == row["created_at"].replace(
            tzinfo=dt.UTC
        )
        assert (item["predicted_class"], item["predicted_class_name"]) == (
            row["predicted_class"], row["predicted_class_name"],
        )
        assert item["status"] == "stored" and "model_version" not in item

    # Their images stream back as images: the type comes from the bytes, not the metadata.
    for row, data in [*zip(old_rows, old_images, strict=True), (mixed_row, mixed_image)]:
        response = client.get(f"{PREDICTIONS}/{row['uid']}/image", headers=auth(row["user_uid"]))
        assert response.status_code == 200, response.text
        assert response.content == data
        assert response.headers["content-type"] == served_as(data)
        assert response.headers["x-content-type-options"] == "nosniff"

    # A new save works beside them, and its object carries the type of its bytes (a PNG the
    # client declared as image/jpg is stored as image/png, under our key layout).
    new_image = png_bytes(Image.fromarray(random_photo(120, 160, seed=5)))
    response = save(client, alice, image=new_image, content_type="image/jpg")
    assert response.status_code == 200, response.text
    new_uid = response.json()["prediction_uid"]
    row = poll(lambda: prediction_rows(postgres, database, "image_path, content_type",
                                       where=f"uid = '{new_uid}'"),
               message="the new save never reached the database")
    key, content_type = row[0]
    assert key.startswith(f"{alice}/") and key.endswith(f"/{new_uid}.png")
    assert content_type == "image/png"
    assert moto_s3.client().head_object(Bucket=bucket, Key=key)["ContentType"] == "image/png"
    assert [item["uid"] for item in history(client, alice)] == [new_uid, *by_uid]
    image = client.get(f"{PREDICTIONS}/{new_uid}/image", headers=auth(alice))
    assert image.content == new_image and image.headers["content-type"] == "image/png"

    # An old prediction can be deleted like a new one: row and flat-keyed object both go.
    victim = old_rows[0]
    response = client.delete(f"{PREDICTIONS}/{victim['uid']}", headers=auth(alice))
    assert response.status_code == 204
    assert prediction_rows(postgres, database, where=f"uid = '{victim['uid']}'") == []
    assert victim["image_path"] not in bucket_objects(moto_s3, bucket)

    # And the migrations stay idempotent on the upgraded, in-use database.
    asyncio.run(migrate(url))
    assert schema(postgres, database) == migrated
