"""`rottenbot-inference export-dataset` against real PostgreSQL and moto's S3 server
(tests/servers_storage.py): layout, labels, manifest, deduplication, deleted predictions,
loading with Keras, resuming after `kill -9`, and unreachable backends. Without PostgreSQL or
moto these tests fail when CI=true and are skipped otherwise.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from sqlalchemy.engine import make_url

from rottenbot_inference.storage.db import PredictionRepository, create_engine, migrate
from rottenbot_inference.storage.records import FeedbackRecord, PredictionRecord
from tests.helpers import class_map, free_port, jpeg_bytes, png_bytes, random_photo
from tests.servers_storage import (
    MotoS3Server,
    PostgresServer,
    bucket_fixture,  # noqa: F401  (registers the `bucket` fixture)
    database_fixture,  # noqa: F401  (registers the `database` fixture)
    moto_s3_fixture,  # noqa: F401  (registers the module-scoped `moto_s3` fixture)
    poll,
    postgres_fixture,  # noqa: F401  (registers the module-scoped `postgres` fixture)
)

CLASSES = list(class_map().values())
START = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


@dataclass
class Seed:
    """A saved prediction to put in the database and bucket."""

    user: uuid.UUID
    predicted: int
    confidence: float
    image: bytes
    feedback: int | None = None
    model_version: str | None = "v1"
    key: str | None = None  # default: this service's layout
    with_hash: bool = True
    record: PredictionRecord | None = None


async def _seed(url: str, seeds: list[Seed]) -> None:
    await migrate(make_url(url))
    engine = create_engine(make_url(url))
    try:
        repository = PredictionRepository(engine)
        await repository.insert_many([s.record for s in seeds if s.record is not None])
        for s in seeds:
            if s.feedback is not None and s.record is not None:
                await repository.set_feedback(FeedbackRecord(
                    s.record.uid, s.user, s.feedback, CLASSES[s.feedback], s.model_version,
                    s.feedback == s.predicted, dt.datetime.now(dt.UTC),
                ))
    finally:
        await engine.dispose()


def seed(postgres: PostgresServer, database: str, moto_s3: MotoS3Server, bucket: str,
         seeds: list[Seed]) -> list[Seed]:
    s3 = moto_s3.client()
    if bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=bucket)
    for index, s in enumerate(seeds):
        uid = uuid.uuid4()
        created = START + dt.timedelta(minutes=index)
        key = s.key or f"{s.user}/{created:%Y/%m/%d}/{uid}.jpg"
        s.record = PredictionRecord(
            uid=uid, user_uid=s.user, created_at=created, image_path=key,
            predicted_class=s.predicted, predicted_class_name=CLASSES[s.predicted],
            confidence=s.confidence, model_version=s.model_version,
            image_sha256=hashlib.sha256(s.image).hexdigest() if s.with_hash else None,
        )
        s3.put_object(Bucket=bucket, Key=key, Body=s.image)
    asyncio.run(_seed(postgres.url(database), seeds))
    return seeds


async def _delete(url: str, user: uuid.UUID, uid: uuid.UUID) -> None:
    engine = create_engine(make_url(url))
    try:
        assert await PredictionRepository(engine).delete(user, uid)
    finally:
        await engine.dispose()


def export_env(postgres: PostgresServer, database: str, moto_s3: MotoS3Server, bucket: str,
               **extra: str) -> dict[str, str]:
    return {
        **os.environ, **moto_s3.env(bucket), "DATABASE_URL": postgres.url(database),
        "S3_TIMEOUT_S": "2", "S3_MAX_ATTEMPTS": "1", **extra,
    }


def export(env: dict[str, str], out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rottenbot_inference", "export-dataset", "--out", str(out),
         *args], env=env, capture_output=True, text=True, timeout=300,
    )


def tree(out: Path) -> dict[str, set[str]]:
    """Class folder -> file names (every class folder, empty ones included)."""
    return {
        folder.name: {path.name for path in folder.iterdir()}
        for folder in out.iterdir() if folder.is_dir()
    }


def manifest(out: Path) -> list[dict[str, str]]:
    with (out / "manifest.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def photo(index: int) -> bytes:
    return jpeg_bytes(random_photo(32, 32, seed=index))


def test_export_layout_labels_manifest_dedup_deletions_and_keras(
    postgres: PostgresServer, database: str, moto_s3: MotoS3Server, bucket: str,
    tmp_path: Path, tiny_model: Path,
) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    png = png_bytes(Image.fromarray(random_photo(32, 32, seed=7)))
    seeds = seed(postgres, database, moto_s3, bucket, [
        Seed(alice, 0, 0.95, photo(0)),  # 0: confident prediction
        Seed(alice, 1, 0.50, photo(1), feedback=2),  # 1: corrected by its owner
        Seed(bob, 3, 0.50, photo(2)),  # 2: unsure, no feedback: no label
        Seed(bob, 3, 0.99, photo(3), feedback=3),  # 3: confirmed
        Seed(alice, 0, 0.97, photo(0)),  # 4: the same bytes as 0
        Seed(alice, 4, 0.99, photo(5), model_version="v2"),  # 5: another version
        Seed(bob, 5, 0.99, photo(6)),  # 6: deleted before the export
        # 7: the previous service's row: flat `.jpg` key holding a PNG, no hash, no version
        Seed(alice, 0, 0.92, png, model_version=None, key="20240304_050607_abcd.jpg",
             with_hash=False),
    ])
    records = [s.record for s in seeds]
    assert all(records)
    uids = [str(r.uid) for r in records if r is not None]
    asyncio.run(_delete(postgres.url(database), bob, uuid.UUID(uids[6])))
    env = export_env(postgres, database, moto_s3, bucket, MODEL_PATH=str(tiny_model))

    out = tmp_path / "both"
    result = export(env, out)
    assert result.returncode == 0, result.stderr
    assert "5 images" in result.stdout and "1 duplicates" in result.stdout
    expected = {
        CLASSES[0]: {f"{uids[0]}.jpg", f"{uids[7]}.png"},
        CLASSES[2]: {f"{uids[1]}.jpg"},
        CLASSES[3]: {f"{uids[3]}.jpg"},
        CLASSES[4]: {f"{uids[5]}.jpg"},
    }
    found = tree(out)
    assert set(found) == set(CLASSES)  # every class folder, so indices line up
    assert {name: files for name, files in found.items() if files} == expected
    assert (out / CLASSES[0] / f"{uids[7]}.png").read_bytes() == png

    rows = {row["prediction_uid"]: row for row in manifest(out)}
    assert set(rows) == {uids[0], uids[1], uids[3], uids[5], uids[7]}
    assert list(manifest(out)[0]) == [
        "prediction_uid", "user_hash", "label", "label_source", "model_version", "confidence",
        "created_at", "sha256", "path",
    ]
    assert (rows[uids[1]]["label"], rows[uids[1]]["label_source"]) == (CLASSES[2], "feedback")
    assert (rows[uids[0]]["label"], rows[uids[0]]["label_source"]) == (CLASSES[0], "predicted")
    assert rows[uids[5]]["model_version"] == "v2" and rows[uids[7]]["model_version"] == ""
    assert float(rows[uids[3]]["confidence"]) == 0.99
    assert dt.datetime.fromisoformat(rows[uids[0]]["created_at"]) == START
    for uid, row in rows.items():
        data = (out / row["path"]).read_bytes()
        assert row["sha256"] == hashlib.sha256(data).hexdigest(), uid
    # The user is a salted hash: stable per user, different between users, never the uid.
    assert rows[uids[0]]["user_hash"] == rows[uids[1]]["user_hash"] == rows[uids[7]]["user_hash"]
    assert rows[uids[0]]["user_hash"] != rows[uids[3]]["user_hash"]
    text = (out / "manifest.csv").read_text()
    assert str(alice) not in text and str(bob) not in text
    assert alice.hex not in text and uids[6] not in text

    # Keras reads it with the model's class order: the expected count per class.
    import keras

    dataset = keras.utils.image_dataset_from_directory(
        out, class_names=CLASSES, image_size=(32, 32), batch_size=4, shuffle=False
    )
    counts: dict[int, int] = {}
    for _, labels in dataset:
        for label in labels.numpy().tolist():
            counts[label] = counts.get(label, 0) + 1
    assert counts == {0: 2, 2: 1, 3: 1, 4: 1}

    # Filters. Owners' feedback only:
    only_feedback = export(env, tmp_path / "fb", "--labels", "feedback")
    assert only_feedback.returncode == 0, only_feedback.stderr
    assert {r["prediction_uid"] for r in manifest(tmp_path / "fb")} == {uids[1], uids[3]}
    # Predictions only, confident ones: 0 is below, so its duplicate 4 is the one exported.
    classes_file = tmp_path / "classes.json"
    classes_file.write_text(json.dumps(class_map()))
    predicted = export(env, tmp_path / "pred", "--labels", "predicted", "--min-confidence",
                       "0.96", "--classes", str(classes_file))
    assert predicted.returncode == 0, predicted.stderr
    assert {(r["prediction_uid"], r["label_source"]) for r in manifest(tmp_path / "pred")} == {
        (uids[3], "predicted"), (uids[4], "predicted"), (uids[5], "predicted")}
    # One model version; a time range.
    v2 = export(env, tmp_path / "v2", "--model-version", "v2")
    assert {r["prediction_uid"] for r in manifest(tmp_path / "v2")} == {uids[5]}, v2.stderr
    since, until = (f"{START + dt.timedelta(minutes=m):%Y-%m-%d %H:%M:%S}" for m in (1, 4))
    window = export(env, tmp_path / "window", "--since", since, "--until", until)
    assert {r["prediction_uid"] for r in manifest(tmp_path / "window")} == {uids[1], uids[3]}, (
        window.stderr)

    # A prediction deleted after an export is gone from the next run into the same folder,
    # with its file; the rest is verified and reused, not downloaded again.
    asyncio.run(_delete(postgres.url(database), alice, uuid.UUID(uids[1])))
    again = export(env, out)
    assert again.returncode == 0, again.stderr
    assert "(0 downloaded, 4 already there)" in again.stdout and "1 stale" in again.stdout
    assert {r["prediction_uid"] for r in manifest(out)} == {uids[0], uids[3], uids[5], uids[7]}
    assert not (out / CLASSES[2] / f"{uids[1]}.jpg").exists()
    assert all(uids[1] not in name for files in tree(out).values() for name in files)


def test_resume_after_kill_9_leaves_no_partial_file_and_finishes(
    postgres: PostgresServer, database: str, moto_s3: MotoS3Server, bucket: str,
    tmp_path: Path,
) -> None:
    count = 150
    user = uuid.uuid4()
    seeds = seed(postgres, database, moto_s3, bucket, [
        Seed(user, index % 3, 0.99, jpeg_bytes(random_photo(64, 64, seed=1000 + index)))
        for index in range(count)
    ])
    hashes = {hashlib.sha256(s.image).hexdigest() for s in seeds}
    classes_file = tmp_path / "classes.json"
    classes_file.write_text(json.dumps(class_map()))
    env = export_env(postgres, database, moto_s3, bucket, S3_TIMEOUT_S="30")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "rottenbot_inference", "export-dataset", "--out", str(out),
               "--classes", str(classes_file), "--jobs", "2"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    journal = out / ".export-journal.jsonl"

    def journalled() -> int:
        return len(journal.read_text().splitlines()) if journal.exists() else 0

    try:
        poll(lambda: journalled() >= 10 or process.poll() is not None,
             message="the export never got going")
        moto_s3.pause()  # downloads hang mid-flight: the kill lands during them
        try:
            assert process.poll() is None, "the export finished before it could be killed"
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            moto_s3.resume()
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    done_before = journalled()
    assert 10 <= done_before < count
    # No partial image anywhere a reader looks: every file in a class folder is complete.
    images = [path for folder in out.iterdir() if folder.is_dir() for path in folder.iterdir()]
    assert images and all(path.suffix == ".jpg" for path in images)
    for path in images:
        assert hashlib.sha256(path.read_bytes()).hexdigest() in hashes, path
    assert not (out / "manifest.csv").exists()

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{count} images" in result.stdout
    reused = int(result.stdout.split(" downloaded, ")[1].split(" already")[0])
    assert reused >= done_before - 2  # a line cut by the kill is re-checked and re-fetched
    assert "exporting up to 150 images" in result.stderr  # plain counts: not a terminal
    rows = manifest(out)
    assert len(rows) == count and {row["sha256"] for row in rows} == hashes
    assert not list(out.glob(".export-*.part"))
    for row in rows:
        assert hashlib.sha256((out / row["path"]).read_bytes()).hexdigest() == row["sha256"]


def test_unreachable_database_or_image_store_is_a_clear_nonzero_exit(
    postgres: PostgresServer, database: str, moto_s3: MotoS3Server, bucket: str,
    tmp_path: Path,
) -> None:
    seed(postgres, database, moto_s3, bucket, [Seed(uuid.uuid4(), 0, 0.99, photo(0))])
    classes_file = tmp_path / "classes.json"
    classes_file.write_text(json.dumps(class_map()))
    env = export_env(postgres, database, moto_s3, bucket)
    down = {**env, "DATABASE_URL": postgres.url(database).replace(
        f":{postgres.port}/", f":{free_port()}/")}
    result = export(down, tmp_path / "a", "--classes", str(classes_file))
    assert result.returncode == 3, result.stderr
    assert "database cannot be reached" in result.stderr and "Traceback" not in result.stderr

    moto_s3.pause()
    try:
        result = export(env, tmp_path / "b", "--classes", str(classes_file))
    finally:
        moto_s3.resume()
    assert result.returncode == 4, result.stderr
    assert "image store" in result.stderr and "Traceback" not in result.stderr


def test_a_terminal_gets_a_progress_bar(
    postgres: PostgresServer, database: str, moto_s3: MotoS3Server, bucket: str,
    tmp_path: Path,
) -> None:
    import pty

    seed(postgres, database, moto_s3, bucket,
         [Seed(uuid.uuid4(), index, 0.99, photo(index)) for index in range(3)])
    classes_file = tmp_path / "classes.json"
    classes_file.write_text(json.dumps(class_map()))
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "rottenbot_inference", "export-dataset", "--out",
             str(tmp_path / "out"), "--classes", str(classes_file)],
            env=export_env(postgres, database, moto_s3, bucket), stdin=terminal,
            stdout=terminal, stderr=terminal,
        )
        os.close(terminal)
        output = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(timeout=120) == 0, output.decode(errors="replace")
    finally:
        os.close(controller)
    text = output.decode(errors="replace")
    assert "exporting" in text and "100%" in text, text
    assert "exporting up to" not in text  # the plain counts are for pipes and logs
