"""A simulated power cut: what the disk holds, not what the kernel's page cache holds.

`kill -9` keeps the page cache, so it cannot tell a save that was fsynced from one that was only
written. Here the outbox lives on an ext4 file system in a loop-mounted image, mounted with a
5-minute journal commit interval (and the kernel's 30 s dirty-page expiry), so nothing reaches
the image unless it is fsynced. Right after the saves are acknowledged the image file is copied:
the copy is what a machine that lost power at that instant would find on its disk. It is
repaired like a disk after a crash (e2fsck replays the journal), mounted, and opened by a fresh
outbox: every acknowledged save must be there, bytes included. A control run with fsync and
SQLite's syncing turned off shows that the simulation does lose what was never synced.

Needs root and loop devices (CI runs as root); fails under CI=true without them, else skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import shutil
import sqlite3
import subprocess
import uuid
from pathlib import Path

import pytest

from rottenbot_inference.storage import outbox_slots
from rottenbot_inference.storage.outbox import Outbox
from rottenbot_inference.storage.records import PredictionRecord, object_key
from tests.volumes import loop_mounted, make_ext4_image

SAVES = 40


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return make_ext4_image(tmp_path / "disk.img", 64)


def record() -> PredictionRecord:
    uid, user = uuid.uuid4(), uuid.uuid4()
    now = dt.datetime.now(dt.UTC)
    return PredictionRecord(
        uid=uid, user_uid=user, created_at=now, image_path=object_key(user, now, uid, "jpg"),
        predicted_class=3, predicted_class_name="Class03__Rotten", confidence=0.75,
        model_version="v1", content_type="image/jpeg", image_format="jpeg",
    )


def save_then_cut_power(disk: Path, tmp_path: Path) -> tuple[dict[uuid.UUID, bytes], Path]:
    """Acknowledge SAVES saves on the disk, then copy the disk image at once: the copy is the
    disk after a power cut. Returns what was acknowledged and the copy."""
    acknowledged: dict[uuid.UUID, bytes] = {}

    async def scenario(folder: Path) -> None:
        outbox = Outbox(folder / "outbox", 1000, 10**9)
        await outbox.open()
        for _ in range(0, SAVES, 8):  # concurrent adds share group commits
            batch = [(record(), os.urandom(20_000)) for _n in range(8)]
            await asyncio.gather(*(outbox.add(r, data) for r, data in batch))
            acknowledged.update((r.uid, data) for r, data in batch)
        # The power goes now, while the outbox is still open (no clean close).
        shutil.copyfile(disk, tmp_path / "after-the-cut.img")
        await outbox.close()

    with loop_mounted(disk, tmp_path / "running", "commit=300") as folder:
        asyncio.run(scenario(folder))
    return acknowledged, tmp_path / "after-the-cut.img"


def surviving(snapshot: Path, tmp_path: Path, acknowledged: dict[uuid.UUID, bytes]) -> int:
    """Repair the disk as after a crash, mount it and count the acknowledged saves a fresh
    outbox finds there with their exact bytes."""
    # Replays the journal (exit status 1, "errors fixed", is expected).
    subprocess.run(["e2fsck", "-fy", str(snapshot)], capture_output=True, check=False)
    with loop_mounted(snapshot, tmp_path / "after") as folder:
        copy = tmp_path / "recovered"
        if (folder / "outbox").exists():
            shutil.copytree(folder / "outbox", copy)
        else:
            copy.mkdir()

    async def count() -> int:
        outbox = Outbox(copy, 1000, 10**9)
        with contextlib.suppress(sqlite3.DatabaseError):  # no database file at all
            await outbox.open()
        found = {e.uid for e in outbox.entries()}
        images = await outbox.load_images([uid for uid in acknowledged if uid in found])
        await outbox.close()
        return sum(images.get(uid) == data for uid, data in acknowledged.items())

    return asyncio.run(count())


def test_every_acknowledged_save_survives_a_power_cut(disk: Path, tmp_path: Path) -> None:
    acknowledged, snapshot = save_then_cut_power(disk, tmp_path)
    assert surviving(snapshot, tmp_path, acknowledged) == SAVES


def test_the_simulation_loses_what_was_never_synced(
    disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: the same saves with every fsync skipped (files, folder, SQLite's WAL).
    If this lost nothing, the test above could not fail."""
    real_connect = outbox_slots.connect

    def unsynced(path: Path) -> sqlite3.Connection:
        conn = real_connect(path)
        conn.execute("PRAGMA synchronous=OFF")
        return conn

    monkeypatch.setattr(os, "fsync", lambda fd: None)
    monkeypatch.setattr(outbox_slots, "connect", unsynced)
    monkeypatch.setattr("rottenbot_inference.storage.outbox_writer.connect", unsynced)
    monkeypatch.setattr(
        "rottenbot_inference.storage.outbox_writer.SpoolWriter._set_synchronous",
        lambda self, conn, full: None,
    )
    acknowledged, snapshot = save_then_cut_power(disk, tmp_path)
    assert surviving(snapshot, tmp_path, acknowledged) < SAVES
