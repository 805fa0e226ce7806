"""The outbox on a small volume: bounded by free space, able to drain from a volume filled to the
last byte, recovering without a restart. Real PostgreSQL, moto's S3 server and a tmpfs the test
mounts (root; CI runs as root, elsewhere the tests skip when mounting is not allowed).

The scenario each test reproduces was seen by an operator: DATA_DIR on a 40 MB volume, S3 down
while ~200 KB photos keep being saved; deletes of drained items then failed for lack of room for
SQLite's write-ahead log, and the service never recovered.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from rottenbot_inference.storage.outbox import Outbox
from rottenbot_inference.storage.records import PredictionRecord, object_key
from tests.helpers import auth, free_port, jpeg_bytes, process_env
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
    save,
    storage_overrides,
)
from tests.volumes import MiB, mounted_ext4, mounted_tmpfs

VOLUME_MB = 40
# Saves are refused once less than this would stay free; the ballast is held back besides.
DISK_SETTINGS = {
    "outbox_min_free_bytes": 4 * MiB,
    "outbox_min_free_percent": 0,
    "outbox_ballast_bytes": 1 * MiB,
    "outbox_max_bytes": 10**10,
    "outbox_max_items": 100_000,
}


def photo(seed: int) -> bytes:
    """A ~200 KB JPEG (noise compresses badly), like a phone photo after the app's resize."""
    pixels = np.random.default_rng(seed).integers(0, 256, (520, 520, 3), dtype=np.uint8)
    return jpeg_bytes(pixels, quality=90)


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A 40 MB tmpfs, mounted for this test only."""
    with mounted_tmpfs(tmp_path / "volume", VOLUME_MB) as folder:
        yield folder


def free_bytes(folder: Path) -> int:
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize


def fill_to_the_last_byte(folder: Path) -> Path:
    """Another program fills the volume: write until the file system refuses even one byte."""
    filler = folder / "someone-elses-file"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (MiB, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)
    assert free_bytes(folder) == 0
    return filler


def uids_in(postgres: PostgresServer, database: str) -> list[str]:
    return sorted(r[0] for r in prediction_rows(postgres, database, "uid", "true", "uid"))


def save_until_refused(
    post: Callable[[int], httpx.Response], limit: int = 400
) -> tuple[list[str], httpx.Response]:
    """Save photos until the outbox refuses one; the acknowledged uids and the refusal."""
    acknowledged: list[str] = []
    for seed in range(limit):
        response = post(seed)
        if response.status_code != 200:
            return acknowledged, response
        acknowledged.append(response.json()["prediction_uid"])
    raise AssertionError(f"{limit} saves of ~200 KB all accepted on a {VOLUME_MB} MB volume")


# --- the outbox alone -------------------------------------------------------------------------


def record() -> PredictionRecord:
    uid, user = uuid.uuid4(), uuid.uuid4()
    now = dt.datetime.now(dt.UTC)
    return PredictionRecord(
        uid=uid, user_uid=user, created_at=now, image_path=object_key(user, now, uid, "jpg"),
        predicted_class=1, predicted_class_name="Class01__Rotten", confidence=0.5,
        model_version="v1", content_type="image/jpeg", image_format="jpeg",
    )


def test_the_ballast_lets_the_outbox_reopen_and_drain_a_volume_filled_by_others(
    tmp_path: Path,
) -> None:
    """Stopped cleanly (SQLite removes its WAL and shared-memory files), the volume then filled
    to the last byte by someone else: opening needs new files. With the ballast the outbox
    opens and drains; without it, it cannot even open (the control)."""

    async def fill_and_reopen(folder: Path, ballast: int) -> Outbox:
        outbox = Outbox(folder, 1000, 10**9, ballast_bytes=ballast)
        await outbox.open()
        records = [record() for _ in range(50)]
        await asyncio.gather(*(outbox.add(r, b"tiny image") for r in records))
        await outbox.close()
        fill_to_the_last_byte(folder.parent)
        reopened = Outbox(folder, 1000, 10**9, ballast_bytes=ballast)
        await reopened.open()
        return reopened

    async def scenario(root: Path) -> None:
        reopened = await fill_and_reopen(root / "outbox", ballast=1 * MiB)
        assert reopened.backlog == 50 and reopened.budget.ballast_releases == 1
        await reopened.remove([e.uid for e in reopened.entries()])
        await reopened.close()
        again = Outbox(root / "outbox", 1000, 10**9)
        await again.open()
        assert again.backlog == 0  # the deletes were committed
        assert list((root / "outbox" / "images").iterdir()) == []
        await again.close()

    async def control(root: Path) -> None:
        with pytest.raises(Exception, match=r"disk|full"):
            await fill_and_reopen(root / "outbox", ballast=0)

    with mounted_tmpfs(tmp_path / "a", 8) as root:
        asyncio.run(scenario(root))
    with mounted_tmpfs(tmp_path / "b", 8) as root:
        asyncio.run(control(root))


# --- through the service ----------------------------------------------------------------------


def test_fill_during_an_s3_outage_then_recover_without_a_restart(
    volume: Path, make_client: Callable[..., TestClient], postgres: PostgresServer,
    database: str, moto_s3: MotoS3Server, bucket: str,
) -> None:
    client = make_client(**storage_overrides(
        postgres, database, moto_s3, bucket, outbox_dir=volume / "outbox", s3_max_attempts=1,
        **DISK_SETTINGS,
    ))
    store = client.app.state.rottenbot.predictions  # type: ignore[attr-defined]
    user = uuid.uuid4()
    moto_s3.pause()
    try:
        acknowledged, refused = save_until_refused(lambda s: save(client, user, image=photo(s)))
        # The reserve stops saves before the volume fills: a clear 503, predictions still work.
        assert len(acknowledged) >= 100
        assert refused.status_code == 503 and "retry-after" in refused.headers
        assert "nearly full" in refused.json()["detail"]
        assert store.outbox.refused["disk_reserve"] >= 1
        assert free_bytes(volume) >= DISK_SETTINGS["outbox_min_free_bytes"]
        plain = client.post(PREDICT, files={"file": ("a.jpg", photo(1), "image/jpeg")},
                            headers=auth(user))
        assert plain.status_code == 200
        assert client.get("/health/ready").status_code == 200
        # Someone else fills the rest, to the last byte.
        fill_to_the_last_byte(volume)
        assert save(client, user, image=photo(999)).status_code == 503
        assert uids_in(postgres, database) == []
    finally:
        moto_s3.resume()
    # Every acknowledged save arrives exactly once; the space comes back; saves are accepted.
    poll(lambda: store.backlog == 0, timeout_s=180, message="the backlog never drained")
    assert uids_in(postgres, database) == sorted(acknowledged)
    assert len(bucket_objects(moto_s3, bucket)) == len(acknowledged)
    assert list((volume / "outbox" / "images").iterdir()) == []
    again = poll(lambda: (r := save(client, user, image=photo(1000))).status_code == 200 and r,
                 timeout_s=30, message="saves were not accepted again after the drain")
    assert again.json()["prediction_uid"]
    assert outbox_rows(volume) <= 1  # the drained rows were deleted, not just forgotten


def test_kill_9_while_the_disk_is_full_then_restart_drains(
    converted_tiny_model: Path, shared_cache: Path, tmp_path: Path, volume: Path,
    postgres: PostgresServer, database: str, moto_s3: MotoS3Server, bucket: str,
) -> None:
    env = {
        **process_env(converted_tiny_model, shared_cache, volume),  # DATA_DIR on the tmpfs
        "DATABASE_URL": postgres.url(database),
        **moto_s3.env(bucket),
        "S3_TIMEOUT_S": "2",
        "S3_MAX_ATTEMPTS": "1",
        "OUTBOX_RETRY_MAX_S": "1",
        **{key.upper(): str(value) for key, value in DISK_SETTINGS.items()},
    }
    service = ServiceProcess(env, tmp_path / "service.log")
    user = uuid.uuid4()

    def post(seed: int) -> httpx.Response:
        return httpx.post(
            f"{service.base_url}{PREDICT}?save_prediction=True",
            files={"file": ("a.jpg", photo(seed), "image/jpeg")}, headers=auth(user), timeout=60,
        )

    try:
        service.start()
        moto_s3.pause()
        acknowledged, refused = save_until_refused(post)
        assert refused.status_code == 503 and len(acknowledged) >= 100
        fill_to_the_last_byte(volume)
        service.kill()
        assert outbox_rows(volume) == len(acknowledged)
        moto_s3.resume()
        service.start()  # on a volume with not one byte free
        poll(lambda: outbox_rows(volume) == 0 and len(uids_in(postgres, database))
             == len(acknowledged), timeout_s=180,
             message=f"the backlog did not drain after the restart:\n{service.log_tail()}")
        assert uids_in(postgres, database) == sorted(acknowledged)
        poll(lambda: post(5000).status_code == 200, timeout_s=30,
             message="saves were not accepted again")
    finally:
        if moto_s3.paused:
            moto_s3.resume()
        service.stop()


def test_a_volume_gone_read_only_refuses_saves_clearly_and_never_crash_loops(
    make_client: Callable[..., TestClient], tmp_path: Path, postgres: PostgresServer,
    database: str, moto_s3: MotoS3Server, bucket: str,
) -> None:
    """ext4 with errors=remount-ro, as a failing disk does it: the kernel turns the volume
    read-only under the running service. Saves get a clear 503 while predictions and readiness
    go on; the service stops cleanly. Started again on the still read-only volume it comes up
    (no crash loop) refusing saves, and accepts them, without a restart, once the volume is
    writable again; nothing acknowledged before is lost."""
    overrides = storage_overrides(
        postgres, database, moto_s3, bucket, outbox_dir=tmp_path / "volume" / "outbox",
        s3_max_attempts=1, **DISK_SETTINGS,
    )
    user = uuid.uuid4()
    with mounted_ext4(tmp_path / "volume", VOLUME_MB) as volume:
        client = make_client(**overrides)
        store = client.app.state.rottenbot.predictions  # type: ignore[attr-defined]
        moto_s3.pause()  # these stay in the outbox
        try:
            before = [save(client, user, image=photo(s)).json()["prediction_uid"]
                      for s in range(3)]
            volume.fail()  # the kernel's emergency read-only
            for seed in range(5):
                refused = save(client, user, image=photo(100 + seed))
                assert refused.status_code == 503 and "retry-after" in refused.headers
                assert "read-only" in refused.json()["detail"], refused.text
            assert store.outbox.refused["read_only"] == 5
            plain = client.post(PREDICT, files={"file": ("a.jpg", photo(1), "image/jpeg")},
                                headers=auth(user))
            assert plain.status_code == 200
            assert client.get("/health/ready").status_code == 200
        finally:
            moto_s3.resume()
        client.__exit__(None, None, None)  # a clean stop on a read-only volume
        volume.repair_and_mount(read_only=True)

        again = make_client(**overrides)  # starts and becomes ready: no crash loop
        store = again.app.state.rottenbot.predictions  # type: ignore[attr-defined]
        refused = save(again, user, image=photo(300))
        assert refused.status_code == 503 and "read-only" in refused.json()["detail"]
        volume.remount_writable()
        after = poll(lambda: (r := save(again, user, image=photo(301))).status_code == 200 and r,
                     timeout_s=60, message="saves not accepted once the volume was writable")
        expected = sorted([*before, after.json()["prediction_uid"]])
        poll(lambda: uids_in(postgres, database) == expected and store.backlog == 0,
             message="saves made around the read-only spell did not all arrive")


def test_s3_refusing_the_credentials_keeps_saves_durable_until_they_are_fixed(
    converted_tiny_model: Path, shared_cache: Path, tmp_path: Path,
    postgres: PostgresServer, database: str,
) -> None:
    """An S3 server that checks credentials (moto with authentication on) and a service given
    the wrong ones: saves are acknowledged up to the bound, the failures are counted and logged
    once as 'image_store_denied', the items parked; restarted with the right credentials, the
    service drains every one of them."""
    s3 = AuthenticatingS3(tmp_path / "moto.log")
    s3.start()
    data_dir = tmp_path / "data"
    try:
        base = {
            **process_env(converted_tiny_model, shared_cache, data_dir),
            "DATABASE_URL": postgres.url(database),
            "LOCAL_S3_PROXY_SERVICE_URL": s3.url, "S3_BUCKET": "images",
            "S3_TIMEOUT_S": "3", "OUTBOX_RETRY_MAX_S": "1", "OUTBOX_MAX_ITEMS": "120",
        }
        wrong = ServiceProcess(
            {**base, "MINIO_ROOT_USER": "AKIAWRONGWRONGWRONG1", "MINIO_ROOT_PASSWORD": "nope"},
            tmp_path / "wrong.log",
        )
        user = uuid.uuid4()

        def post(url: str, seed: int) -> httpx.Response:
            return httpx.post(
                f"{url}{PREDICT}?save_prediction=True",
                files={"file": ("a.jpg", photo(seed), "image/jpeg")}, headers=auth(user),
                timeout=60,
            )

        wrong.start()
        try:
            acknowledged, refused = save_until_refused(lambda s: post(wrong.base_url, s))
            assert len(acknowledged) == 120 and refused.status_code == 503

            def denied_metrics() -> str | None:
                text = httpx.get(f"{wrong.base_url}/metrics").text
                return text if 'reason="image_store_denied"' in text else None

            metrics = poll(denied_metrics, message="no image_store_denied failures in /metrics")
            assert "inference_outbox_parked" in metrics
        finally:
            wrong.stop()
        log = (tmp_path / "wrong.log").read_text()
        # Logged once per change of state, not once per item (120) or attempt.
        assert 1 <= log.count("image_store_denied") <= 2
        assert uids_in(postgres, database) == []

        right = ServiceProcess(
            {**base, "MINIO_ROOT_USER": s3.access_key, "MINIO_ROOT_PASSWORD": s3.secret_key},
            tmp_path / "right.log",
        )
        right.start()
        try:
            # Drained: stored in the database, then (a moment later) removed from the outbox.
            poll(lambda: uids_in(postgres, database) == sorted(acknowledged)
                 and outbox_rows(data_dir) == 0, timeout_s=180,
                 message=f"parked saves did not drain:\n{right.log_tail()}")
        finally:
            right.stop()
    finally:
        s3.stop()


class AuthenticatingS3(MotoS3Server):
    """moto's server with authentication on: only an IAM user's keys are accepted."""

    def start(self, timeout_s: float = 60) -> None:
        import boto3

        self.port = free_port()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT,
                # The first three calls (creating the user, its key and its policy) are free.
                env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3",
                     "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
            )
        poll(lambda: self._answers(), timeout_s=timeout_s, message="moto did not start")
        iam = boto3.client("iam", endpoint_url=self.url, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="rottenbot")
        key = iam.create_access_key(UserName="rottenbot")["AccessKey"]
        iam.put_user_policy(
            UserName="rottenbot", PolicyName="all",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "*", "Resource": "*"}]}),
        )
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]

    def _answers(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(f"{self.url}/moto-api/", timeout=2)
            return True
        return False
