"""The durable outbox on its own (storage/outbox*.py), with no server: bounds and refusals, group
commit and durability, the image files, the free-space budget and ballast, slots and what a
start tidies. Fast: these are the tests scripts/mutation.sh runs against the outbox modules.
Its behaviour on real full, read-only and power-cut volumes: test_outbox_disk.py,
test_power_cut.py."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import pytest

from rottenbot_inference.storage.outbox import (
    Outbox,
    OutboxClosed,
    OutboxError,
    OutboxFull,
    OutboxVolumeError,
    _volume_error,
)
from rottenbot_inference.storage.outbox_disk import (
    DiskBudget,
    SpoolFiles,
    is_disk_full,
    is_read_only,
)
from rottenbot_inference.storage.records import PredictionRecord, object_key


def record(user: uuid.UUID | None = None, name: str = "Class01__Rotten") -> PredictionRecord:
    uid, user = uuid.uuid4(), user or uuid.uuid4()
    now = dt.datetime.now(dt.UTC)
    return PredictionRecord(
        uid=uid,
        user_uid=user,
        created_at=now,
        image_path=object_key(user, now, uid, "jpg"),
        predicted_class=1,
        predicted_class_name=name,
        confidence=0.5,
        model_version="v1",
        content_type="image/jpeg",
        image_format="jpeg",
    )


def exactly(message: str) -> str:
    """A `pytest.raises(match=...)` pattern for this whole message (the 503's detail)."""
    return f"^{re.escape(message)}$"


def hold_commits(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """(holding, gate): each writer commit sets `holding`, then waits for `gate`, so saves
    added meanwhile queue up behind it (into one group commit)."""
    from rottenbot_inference.storage.outbox_writer import SpoolWriter

    holding, gate = threading.Event(), threading.Event()
    real_commit = SpoolWriter._commit

    def commit(self, conn, batch):  # type: ignore[no-untyped-def]
        holding.set()
        gate.wait(30)
        return real_commit(self, conn, batch)

    monkeypatch.setattr(SpoolWriter, "_commit", commit)
    return holding, gate


def run(coroutine) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(coroutine)


def test_outbox_group_commits_and_survives_reopen(tmp_path: Path) -> None:
    async def scenario() -> None:
        outbox = Outbox(tmp_path / "outbox", max_items=1000, max_bytes=10**9)
        await outbox.open()
        records = [record() for _ in range(60)]
        await asyncio.gather(*(outbox.add(r, r.uid.bytes * 100) for r in records))
        assert outbox.backlog == 60
        # Concurrent adds share transactions (one fsync for many requests).
        assert 1 <= outbox.transactions < 60
        assert 0 < outbox.oldest_age_s < 60
        await outbox.close()

        assert list((tmp_path / "outbox").glob("*-wal")) == []  # every connection closed
        reopened = Outbox(tmp_path / "outbox", max_items=1000, max_bytes=10**9)
        await reopened.open()
        # In the order they were accepted (gather starts the adds in order; each queues
        # its write before it first waits).
        assert [e.uid for e in reopened.entries()] == [r.uid for r in records]
        assert reopened.get(records[0].uid).record == records[0]  # type: ignore[union-attr]
        images = await reopened.load_images([records[5].uid])
        assert images[records[5].uid] == records[5].uid.bytes * 100
        await reopened.remove([r.uid for r in records[:50]])
        await reopened.close()

        third = Outbox(tmp_path / "outbox", max_items=1000, max_bytes=10**9)
        await third.open()
        assert {e.uid for e in third.entries()} == {r.uid for r in records[50:]}
        await third.close()

    asyncio.run(scenario())


def test_outbox_is_bounded_by_items_and_bytes(tmp_path: Path) -> None:
    async def scenario() -> None:
        outbox = Outbox(tmp_path / "a", max_items=2, max_bytes=10**6)
        await outbox.open()
        await outbox.add(record(), b"x")
        await outbox.add(record(), b"x")
        with pytest.raises(OutboxFull):
            await outbox.add(record(), b"x")
        await outbox.remove([next(outbox.entries()).uid])
        await outbox.add(record(), b"x")  # room again once drained
        await outbox.close()

        by_bytes = Outbox(tmp_path / "b", max_items=100, max_bytes=1000)
        await by_bytes.open()
        await by_bytes.add(record(), b"x" * 600)
        with pytest.raises(OutboxFull):
            await by_bytes.add(record(), b"x" * 600)
        await by_bytes.close()

    asyncio.run(scenario())


def test_pending_saves_count_against_the_bounds_after_a_restart(tmp_path: Path) -> None:
    """Saves still pending when the process stopped take their items and bytes from the
    bounds of the next start, exactly: one item and 100 bytes of room are left here."""

    async def scenario() -> None:
        first = Outbox(tmp_path / "outbox", max_items=3, max_bytes=1000)
        await first.open()
        await first.add(record(), b"x" * 400)
        await first.add(record(), b"x" * 500)
        pending = [(e.uid, e.size, e.enqueued_at) for e in first.entries()]
        await first.close()

        by_items = Outbox(tmp_path / "outbox", max_items=3, max_bytes=10**6)
        await by_items.open()
        # Each as it was: its size and the time it was first committed (the backlog's age).
        assert [(e.uid, e.size, e.enqueued_at) for e in by_items.entries()] == pending
        await by_items.add(record(), b"y")  # the third item fits
        with pytest.raises(OutboxFull) as full:
            await by_items.add(record(), b"y")
        assert full.value.reason == "items"
        await by_items.close()

        by_bytes = Outbox(tmp_path / "outbox", max_items=100, max_bytes=1000)
        await by_bytes.open()  # 400 + 500 + 1 bytes pending
        await by_bytes.add(record(), b"z" * 99)  # exactly 1000
        with pytest.raises(OutboxFull) as full:
            await by_bytes.add(record(), b"z")
        assert full.value.reason == "bytes"
        await by_bytes.close()

    asyncio.run(scenario())


def test_outbox_adopts_items_of_slots_no_process_holds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two workers had their own files; a single process started later drains both."""

    async def scenario() -> None:
        folder = tmp_path / "outbox"
        first, second = Outbox(folder, 100, 10**6), Outbox(folder, 100, 10**6)
        await first.open()
        await second.open()
        assert first.path != second.path  # each process its own slot
        a = [record() for _ in range(3)]
        b = [record() for _ in range(2)]
        for r in a:
            await first.add(r, b"a")
        for r in b:
            await second.add(r, b"b")
        await first.close()
        await second.close()
        # As if the second had crashed: its -wal and -shm files are still there.
        crashed = sqlite3.connect(folder / "outbox-1.sqlite3")
        assert crashed.execute("SELECT count(*) FROM items").fetchone()[0] == 2
        assert (folder / "outbox-1.sqlite3-wal").exists()
        # Not a slot's file (sorted before slot 1's): left alone, and no reason to stop.
        (folder / "outbox-1-backup.sqlite3").write_bytes(b"an operator's copy")

        alone = Outbox(folder, 100, 10**6)
        with caplog.at_level(logging.INFO, "rottenbot_inference.storage"):
            await alone.open()
        crashed.close()
        # Its own slot's items, then the adopted ones, each in the order they were saved.
        assert alone.path == folder / "outbox-0.sqlite3"
        assert [e.uid for e in alone.entries()] == [r.uid for r in a + b]
        assert [p.name for p in folder.glob("outbox-1.sqlite3*")] == []  # its -wal, -shm too
        assert (folder / "outbox-1-backup.sqlite3").read_bytes() == b"an operator's copy"
        assert caplog.messages == [
            f"outbox: adopted 2 pending saves from {folder / 'outbox-1.sqlite3'}",
            f"outbox {alone.path}: resuming 5 pending saves",
        ]
        await alone.close()

    asyncio.run(scenario())


def test_a_start_adopts_orphans_sorted_after_slots_live_processes_hold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A slot a live process holds is skipped, not the end of the search: an orphan sorted
    after it is adopted at this start all the same, and the live slots keep their items."""

    async def scenario() -> None:
        folder = tmp_path / "outbox"
        outboxes = [Outbox(folder, 100, 10**6) for _ in range(4)]
        for outbox in outboxes:
            await outbox.open()
        assert [o.path for o in outboxes] == [folder / f"outbox-{n}.sqlite3" for n in range(4)]
        live_first, freed, live_second, crashed = outboxes
        live_saves = [(live_first, record()), (live_second, record())]
        for outbox, saved in live_saves:
            await outbox.add(saved, b"live")
        orphaned = [record() for _ in range(2)]
        for saved in orphaned:
            await crashed.add(saved, b"orphan")
        await freed.close()
        await crashed.close()

        late = Outbox(folder, 100, 10**6)
        with caplog.at_level(logging.INFO, "rottenbot_inference.storage"):
            await late.open()
        # Sorted: slot 0 (live), 1 (its own), 2 (live), 3 (the orphan).
        assert late.path == folder / "outbox-1.sqlite3"
        assert [e.uid for e in late.entries()] == [r.uid for r in orphaned]
        assert [p.name for p in folder.glob("outbox-3.sqlite3*")] == []
        assert caplog.messages == [
            f"outbox: adopted 2 pending saves from {folder / 'outbox-3.sqlite3'}",
            f"outbox {late.path}: resuming 2 pending saves",
        ]
        for outbox, saved in live_saves:  # not taken from the processes that hold them
            with contextlib.closing(sqlite3.connect(outbox.path)) as conn:
                assert conn.execute("SELECT uid FROM items").fetchall() == [(str(saved.uid),)]
            assert [e.uid for e in outbox.entries()] == [saved.uid]
        for outbox in (late, live_first, live_second):
            await outbox.close()

    run(scenario())


def test_outbox_gives_the_space_of_drained_images_back(tmp_path: Path) -> None:
    """Images are files beside the records: a removal frees their bytes at once."""

    def used(folder: Path) -> int:
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())

    async def scenario() -> None:
        outbox = Outbox(tmp_path / "outbox", max_items=1000, max_bytes=10**9)
        await outbox.open()
        records = [record() for _ in range(300)]
        await asyncio.gather(*(outbox.add(r, random.randbytes(50_000)) for r in records))
        assert used(tmp_path / "outbox") > 15_000_000
        assert outbox.path is not None and outbox.path.stat().st_size < 2_000_000
        for start in range(0, 300, 30):
            await outbox.remove([r.uid for r in records[start : start + 30]])
        assert list((tmp_path / "outbox" / "images").iterdir()) == []
        await outbox.close()
        assert outbox.backlog == 0 and used(tmp_path / "outbox") < 6_000_000

    asyncio.run(scenario())


def test_an_add_is_durable_before_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The promise behind a 200 for a save, checked where `kill -9` tests cannot see it (the
    kernel keeps written pages across a process kill, not across a power cut): before `add`
    returns, the image file and its folder have been fsynced and the record committed on a
    connection in WAL mode with synchronous=FULL (SQLite fsyncs the WAL at each commit)."""
    fsynced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        fsynced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)

    async def scenario() -> None:
        outbox = Outbox(tmp_path / "outbox", max_items=100, max_bytes=10**9)
        await outbox.open()
        images = (tmp_path / "outbox" / "images").resolve()
        for _ in range(3):
            saved = record()
            fsynced.clear()
            await outbox.add(saved, b"image bytes")
            assert str(images / str(saved.uid)) in fsynced  # the file's bytes
            assert str(images) in fsynced  # its name in the folder
            writer = outbox._writer  # the connection the commit ran on
            assert writer is not None and writer.connection is not None
            assert writer.connection.execute("PRAGMA synchronous").fetchone()[0] >= 2  # FULL
            assert writer.connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            # ... and the row is there for any other connection to read (committed).
            with sqlite3.connect(outbox.path) as other:
                assert (
                    other.execute(
                        "SELECT count(*) FROM items WHERE uid = ?", (str(saved.uid),)
                    ).fetchone()[0]
                    == 1
                )
        await outbox.close()

    asyncio.run(scenario())


def test_connection_settings_and_unsynced_removals(tmp_path: Path) -> None:
    """Every outbox connection: WAL, synchronous=FULL, a busy wait instead of "database is
    locked", a WAL truncated back to 4 MiB and incremental vacuum. Removals only are
    committed with synchronous=NORMAL (no fsync: only adds carry the promise)."""
    from rottenbot_inference.storage import outbox_slots

    conn = outbox_slots.connect(tmp_path / "new.sqlite3")
    settings = {
        name: conn.execute(f"PRAGMA {name}").fetchone()[0]
        for name in ("journal_mode", "synchronous", "busy_timeout", "journal_size_limit")
    }
    assert settings == {
        "journal_mode": "wal",
        "synchronous": 2,
        "busy_timeout": 30000,
        "journal_size_limit": 4194304,
    }
    conn.execute(outbox_slots.SCHEMA)
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    conn.close()

    async def scenario() -> None:
        outbox = Outbox(tmp_path / "outbox", 100, 10**6)
        await outbox.open()
        writer = outbox._writer
        assert writer is not None
        first, second = record(), record()
        await outbox.add(first, b"1")
        await outbox.remove([first.uid])
        assert writer.connection.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        await outbox.add(second, b"2")
        assert writer.connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert writer.transactions == 3
        await outbox.close()

    run(scenario())


def test_outbox_start_drops_drained_rows_and_stray_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What a crash can leave behind is tidied at the next start: a record whose image file is
    gone was drained (files are only unlinked after the drain) and is dropped; an old image
    file no record names (an add that never committed) is deleted; pending saves are kept."""

    async def scenario() -> None:
        folder = tmp_path / "outbox"
        outbox = Outbox(folder, 100, 10**6)
        await outbox.open()
        kept, drained = record(), record()
        await outbox.add(kept, b"kept")
        await outbox.add(drained, b"drained")
        await outbox.close()
        (folder / "images" / str(drained.uid)).unlink()  # unlinked, row delete never committed
        stray = folder / "images" / str(uuid.uuid4())
        stray.write_bytes(b"never committed")
        fresh = folder / "images" / str(uuid.uuid4())
        fresh.write_bytes(b"maybe a live writer's, about to commit")
        an_hour_ago = time.time() - 3600
        os.utime(stray, (an_hour_ago, an_hour_ago))
        # A pending save's file is as old: kept because a row names it, not for its age.
        os.utime(folder / "images" / str(kept.uid), (an_hour_ago, an_hour_ago))

        reopened = Outbox(folder, 100, 10**6)
        with caplog.at_level(logging.INFO, "rottenbot_inference.storage"):
            await reopened.open()
        assert [e.uid for e in reopened.entries()] == [kept.uid]
        assert (await reopened.load_images([kept.uid])) == {kept.uid: b"kept"}
        assert not stray.exists() and fresh.exists()
        with sqlite3.connect(reopened.path) as conn:  # committed, not only left out
            assert conn.execute("SELECT uid FROM items").fetchall() == [(str(kept.uid),)]
        assert caplog.messages == [
            "outbox: forgot 1 items drained before the last stop",
            "outbox: removed 1 image files of saves never committed",
            f"outbox {reopened.path}: resuming 1 pending saves",
        ]
        await reopened.close()

    asyncio.run(scenario())


# --- refusals: every reason, its message and its count ------------------------------------------


def test_refusals_are_counted_by_reason_with_a_clear_message(tmp_path: Path) -> None:
    async def scenario() -> None:
        items = Outbox(tmp_path / "items", max_items=1, max_bytes=10**6)
        await items.open()
        await items.add(record(), b"x")
        with pytest.raises(
            OutboxFull,
            match=exactly("Too many saved predictions are waiting for storage; retry shortly."),
        ) as full:
            await items.add(record(), b"x")
        assert full.value.reason == "items" and items.refused == {"items": 1}
        with pytest.raises(OutboxFull):
            await items.add(record(), b"x")
        assert items.refused == {"items": 2}  # each refusal counted (a metric)
        await items.close()
        with pytest.raises(
            OutboxClosed, match=exactly("The service is shutting down; retry on another replica.")
        ) as closed:
            await items.add(record(), b"x")
        assert closed.value.reason == "closed" and items.refused["closed"] == 1

        by_bytes = Outbox(tmp_path / "bytes", max_items=10, max_bytes=10)
        await by_bytes.open()
        await by_bytes.add(record(), b"x" * 10)  # exactly at the bound: accepted
        with pytest.raises(
            OutboxFull,
            match=exactly("Saved predictions waiting for storage fill the spool; retry shortly."),
        ) as full:
            await by_bytes.add(record(), b"x")
        assert full.value.reason == "bytes" and by_bytes.refused == {"bytes": 1}
        assert by_bytes.backlog == 1 and by_bytes.backlog_bytes == 10
        await by_bytes.close()

        reserve = Outbox(tmp_path / "disk", 10, 10**9, min_free_bytes=2**62)
        await reserve.open()
        with pytest.raises(
            OutboxFull, match=exactly("The save spool's volume is nearly full; retry shortly.")
        ) as full:
            await reserve.add(record(), b"x")
        assert full.value.reason == "disk_reserve" and reserve.refused == {"disk_reserve": 1}
        assert reserve.backlog == 0
        await reserve.close()

    run(scenario())


def test_the_bound_is_released_by_removals_and_failed_adds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bounds: 3 items, 150 bytes. What each refusal says shows the exact count and bytes."""

    async def refused_by(image: bytes) -> str:
        with pytest.raises(OutboxFull) as refused:
            await outbox.add(record(), image)
        return refused.value.reason

    outbox = Outbox(tmp_path / "outbox", max_items=3, max_bytes=150)

    async def scenario() -> None:
        await outbox.open()
        first, second = record(), record()
        await outbox.add(first, b"a" * 50)
        await outbox.add(second, b"b" * 50)
        await outbox.remove([uuid.uuid4()])  # not there: nothing happens
        assert outbox.backlog == 2
        # A failed add (its image cannot be written) gives its room back.
        images = tmp_path / "outbox" / "images"
        images.rename(tmp_path / "moved")
        images.write_bytes(b"not a folder")
        with pytest.raises(OutboxError, match="could not store"):
            await outbox.add(record(), b"d" * 50)
        images.unlink()
        (tmp_path / "moved").rename(images)
        await outbox.add(record(), b"e" * 50)  # 3 items, 150 bytes
        assert await refused_by(b"") == "items"
        await outbox.remove([first.uid])  # 2 items, 100 bytes
        assert outbox.get(first.uid) is None and outbox.backlog_bytes == 100
        assert await refused_by(b"f" * 51) == "bytes"
        await outbox.add(record(), b"g" * 50)  # the room it left is usable again
        assert await refused_by(b"") == "items"
        assert outbox.refused == {"items": 2, "bytes": 1, "error": 1}
        # A write the volume refuses for lack of space says so (no ballast to release).
        await outbox.remove([second.uid])

        def full(self, uid, data):  # type: ignore[no-untyped-def]
            return OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(SpoolFiles, "_write_one", full)
        with pytest.raises(OutboxVolumeError) as no_space:
            await outbox.add(record(), b"h")
        assert no_space.value.reason == "disk_full" and outbox.refused["disk_full"] == 1
        await outbox.close()

    run(scenario())


def test_a_failed_write_fails_only_its_save_and_the_writer_goes_on(tmp_path: Path) -> None:
    async def scenario() -> None:
        outbox = Outbox(tmp_path / "outbox", 100, 10**9)
        await outbox.open()
        images = tmp_path / "outbox" / "images"
        images.rename(tmp_path / "moved")
        images.write_bytes(b"")
        failed = record()
        with pytest.raises(OutboxError, match="could not store"):
            await outbox.add(failed, b"lost")
        assert outbox.refused["error"] == 1 and outbox.get(failed.uid) is None
        images.unlink()
        (tmp_path / "moved").rename(images)
        ok = record()
        await outbox.add(ok, b"kept")  # the writer thread survived
        assert [e.uid for e in outbox.entries()] == [ok.uid]
        await outbox.close()
        with sqlite3.connect(outbox.path) as conn:
            assert conn.execute("SELECT uid FROM items").fetchall() == [(str(ok.uid),)]

    run(scenario())


@pytest.mark.parametrize("unlink_refused", [False, True], ids=["removed", "read-only"])
def test_an_image_write_that_fails_fails_only_its_save_in_a_group_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    unlink_refused: bool,
) -> None:
    """Only a full volume concerns the whole group commit (retried once the ballast is
    released): an image whose write fails otherwise (here its fsync, EIO) fails its own save,
    and the other saves committed with it are acknowledged and durable — also when the failed
    file cannot be removed (ext4 remounted read-only after the I/O error): it stays, warned
    about, for a later start to remove."""

    blocker, bad = record(), record()
    good = [record(), record()]
    real_fsync, real_unlink = os.fsync, Path.unlink

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(str(bad.uid)):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    def unlink(path: Path, missing_ok: bool = False) -> None:
        if unlink_refused and path.name == str(bad.uid):
            raise OSError(errno.EROFS, "Read-only file system")
        real_unlink(path, missing_ok)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "unlink", unlink)
    holding, gate = hold_commits(monkeypatch)  # what follows queues up into one group

    async def scenario() -> None:
        outbox = Outbox(tmp_path / "outbox", 100, 10**6, ballast_bytes=4096)
        await outbox.open()
        first = asyncio.ensure_future(outbox.add(blocker, b"x"))
        assert await asyncio.to_thread(holding.wait, 30)  # the writer holds its commit
        group = asyncio.gather(
            outbox.add(good[0], b"g0"),
            outbox.add(bad, b"bad"),
            outbox.add(good[1], b"g1"),
            return_exceptions=True,
        )
        await asyncio.sleep(0)  # all three queued behind it
        gate.set()
        await first
        results = await group
        assert results[0] is None and results[2] is None
        assert type(results[1]) is OutboxError
        assert str(results[1]) == "The save spool could not store the save; retry shortly."
        assert outbox.transactions == 2  # the blocker's, then one for the group
        assert [e.uid for e in outbox.entries()] == [blocker.uid, good[0].uid, good[1].uid]
        assert outbox.refused == {"error": 1}
        assert outbox.budget.ballast_present and outbox.budget.ballast_releases == 0
        assert (tmp_path / "outbox" / "images" / str(bad.uid)).exists() is unlink_refused
        warned = [r.getMessage() for r in caplog.records if "failed saves" in r.getMessage()]
        assert warned == (
            ["outbox: cannot remove the files of 1 failed saves yet: "
             "[Errno 30] Read-only file system"] if unlink_refused else []
        )
        await outbox.close()

        reopened = Outbox(tmp_path / "outbox", 100, 10**6)
        await reopened.open()
        assert [e.uid for e in reopened.entries()] == [blocker.uid, good[0].uid, good[1].uid]
        assert await reopened.load_images([r.uid for r in good]) == {
            good[0].uid: b"g0",
            good[1].uid: b"g1",
        }
        await reopened.close()

    run(scenario())


def test_volume_errors_name_their_reason() -> None:
    # The message is the 503's detail: what the client is told to do.
    full = _volume_error(OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(full, OutboxVolumeError) and full.reason == "disk_full"
    assert str(full) == "The save spool's volume is full; retry shortly."
    read_only = _volume_error(OSError(errno.EROFS, "Read-only file system"))
    assert read_only.reason == "read_only"
    assert str(read_only) == "The save spool's volume is read-only; retry on another replica."
    other = _volume_error(OSError(errno.EIO, "I/O error"))
    assert type(other) is OutboxError and other.reason == "error"
    assert str(other) == "The save spool could not store the save; retry shortly."
    assert _volume_error(None).reason == "error"


def test_an_outbox_that_cannot_open_refuses_with_the_reason_until_it_can(tmp_path: Path) -> None:
    async def scenario() -> None:
        blocker = tmp_path / "outbox"
        blocker.write_bytes(b"a file where the folder should be")
        outbox = Outbox(blocker, 10, 10**6)
        with pytest.raises(OSError):
            await outbox.open()
        assert outbox.unavailable is not None
        with pytest.raises(OutboxError) as refused:
            await outbox.add(record(), b"x")
        assert refused.value is outbox.unavailable
        blocker.unlink()
        await outbox.open()
        assert outbox.unavailable is None
        await outbox.add(record(), b"x")
        assert outbox.backlog == 1
        await outbox.close()

    run(scenario())


def test_opening_releases_the_ballast_or_names_the_volume_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start on a full volume releases the ballast and retries; a start the volume refuses
    (read-only) refuses saves with that reason. The folder's parents are created."""
    real_open_sync = Outbox._open_sync
    errors: list[OSError] = []

    def open_sync(self):  # type: ignore[no-untyped-def]
        if errors:
            raise errors.pop()
        return real_open_sync(self)

    monkeypatch.setattr(Outbox, "_open_sync", open_sync)

    async def scenario() -> None:
        folder = tmp_path / "data" / "spool" / "outbox"  # parents missing too
        first = Outbox(folder, 10, 10**6, ballast_bytes=4096)
        await first.open()
        await first.close()
        full = Outbox(folder, 10, 10**6, ballast_bytes=4096)
        errors.append(OSError(errno.ENOSPC, "No space left on device"))
        await full.open()
        assert full.unavailable is None and full.budget.ballast_releases == 1
        await full.close()
        read_only = Outbox(folder, 10, 10**6)
        errors.append(OSError(errno.EROFS, "Read-only file system"))
        with pytest.raises(OSError):
            await read_only.open()
        with pytest.raises(OutboxVolumeError) as refused:
            await read_only.add(record(), b"x")
        assert refused.value.reason == "read_only" and read_only.refused == {"read_only": 1}

    run(scenario())


# --- the index ------------------------------------------------------------------------------------


def test_index_properties_and_listeners(tmp_path: Path) -> None:
    async def scenario() -> None:
        outbox = Outbox(tmp_path / "outbox", 100, 10**6)
        await outbox.open()
        assert outbox.backlog == 0 and outbox.oldest_age_s == 0.0 and outbox.parked == 0
        assert outbox.transactions == 0
        woken: list[int] = []
        outbox.add_listener(lambda: woken.append(1))
        old = record()
        await outbox.add(old, b"12345")
        await outbox.add(record(), b"123")
        assert woken == [1, 1]
        assert outbox.backlog == 2 and outbox.backlog_bytes == 8 and outbox.transactions == 2
        outbox.get(old.uid).enqueued_at = time.time() + 3600  # the clock was set back
        assert outbox.oldest_age_s == 0.0  # never a negative age
        outbox.get(old.uid).enqueued_at = time.time() - 30
        assert 29 < outbox.oldest_age_s < 60
        outbox.get(old.uid).parked = True  # type: ignore[union-attr]
        assert outbox.parked == 1
        snapshot = outbox.entries()
        await outbox.remove([old.uid])
        assert len(list(snapshot)) == 2  # a snapshot: safe while the outbox changes
        assert woken == [1, 1]  # a removal wakes nobody
        free, size = outbox.volume_usage()
        stat = os.statvfs(tmp_path)
        assert size == stat.f_blocks * stat.f_frsize and 0 < free <= size
        assert await outbox.load_images([]) == {}
        assert await outbox.load_images([old.uid, uuid.uuid4()]) == {}
        await outbox.close()
        await outbox.close()  # twice is fine

    run(scenario())


def test_images_written_by_the_previous_version_inside_sqlite_are_still_read(
    tmp_path: Path,
) -> None:
    """Outboxes written before images moved to files kept the bytes in the `image` column."""
    from rottenbot_inference.storage import outbox_slots

    folder = tmp_path / "outbox"
    folder.mkdir()
    legacy = record()
    with sqlite3.connect(folder / "outbox-0.sqlite3") as conn:
        conn.execute(outbox_slots.SCHEMA)
        conn.execute(
            "INSERT INTO items (uid, record, image, size, enqueued_at) VALUES (?, ?, ?, ?, ?)",
            (str(legacy.uid), json.dumps(legacy.to_json()), b"old bytes", 9, 1.0),
        )

    async def scenario() -> None:
        outbox = Outbox(folder, 100, 10**6)
        await outbox.open()
        assert [e.uid for e in outbox.entries()] == [legacy.uid]  # not mistaken for drained
        threads: list[str] = []
        real_read = outbox.files.read

        def read(uid: uuid.UUID) -> bytes | None:
            threads.append(threading.current_thread().name)
            return real_read(uid)

        outbox.files.read = read  # type: ignore[method-assign]
        assert await outbox.load_images([legacy.uid]) == {legacy.uid: b"old bytes"}
        # On the outbox's one reader thread (its SQLite connection is not shared).
        assert len(threads) == 1 and threads[0].startswith("outbox-read")
        await outbox.remove([legacy.uid])
        await outbox.close()
        reopened = Outbox(folder, 100, 10**6)
        await reopened.open()
        assert reopened.backlog == 0
        await reopened.close()

    run(scenario())


# --- the volume: files, budget, ballast -----------------------------------------------------------


def test_disk_errors_are_recognised() -> None:
    assert is_disk_full(OSError(errno.ENOSPC, "full")) and is_disk_full(OSError(errno.EDQUOT, "q"))
    assert is_disk_full(sqlite3.OperationalError("database or disk is full"))
    assert not is_disk_full(OSError(errno.EIO, "io")) and not is_disk_full(ValueError("full"))
    assert not is_disk_full(sqlite3.OperationalError("disk I/O error"))
    for code in (errno.EROFS, errno.EACCES, errno.EPERM):
        assert is_read_only(OSError(code, "no"))
    assert is_read_only(sqlite3.OperationalError("attempt to write a readonly database"))
    assert is_read_only(sqlite3.OperationalError("attempt to write a read-only database"))
    assert not is_read_only(OSError(errno.ENOSPC, "full")) and not is_read_only(ValueError("ro"))
    assert not is_read_only(sqlite3.OperationalError("database is locked"))


def test_spool_files_write_fsync_read_unlink_and_forget_orphans(tmp_path: Path) -> None:
    files = SpoolFiles(tmp_path / "images")
    files.open()
    a, b = uuid.uuid4(), uuid.uuid4()
    assert files.write_many([(a, b"a" * 10)]) == [None]
    assert files.write_many([(b, b"b" * 20), (uuid.uuid4(), b"c")]) == [None, None]
    assert files.read(a) == b"a" * 10 and files.read(uuid.uuid4()) is None
    assert files.exists(b) and not files.exists(uuid.uuid4())
    assert (tmp_path / "images" / str(a)).stat().st_mode & 0o777 == 0o600
    assert files.unlink_many([a, uuid.uuid4(), b]) == 30  # bytes freed; missing ones are fine
    assert not files.exists(a) and not files.exists(b)
    old, older, fresh, named = (tmp_path / "images" / n for n in ("old", "older", "fresh", "named"))
    for path in (old, older, fresh, named):
        path.write_bytes(b"x")
    an_hour_ago = time.time() - 3600
    for path in (old, older, named):
        os.utime(path, (an_hour_ago, an_hour_ago))
    (tmp_path / "images" / "gone").symlink_to(tmp_path / "nowhere")  # vanishes when looked at
    mine = {"old", "older", "fresh", "named", "gone"}
    remaining = {p.name for p in (tmp_path / "images").iterdir()} - mine
    assert files.remove_orphans({"named", *remaining}) == 2
    assert not old.exists() and not older.exists() and fresh.exists() and named.exists()
    blocked = tmp_path / "images" / str(uuid.uuid4())
    blocked.mkdir()  # a folder where the file should go: that write fails, alone
    ok = uuid.uuid4()
    results = files.write_many([(uuid.UUID(blocked.name), b"x"), (ok, b"y")])
    assert isinstance(results[0], OSError) and results[1] is None and files.read(ok) == b"y"
    files.close()


def test_a_write_whose_fsync_fails_is_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file whose fsync fails is an error and is removed (never named by a row); a folder
    fsync that fails fails every file written with it (their names may not be durable)."""
    from rottenbot_inference.storage import outbox_disk

    files = SpoolFiles(tmp_path / "images")
    files.open()
    real_fsync = os.fsync
    failing: list[int] = []

    def fsync(fd: int) -> None:
        if failing:
            raise OSError(failing[0], "fsync failed")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    failing.append(errno.EIO)
    uid = uuid.uuid4()
    (result,) = files.write_many([(uid, b"lost")])
    assert isinstance(result, OSError) and result.errno == errno.EIO
    assert not files.exists(uid)
    failing.clear()

    def folder_fails(folder: Path) -> None:
        raise OSError(errno.EIO, "folder fsync failed")

    monkeypatch.setattr(outbox_disk, "fsync_dir", folder_fails)
    blocked = tmp_path / "images" / str(uuid.uuid4())
    blocked.mkdir()  # this write fails on its own
    results = files.write_many([(uuid.uuid4(), b"a"), (uuid.UUID(blocked.name), b"b")])
    assert [type(r) for r in results] == [OSError, IsADirectoryError]
    assert str(results[0]) == "[Errno 5] folder fsync failed"
    files.close()


def test_the_budget_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save (or the ballast) may use the free space down to the reserve, not a byte more."""
    monkeypatch.setattr(DiskBudget, "usage", lambda self: (10_000, 100_000))
    budget = DiskBudget(tmp_path, min_free_bytes=1000, min_free_percent=0, ballast_bytes=0)
    assert budget.room_for(9000) and not budget.room_for(9001)
    assert budget.room_for(8000, pending=1000) and not budget.room_for(8001, pending=1000)
    assert DiskBudget(tmp_path, 1000, 5, 0).reserve_bytes(100_000) == 5000
    assert DiskBudget(tmp_path, 1000, 0.5, 0).reserve_bytes(100_000) == 1000  # the larger
    fits = DiskBudget(tmp_path, 1000, 0, ballast_bytes=9000)
    assert fits.ensure_ballast() is True and fits.ballast_path.stat().st_size == 9000
    fits.ballast_path.unlink()
    assert DiskBudget(tmp_path, 1001, 0, ballast_bytes=9000).ensure_ballast() is False
    assert not fits.ballast_present


def test_the_budget_keeps_the_larger_reserve_and_counts_pending_writes(tmp_path: Path) -> None:
    budget = DiskBudget(tmp_path, min_free_bytes=1000, min_free_percent=0, ballast_bytes=0)
    free, total = budget.usage()
    stat = os.statvfs(tmp_path)
    assert total == stat.f_blocks * stat.f_frsize and free > 0
    assert budget.reserve_bytes(10**6) == 1000
    assert DiskBudget(tmp_path, 1000, 10, 0).reserve_bytes(10**6) == 100_000
    assert budget.room_for(0) and not budget.room_for(free)  # would cut into the reserve
    room = free - 1000 - 10 * 1024 * 1024  # a margin for what others write meanwhile
    assert budget.room_for(room) and not budget.room_for(room, pending=free)
    assert not budget.exhausted()


def test_the_ballast_is_made_when_there_is_room_and_released_on_demand(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    none = DiskBudget(tmp_path / "a", 0, 0, ballast_bytes=0)
    assert none.ensure_ballast() is False and not none.ballast_present
    (tmp_path / "b").mkdir()
    budget = DiskBudget(tmp_path / "b", 0, 0, ballast_bytes=65536)
    assert budget.release_ballast() is False and budget.ballast_releases == 0
    assert budget.ensure_ballast() is True
    assert budget.ballast_path == tmp_path / "b" / "ballast"  # a name the docs give
    assert budget.ballast_path.stat().st_size == 65536 and budget.ensure_ballast() is True
    assert budget.ballast_path.stat().st_mode & 0o777 == 0o600
    assert not budget.ballast_path.with_suffix(".tmp").exists()
    with caplog.at_level(logging.WARNING):
        assert budget.release_ballast() is True
    assert budget.ballast_releases == 1 and not budget.ballast_present
    assert caplog.messages == [
        f"outbox: the volume of {tmp_path / 'b'} is full; released 65536 bytes of ballast "
        "to keep draining"
    ]
    assert budget.ensure_ballast() is True and budget.release_ballast() is True
    assert budget.ballast_releases == 2
    greedy = DiskBudget(tmp_path / "b", 2**62, 0, ballast_bytes=65536)
    assert greedy.ensure_ballast() is False and not greedy.ballast_present  # no room for it


def test_a_ballast_that_cannot_be_made_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert DiskBudget(tmp_path / "missing", 0, 0, 4096).ensure_ballast() is False

    def no_room(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    budget = DiskBudget(tmp_path, 0, 0, ballast_bytes=4096)
    assert budget.ensure_ballast() is False and not budget.ballast_present
    assert list(tmp_path.iterdir()) == []  # no ballast.tmp left


def test_with_room_retries_once_after_releasing_the_ballast(tmp_path: Path) -> None:
    budget = DiskBudget(tmp_path, 0, 0, ballast_bytes=4096)
    budget.ensure_ballast()
    calls: list[int] = []

    def full_once() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return "done"

    assert budget.with_room(full_once) == "done" and len(calls) == 2
    assert budget.ballast_releases == 1
    calls.clear()
    with pytest.raises(OSError):  # no ballast left to release: the error stands
        budget.with_room(full_once)
    assert len(calls) == 1

    def broken() -> None:
        raise OSError(errno.EIO, "I/O error")

    budget.ensure_ballast()
    with pytest.raises(OSError):  # not for lack of space: the ballast is kept
        budget.with_room(broken)
    assert budget.ballast_present and budget.ballast_releases == 1


def test_with_room_takes_an_io_error_on_an_exhausted_volume_for_lack_of_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite reports a shared-memory file it cannot grow as "disk I/O error"."""
    budget = DiskBudget(tmp_path, 0, 0, ballast_bytes=4096)
    budget.ensure_ballast()
    monkeypatch.setattr(DiskBudget, "usage", lambda self: (1024 * 1024 - 1, 10**9))
    assert budget.exhausted()
    attempts: list[int] = []

    def io_error_once() -> int:
        attempts.append(1)
        if len(attempts) == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return 7

    assert budget.with_room(io_error_once) == 7 and budget.ballast_releases == 1
    monkeypatch.setattr(DiskBudget, "usage", lambda self: (1024 * 1024, 10**9))
    assert not budget.exhausted()


def test_removals_the_volume_refuses_are_kept_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A read-only volume refuses to unlink drained images: the removal still succeeds (the
    items are drained), rows and files stay, and the next transaction finishes the job."""

    async def scenario() -> None:
        outbox = Outbox(tmp_path / "outbox", 100, 10**6)
        await outbox.open()
        drained, later = record(), record()
        await outbox.add(drained, b"drained")
        real_unlink = SpoolFiles.unlink_many
        monkeypatch.setattr(
            SpoolFiles,
            "unlink_many",
            lambda self, uids: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")),
        )
        with caplog.at_level(logging.WARNING, "rottenbot_inference.storage"):
            await outbox.remove([drained.uid])
        assert caplog.messages == [
            "outbox: cannot remove 1 drained items yet: [Errno 30] Read-only file system"
        ]
        assert outbox.get(drained.uid) is None and outbox.backlog_bytes == 0
        with sqlite3.connect(outbox.path) as conn:
            assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == 1
        assert (tmp_path / "outbox" / "images" / str(drained.uid)).exists()
        monkeypatch.setattr(SpoolFiles, "unlink_many", real_unlink)
        await outbox.add(later, b"later")  # the next transaction deletes what was left
        with sqlite3.connect(outbox.path) as conn:
            assert conn.execute("SELECT uid FROM items").fetchall() == [(str(later.uid),)]
        assert not (tmp_path / "outbox" / "images" / str(drained.uid)).exists()
        await outbox.close()

    run(scenario())


def test_a_full_volume_during_a_write_releases_the_ballast_and_the_save_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        outbox = Outbox(tmp_path / "outbox", 100, 10**6, ballast_bytes=4096)
        await outbox.open()
        assert outbox.budget.ballast_present
        real_write = SpoolFiles._write_one
        failures = iter([OSError(errno.ENOSPC, "No space left on device")])

        def write_once_full(self, uid, data):  # type: ignore[no-untyped-def]
            error = next(failures, None)
            return error if error is not None else real_write(self, uid, data)

        monkeypatch.setattr(SpoolFiles, "_write_one", write_once_full)
        saved = record()
        await outbox.add(saved, b"made it")
        assert outbox.budget.ballast_releases == 1
        assert await outbox.load_images([saved.uid]) == {saved.uid: b"made it"}
        await outbox.close()

    run(scenario())


def test_a_writer_that_dies_fails_what_is_queued_and_refuses_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No request waits forever on a writer thread that is gone: the saves queued when it
    died fail (503), later ones are refused at once, removals too."""
    from rottenbot_inference.storage import outbox_writer

    gate = threading.Event()

    def connect_fails(path: Path) -> sqlite3.Connection:
        gate.wait(30)
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(outbox_writer, "connect", connect_fails)

    async def scenario() -> None:
        outbox = Outbox(tmp_path / "outbox", 100, 10**6)
        await outbox.open()
        queued = [asyncio.ensure_future(outbox.add(record(), b"x")) for _ in range(2)]
        await asyncio.sleep(0)  # both are queued, waiting for the writer
        with caplog.at_level(logging.ERROR, "rottenbot_inference.storage"):
            gate.set()
            for save in queued:
                with pytest.raises(OutboxError, match="could not store"):
                    await save
        assert caplog.messages == ["outbox writer stopped"]
        with pytest.raises(
            OutboxError, match=exactly("The save spool is not writable; retry shortly.")
        ):
            await outbox.add(record(), b"x")
        assert outbox.refused == {"error": 3} and outbox.backlog == 0
        with pytest.raises(OutboxError, match=exactly("The save spool is not writable.")):
            await outbox.remove([uuid.uuid4()])
        await outbox.close()

    run(scenario())


def test_a_commit_that_raises_fails_its_saves_and_the_writer_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A commit that raises (a bug: volume errors are answered per save) is logged with its
    traceback and fails that batch's saves alone (503); the writer thread carries on."""
    from rottenbot_inference.storage.outbox_writer import SpoolWriter

    bug = RuntimeError("a bug in the commit")
    real_commit = SpoolWriter._commit
    bugs = [bug]

    def commit(self, conn, batch):  # type: ignore[no-untyped-def]
        if bugs:
            raise bugs.pop()
        return real_commit(self, conn, batch)

    monkeypatch.setattr(SpoolWriter, "_commit", commit)

    async def scenario() -> None:
        outbox = Outbox(tmp_path / "outbox", max_items=1, max_bytes=10**6)
        await outbox.open()
        lost = record()
        failed = exactly("The save spool could not store the save; retry shortly.")
        with (
            caplog.at_level(logging.ERROR, "rottenbot_inference.storage"),
            pytest.raises(OutboxError, match=failed),
        ):
            await outbox.add(lost, b"lost")
        assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
            ("rottenbot_inference.storage.outbox_writer", logging.ERROR, "outbox: commit failed")
        ]
        assert caplog.records[0].exc_info is not None and caplog.records[0].exc_info[1] is bug
        assert outbox.refused == {"error": 1} and outbox.get(lost.uid) is None
        assert outbox._writer is not None and not outbox._writer.broken
        kept = record()
        await outbox.add(kept, b"kept")  # the writer is alive and the bound was released
        assert [e.uid for e in outbox.entries()] == [kept.uid]
        await outbox.close()

    run(scenario())


def test_a_writer_killed_inside_a_commit_fails_the_saves_in_hand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Something that ends the writer thread itself (not an Exception: e.g. SystemExit) while
    it commits a batch: the saves of that batch are answered with an error, not left waiting
    for a thread that is gone, and later saves are refused at once."""
    from rottenbot_inference.storage.outbox_writer import SpoolWriter

    class Killed(BaseException):
        pass

    def commit(self, conn, batch):  # type: ignore[no-untyped-def]
        raise Killed("the thread was told to end")

    monkeypatch.setattr(SpoolWriter, "_commit", commit)

    async def scenario() -> None:
        outbox = Outbox(tmp_path / "outbox", max_items=10, max_bytes=10**6)
        await outbox.open()
        in_hand = record()
        # A hang would mean the save was never answered; a minute is far beyond any commit.
        with pytest.raises(OutboxError):
            await asyncio.wait_for(outbox.add(in_hand, b"in hand"), 60)
        assert outbox.get(in_hand.uid) is None
        assert outbox._writer is not None and outbox._writer.broken
        with pytest.raises(OutboxError, match="not writable"):
            await asyncio.wait_for(outbox.add(record(), b"later"), 60)
        await outbox.close()

    run(scenario())


def test_close_commits_the_saves_queued_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shutdown while saves wait behind a commit: they are committed, then close returns."""

    holding, gate = hold_commits(monkeypatch)  # what follows queues up into one group

    async def scenario() -> None:
        outbox = Outbox(tmp_path / "outbox", 100, 10**6)
        await outbox.open()
        first = asyncio.ensure_future(outbox.add(record(), b"1"))
        assert await asyncio.to_thread(holding.wait, 30)
        queued = asyncio.ensure_future(outbox.add(record(), b"2"))
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(outbox.close())
        await asyncio.sleep(0.1)  # close has queued its stop behind the second save
        gate.set()
        await asyncio.wait_for(asyncio.gather(first, queued, closing), 10)  # only a hang
        assert outbox.backlog == 2

    run(scenario())


def test_a_row_sqlite_refuses_is_rolled_back_and_the_writer_goes_on(tmp_path: Path) -> None:
    async def scenario() -> None:
        outbox = Outbox(tmp_path / "outbox", 100, 10**6)
        await outbox.open()
        with sqlite3.connect(outbox.path) as conn:
            conn.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON items WHEN NEW.size = 13 "
                "BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        refused = record()
        with pytest.raises(OutboxError, match="could not store"):
            await outbox.add(refused, b"x" * 13)
        assert not (tmp_path / "outbox" / "images" / str(refused.uid)).exists()
        kept = record()
        await outbox.add(kept, b"kept")  # the failed transaction was rolled back
        assert [e.uid for e in outbox.entries()] == [kept.uid]
        await outbox.close()

    run(scenario())


def test_a_failed_group_commit_is_retried_one_add_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One add the database refuses fails alone; the others of its group commit are stored,
    and so are the removals that were in the group (at the next transaction)."""
    from rottenbot_inference.storage.outbox_writer import SpoolWriter

    blocker, bad = record(), record()
    holding, gate = threading.Event(), threading.Event()
    real_apply = SpoolWriter._apply

    def apply(self, conn, adds, deletes):  # type: ignore[no-untyped-def]
        if any(op.entry.uid == blocker.uid for op in adds):
            holding.set()
            gate.wait(30)  # the writer is busy: what follows queues up into one group
        if any(op.entry.uid == bad.uid for op in adds):
            raise sqlite3.IntegrityError("refused")
        return real_apply(self, conn, adds, deletes)

    async def scenario() -> None:
        outbox = Outbox(tmp_path / "outbox", 100, 10**6)
        await outbox.open()
        drained = record()
        await outbox.add(drained, b"d")
        monkeypatch.setattr(SpoolWriter, "_apply", apply)
        good = [record() for _ in range(3)]
        first = asyncio.ensure_future(outbox.add(blocker, b"x"))
        assert await asyncio.to_thread(holding.wait, 30)  # the writer holds its commit
        group = asyncio.gather(
            outbox.remove([drained.uid]),
            *(outbox.add(r, b"g") for r in good[:2]),
            outbox.add(bad, b"b"),
            outbox.add(good[2], b"g"),
            return_exceptions=True,
        )
        await asyncio.sleep(0)  # all five queued behind it
        with caplog.at_level(logging.WARNING, "rottenbot_inference.storage"):
            gate.set()
            await first
            results = await group
        assert [type(result) for result in results] == [
            type(None),
            type(None),
            type(None),
            OutboxError,
            type(None),
        ]
        assert outbox.transactions == 5  # drained, blocker, then each good add alone
        assert [e.uid for e in outbox.entries()] == [blocker.uid] + [r.uid for r in good]
        assert not (tmp_path / "outbox" / "images" / str(bad.uid)).exists()
        assert caplog.messages == ["outbox: group commit of 4 adds, 1 deletes failed: refused"]
        await outbox.add(record(), b"next")  # the next transaction deletes `drained`
        await outbox.close()
        with sqlite3.connect(outbox.path) as conn:
            uids = {uuid.UUID(uid) for (uid,) in conn.execute("SELECT uid FROM items")}
        assert drained.uid not in uids and len(uids) == 5

    run(scenario())


def test_the_free_space_check_counts_bytes_still_being_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrent saves cannot overshoot the volume's reserve: each is checked against the
    free space less the image bytes accepted but not yet on disk."""

    checks: list[tuple[int, int]] = []
    real_room_for = DiskBudget.room_for

    def room_for(self, size, pending=0):  # type: ignore[no-untyped-def]
        checks.append((size, pending))
        return real_room_for(self, size, pending)

    monkeypatch.setattr(DiskBudget, "room_for", room_for)
    holding, gate = hold_commits(monkeypatch)  # what follows queues up into one group

    async def scenario() -> None:
        outbox = Outbox(tmp_path / "outbox", 100, 10**6)
        await outbox.open()
        first = asyncio.ensure_future(outbox.add(record(), b"a" * 100))
        assert await asyncio.to_thread(holding.wait, 30)
        second = asyncio.ensure_future(outbox.add(record(), b"b" * 10))
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(first, second)
        await outbox.add(record(), b"c")
        assert checks == [(100, 0), (10, 100), (1, 0)]  # all written: nothing pending
        await outbox.close()

    run(scenario())


def test_group_commits_cap_their_image_volume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rottenbot_inference.storage import outbox_writer

    monkeypatch.setattr(outbox_writer, "_BATCH_BYTES", 1000)

    async def scenario() -> None:
        outbox = Outbox(tmp_path / "outbox", 100, 10**6)
        await outbox.open()
        await asyncio.gather(*(outbox.add(record(), random.randbytes(600)) for _ in range(10)))
        assert outbox.transactions >= 5  # at most two 600-byte images per commit
        await outbox.close()

    run(scenario())


def test_with_every_slot_taken_saves_are_refused_with_that_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rottenbot_inference.storage import outbox_slots

    monkeypatch.setattr(outbox_slots, "MAX_SLOTS", 1)

    async def scenario() -> None:
        holder = Outbox(tmp_path / "outbox", 10, 10**6)
        await holder.open()
        late = Outbox(tmp_path / "outbox", 10, 10**6)
        used = exactly(f"all 1 outbox slots in {tmp_path / 'outbox'} are used")
        with pytest.raises(OutboxError, match=used):
            await late.open()
        with pytest.raises(OutboxError, match=used):
            await late.add(record(), b"x")
        await holder.close()
        await late.open()  # the slot is free again
        await late.add(record(), b"x")
        await late.close()

    run(scenario())


def test_an_op_queued_after_the_writer_died_is_still_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window between an add's 'is the writer alive?' and its put: the writer dies there
    and has drained its queue already, so the put itself fails what it queued."""
    from rottenbot_inference.storage import outbox_writer
    from rottenbot_inference.storage.outbox_disk import DiskBudget, SpoolFiles

    def connect_fails(path: Path) -> sqlite3.Connection:
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(outbox_writer, "connect", connect_fails)
    settled: list[tuple[list, list]] = []
    writer = outbox_writer.SpoolWriter(
        tmp_path / "outbox.sqlite3", SpoolFiles(tmp_path / "images"),
        DiskBudget(tmp_path, 0, 0, 0), lambda ops, errors: settled.append((ops, errors)),
    )
    writer.start()
    writer._thread.join(30)
    assert writer.broken and settled == []  # it died with nothing queued
    late = outbox_writer.Remove([uuid.uuid4()], 0, None)  # type: ignore[arg-type]
    writer.put(late)
    ((ops, errors),) = settled
    assert ops == [late] and isinstance(errors[0], sqlite3.OperationalError)
