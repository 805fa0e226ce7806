"""A durable local outbox: what makes "a 200 for save_prediction=true is never lost" true.

`await outbox.add(record, image)` returns only once the image is in its own file, fsynced, its
name fsynced in the folder, and the record committed to a SQLite file in DATA_DIR (WAL journal,
`synchronous=FULL`: the WAL is fsynced at every commit), so the promise holds through S3 and
database outages, `kill -9` and power cuts. The drainer (drainer.py) later uploads the image,
inserts the row and removes the item.

Design choices:
- **Group commit.** One writer thread owns the write connection. Adds (and removals) queue up
  while it is busy and are committed together in the next transaction: one WAL fsync (and one
  folder fsync) serves every request that arrived meanwhile. Removals are committed without
  fsync (see `_apply`): only adds carry the promise. No SQLite call runs on the event loop.
- **Images beside the database** (outbox_disk.py). A removal unlinks the image files first,
  which frees their space at once, then deletes the rows; a row whose file is gone is an item
  that was drained, and is dropped at the next start. A ballast file, released when a write the
  outbox needs fails for lack of space, keeps a volume filled by others from blocking the
  deletes that would empty it.
- **Bounded.** `max_items`, `max_bytes` (counted at the moment a save is accepted, so
  concurrent adds cannot overshoot) and the volume's free-space reserve: beyond them
  `OutboxFull` (the API answers 503 + Retry-After) rather than filling the disk.
- **An in-memory index** (uid -> record, size, retry state) mirrors the committed rows. The
  drainer schedules from it without polling SQLite, history reads pending saves from it
  (read-your-writes during outages), and backlog size/age are O(1) properties for metrics.
- **One file per process.** Each process locks a slot file (`outbox-<n>.sqlite3`, `flock`) so
  uvicorn workers sharing DATA_DIR never drain the same items twice; on start a process also
  adopts the items of slots no live process holds (a worker count that shrank, a crashed
  process), so nothing is stranded. Image files live in one folder shared by all slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import queue
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from rottenbot_inference.storage.outbox_disk import (
    DiskBudget,
    SpoolFiles,
    fsync_dir,
    is_disk_full,
    is_read_only,
)
from rottenbot_inference.storage.records import PredictionRecord

log = logging.getLogger(__name__)

MAX_SLOTS = 64
_BATCH_BYTES = 64 * 1024 * 1024  # one group commit carries at most this much image data
# `image` holds the bytes only in outboxes written before images moved to files (read still).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    uid TEXT NOT NULL UNIQUE,
    record TEXT NOT NULL,
    image BLOB NOT NULL,
    size INTEGER NOT NULL,
    enqueued_at REAL NOT NULL
)
"""
_T = TypeVar("_T")


class OutboxError(Exception):
    """The outbox cannot accept the save (the API answers 503)."""

    reason = "error"


class OutboxFull(OutboxError):
    """Too many pending saves, or too little free space: storage has been unreachable a while."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class OutboxClosed(OutboxError):
    """The process is shutting down."""

    reason = "closed"


class OutboxVolumeError(OutboxError):
    """The outbox's volume refused a write (full or read-only)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _volume_error(exc: BaseException | None) -> OutboxError:
    """The error a failed add answers with, by what the volume said."""
    if exc is not None and is_disk_full(exc):
        return OutboxVolumeError("The save spool's volume is full; retry shortly.", "disk_full")
    if exc is not None and is_read_only(exc):
        return OutboxVolumeError(
            "The save spool's volume is read-only; retry on another replica.", "read_only"
        )
    return OutboxError("The save spool could not store the save; retry shortly.")


def _raise_if_full(results: list[BaseException | None]) -> list[BaseException | None]:
    """Raise a 'disk full' among per-file results, for `_with_room` to retry the whole write
    once with the ballast released (files written meanwhile are simply rewritten)."""
    for error in results:
        if error is not None and is_disk_full(error):
            raise error
    return results


@dataclass(eq=False)
class Entry:
    """A committed, not yet drained save, and its retry state."""

    record: PredictionRecord
    size: int
    enqueued_at: float  # wall-clock seconds when it was first committed
    attempts: int = 0
    due: float = 0.0  # time.monotonic() at which the drainer may try it
    last_error: str | None = None
    parked: bool = False  # a permanent failure: retried only rarely (see the drainer)
    busy: bool = False  # claimed by the drainer or a delete
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def uid(self) -> uuid.UUID:
        return self.record.uid

    def claim(self) -> None:
        self.busy = True
        self.idle.clear()

    def release(self) -> None:
        self.busy = False
        self.idle.set()


@dataclass(eq=False)
class _Add:
    entry: Entry
    image: bytes
    future: asyncio.Future[None]


@dataclass(eq=False)
class _Remove:
    uids: list[uuid.UUID]
    size: int  # their image bytes, released from the bound once the delete commits
    future: asyncio.Future[None]


_STOP = object()


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect on a new file only
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    # The WAL is truncated back to this after a checkpoint: records are small, so it stays
    # small, and the space it keeps is reused by the next transactions.
    conn.execute("PRAGMA journal_size_limit=4194304")
    return conn


class Outbox:
    """See the module docstring. Open with `await open()`, close with `await close()`."""

    def __init__(
        self,
        folder: Path,
        max_items: int,
        max_bytes: int,
        *,
        min_free_bytes: int = 0,
        min_free_percent: float = 0.0,
        ballast_bytes: int = 0,
    ) -> None:
        self.folder = Path(folder)
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.files = SpoolFiles(self.folder / "images")
        self.budget = DiskBudget(self.folder, min_free_bytes, min_free_percent, ballast_bytes)
        self.path: Path | None = None
        self.transactions = 0  # group commits done (one fsync each)
        self.refused: Counter[str] = Counter()  # saves refused, by reason
        self._index: dict[uuid.UUID, Entry] = {}
        self._items = 0  # committed + being committed
        self._bytes = 0
        self._writing = 0  # image bytes accepted, not yet on disk
        self._undeleted: list[uuid.UUID] = []  # drained, rows not deleted yet (no space)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="outbox-read")
        self._read_conn: sqlite3.Connection | None = None
        self._lock_file: IO[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = True
        self._broken = False
        self._synchronous_full: bool | None = None  # the writer connection's current mode
        self._listeners: list[Any] = []
        self.unavailable: OutboxError | None = None  # why the last `open` failed

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the slot and load the pending items. If the volume refuses (read-only, full,
        missing), saves are refused with that reason until a later `open` succeeds."""
        self._loop = asyncio.get_running_loop()
        try:
            rows = await asyncio.to_thread(self._with_room, self._open_sync)
        except (OSError, sqlite3.Error) as exc:
            self.unavailable = _volume_error(exc)
            raise
        self.unavailable = None
        for record_json, size, enqueued_at in rows:
            record = PredictionRecord.from_json(json.loads(record_json))
            self._index[record.uid] = Entry(record, size, enqueued_at)
            self._items += 1
            self._bytes += size
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="outbox-writer", daemon=True)
        self._writer.start()
        if self._index:
            log.info("outbox %s: resuming %d pending saves", self.path, len(self._index))

    def _open_sync(self) -> list[tuple[str, int, float]]:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.files.open()
        if self.path is None:
            for slot in range(MAX_SLOTS):
                lock = self._try_lock(slot)
                if lock is not None:
                    self._lock_file = lock
                    self.path = self.folder / f"outbox-{slot}.sqlite3"
                    break
            else:
                raise OutboxError(f"all {MAX_SLOTS} outbox slots in {self.folder} are in use")
        conn = _connect(self.path)
        try:
            conn.execute(_SCHEMA)
            fsync_dir(self.folder)
            self._adopt_orphans(conn)
            self._drop_drained(conn)
            rows = conn.execute(
                "SELECT record, size, enqueued_at FROM items ORDER BY seq"
            ).fetchall()
        finally:
            conn.close()
        self._remove_orphan_files()
        self.budget.ensure_ballast()
        return rows

    def _drop_drained(self, conn: sqlite3.Connection) -> None:
        """Rows whose image file is gone (and that hold no image themselves) were drained: the
        file is only ever unlinked after the drain, the row delete may not have committed."""
        drained = [
            uid
            for uid, legacy_size in conn.execute("SELECT uid, length(image) FROM items")
            if not legacy_size and not self.files.exists(uuid.UUID(uid))
        ]
        if drained:
            conn.executemany("DELETE FROM items WHERE uid = ?", [(uid,) for uid in drained])
            log.info("outbox: forgot %d items drained before the last stop", len(drained))

    def _remove_orphan_files(self) -> None:
        """Image files no slot's rows name: an add that never committed (a crash, a failure)."""
        referenced: set[str] = set()
        for other in self.folder.glob("outbox-*.sqlite3"):
            try:
                with contextlib.closing(sqlite3.connect(f"file:{other}?mode=ro", uri=True)) as c:
                    referenced.update(uid for (uid,) in c.execute("SELECT uid FROM items"))
            except sqlite3.Error:
                return  # cannot tell what is referenced: keep every file
        removed = self.files.remove_orphans(referenced)
        if removed:
            log.info("outbox: removed %d image files of saves never committed", removed)

    def _try_lock(self, slot: int) -> IO[bytes] | None:
        handle = (self.folder / f"outbox-{slot}.lock").open("ab")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        return handle

    def _adopt_orphans(self, conn: sqlite3.Connection) -> None:
        """Move the items of slots no live process holds into ours, then delete their files."""
        assert self.path is not None
        for other in sorted(self.folder.glob("outbox-*.sqlite3")):
            if other == self.path:
                continue
            try:
                slot = int(other.stem.split("-", 1)[1])
            except ValueError:
                continue
            lock = self._try_lock(slot)
            if lock is None:
                continue  # a live process drains it
            try:
                conn.execute("ATTACH DATABASE ? AS orphan", (str(other),))
                try:
                    tables = conn.execute(
                        "SELECT name FROM orphan.sqlite_master WHERE name = 'items'"
                    ).fetchall()
                    if tables:
                        conn.execute("BEGIN IMMEDIATE")
                        moved = conn.execute(
                            "INSERT OR IGNORE INTO main.items (uid, record, image, size, "
                            "enqueued_at) SELECT uid, record, image, size, enqueued_at "
                            "FROM orphan.items ORDER BY enqueued_at, seq"
                        ).rowcount
                        conn.execute("COMMIT")
                        if moved:
                            log.info("outbox: adopted %d pending saves from %s", moved, other)
                finally:
                    conn.execute("DETACH DATABASE orphan")
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        Path(f"{other}{suffix}").unlink()
            finally:
                lock.close()  # releases the flock; the lock file itself stays (see docstring)

    async def close(self) -> None:
        """Finish the queued writes and release the slot (pending items stay on disk)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        if self._writer is not None:
            await asyncio.to_thread(self._writer.join)
        await asyncio.get_running_loop().run_in_executor(self._reader, self._close_reader)
        self._reader.shutdown(wait=True)
        await asyncio.to_thread(self.files.close)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _close_reader(self) -> None:
        if self._read_conn is not None:
            self._read_conn.close()
            self._read_conn = None

    def _with_room(self, operation: Callable[[], _T]) -> _T:
        """Run a write the outbox needs; if the volume is full, release the ballast and retry."""
        try:
            return operation()
        except (OSError, sqlite3.Error) as exc:
            # SQLite reports a shared-memory file it cannot grow as a plain "disk I/O error".
            out_of_space = is_disk_full(exc) or self.budget.exhausted()
            if not (out_of_space and self.budget.release_ballast()):
                raise
        return operation()

    # --- the index -------------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Pending saves (committed, not yet in the database)."""
        return len(self._index)

    @property
    def backlog_bytes(self) -> int:
        """Image bytes of the pending saves."""
        return sum(entry.size for entry in self._index.values())

    @property
    def parked(self) -> int:
        """Pending saves set aside after a permanent failure (retried rarely)."""
        return sum(1 for entry in self._index.values() if entry.parked)

    @property
    def oldest_age_s(self) -> float:
        """Age of the oldest pending save, 0 when none is pending."""
        first = next(iter(self._index.values()), None)
        return 0.0 if first is None else max(0.0, time.time() - first.enqueued_at)

    def volume_usage(self) -> tuple[int, int]:
        """(free bytes, size) of the outbox's volume."""
        return self.budget.usage()

    def get(self, uid: uuid.UUID) -> Entry | None:
        return self._index.get(uid)

    def entries(self) -> Iterator[Entry]:
        """Pending entries, oldest first (a snapshot: safe to modify the outbox meanwhile)."""
        return iter(list(self._index.values()))

    def add_listener(self, callback: Any) -> None:
        """`callback()` runs on the event loop after each committed add (wakes the drainer)."""
        self._listeners.append(callback)

    # --- writes ----------------------------------------------------------------------------

    def _refuse(self, error: OutboxError) -> OutboxError:
        self.refused[error.reason] += 1
        return error

    async def add(self, record: PredictionRecord, image: bytes) -> None:
        """Durably spool one save; returns once it is committed and fsynced."""
        if self.unavailable is not None:
            raise self._refuse(self.unavailable)
        if self._closed:
            raise self._refuse(OutboxClosed("The service is shutting down; retry on another "
                                            "replica."))
        if self._broken:
            raise self._refuse(OutboxError("The save spool is not writable; retry shortly."))
        size = len(image)
        if self._items + 1 > self.max_items:
            raise self._refuse(OutboxFull(
                "Too many saved predictions are waiting for storage; retry shortly.", "items"
            ))
        if self._bytes + size > self.max_bytes:
            raise self._refuse(OutboxFull(
                "Saved predictions waiting for storage fill the spool; retry shortly.", "bytes"
            ))
        if not self.budget.room_for(size, self._writing):
            raise self._refuse(OutboxFull(
                "The save spool's volume is nearly full; retry shortly.", "disk_reserve"
            ))
        self._items += 1
        self._bytes += size
        self._writing += size
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        entry = Entry(record, size, time.time())
        self._queue.put(_Add(entry, image, future))
        # Shielded: a client that disconnects does not undo a commit already under way.
        try:
            await asyncio.shield(future)
        except OutboxError as exc:
            raise self._refuse(exc) from None

    async def remove(self, uids: Sequence[uuid.UUID]) -> None:
        """Durably delete items (drained or discarded); they leave the index at once."""
        if self._broken or self._closed:
            raise OutboxError("The save spool is not writable.")
        removed = [entry for uid in uids if (entry := self._index.pop(uid, None)) is not None]
        if not removed:
            return
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        size = sum(entry.size for entry in removed)
        self._queue.put(_Remove([entry.uid for entry in removed], size, future))
        await asyncio.shield(future)

    def _write_loop(self) -> None:
        assert self.path is not None
        conn: sqlite3.Connection | None = None
        batch: list[_Add | _Remove] = []
        try:
            conn = self._with_room(lambda: _connect(self.path))  # type: ignore[arg-type]
            self._synchronous_full = True
            while True:
                batch, stop = self._next_batch()
                if batch:
                    try:
                        results = self._commit(conn, batch)
                    except Exception as exc:  # a bug: fail this batch, keep the writer alive
                        log.exception("outbox: commit failed")
                        results = [exc] * len(batch)
                    self._settle(batch, results)
                    batch = []
                if stop:
                    return
        except BaseException as exc:
            # Never leave a request waiting on a writer that is gone: fail it and what is queued.
            log.exception("outbox writer stopped")
            self._broken = True
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP:
                    batch.append(item)  # type: ignore[arg-type]
            if batch:
                self._settle(batch, [exc] * len(batch))
        finally:
            if conn is not None:
                conn.close()

    def _next_batch(self) -> tuple[list[_Add | _Remove], bool]:
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch: list[_Add | _Remove] = [first]  # type: ignore[list-item]
        volume = first.entry.size if isinstance(first, _Add) else 0  # type: ignore[union-attr]
        while volume < _BATCH_BYTES:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)  # type: ignore[arg-type]
            if isinstance(item, _Add):
                volume += item.entry.size
        return batch, False

    def _commit(
        self, conn: sqlite3.Connection, batch: list[_Add | _Remove]
    ) -> list[BaseException | None]:
        """Files first (removals free their space, adds are written and fsynced), then one
        transaction for the rows. Returns each op's error; removals never fail: an item the
        volume will not let us delete yet was drained all the same, and is retried later."""
        results: list[BaseException | None] = [None] * len(batch)
        gone = self._unlink([uid for op in batch if isinstance(op, _Remove) for uid in op.uids])
        adds = [(i, op) for i, op in enumerate(batch) if isinstance(op, _Add)]
        if adds:
            try:
                written = self._with_room(
                    lambda: _raise_if_full(
                        self.files.write_many([(op.entry.uid, op.image) for _, op in adds])
                    )
                )
            except OSError as exc:
                written = [exc] * len(adds)
            for (i, _), error in zip(adds, written, strict=True):
                results[i] = error
        inserts = [op for (i, op) in adds if results[i] is None]
        try:
            self._with_room(lambda: self._apply(conn, inserts, gone))
        except Exception as exc:
            log.warning("outbox: group commit of %d adds, %d deletes failed: %s",
                        len(inserts), len(gone), exc)
            self._undeleted.extend(gone)
            for i, op in adds:
                if results[i] is None:  # isolate: commit each add alone
                    try:
                        self._with_room(lambda op=op: self._apply(conn, [op], []))  # type: ignore[misc]
                    except Exception as single:
                        results[i] = single
        for i, op in adds:
            if results[i] is not None:
                self.files.unlink_many([op.entry.uid])  # never committed: no row names it
        if gone:
            self.budget.ensure_ballast()
        return results

    def _unlink(self, uids: list[uuid.UUID]) -> list[uuid.UUID]:
        """Remove the image files of drained items (and of those left over earlier); the uids
        whose rows may now be deleted. On a volume that refuses (read-only), kept for later."""
        uids = self._undeleted + uids
        self._undeleted = []
        try:
            self.files.unlink_many(uids)
        except OSError as exc:
            if uids:
                log.warning("outbox: cannot remove %d drained items yet: %s", len(uids), exc)
            self._undeleted = uids
            return []
        return uids

    def _apply(
        self, conn: sqlite3.Connection, adds: Sequence[_Add], deletes: Sequence[uuid.UUID]
    ) -> None:
        # Adds are fsynced (the promise). A transaction of deletes only is not: losing one to a
        # power cut leaves rows without their files, which the next start drops (see
        # `_drop_drained`); not fsyncing keeps adds from queueing behind a removal's fsync.
        if not adds and not deletes:
            return
        self._set_synchronous(conn, full=bool(adds))
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT INTO items (uid, record, image, size, enqueued_at) VALUES (?, ?, ?, ?, ?)",
                [
                    (str(op.entry.uid), json.dumps(op.entry.record.to_json()), b"",
                     op.entry.size, op.entry.enqueued_at)
                    for op in adds
                ],
            )
            conn.executemany("DELETE FROM items WHERE uid = ?", [(str(u),) for u in deletes])
            conn.execute("COMMIT")  # synchronous=FULL: the WAL is fsynced before this returns
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        self.transactions += 1

    def _set_synchronous(self, conn: sqlite3.Connection, full: bool) -> None:
        if self._synchronous_full is not full:
            conn.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
            self._synchronous_full = full

    def _settle(self, batch: list[_Add | _Remove], results: list[BaseException | None]) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is gone (interpreter shutdown)
            self._loop.call_soon_threadsafe(self._settle_on_loop, batch, results)

    def _settle_on_loop(
        self, batch: list[_Add | _Remove], results: list[BaseException | None]
    ) -> None:
        added = False
        for op, error in zip(batch, results, strict=True):
            if isinstance(op, _Add):
                self._writing -= op.entry.size
                if error is None:
                    self._index[op.entry.uid] = op.entry
                    added = True
                else:
                    self._items -= 1
                    self._bytes -= op.entry.size
            else:
                self._items -= len(op.uids)
                self._bytes -= op.size
            if not op.future.done():
                if error is None:
                    op.future.set_result(None)
                else:
                    op.future.set_exception(_volume_error(error))
        if added:
            for callback in self._listeners:
                callback()

    # --- reads -----------------------------------------------------------------------------

    async def load_images(self, uids: Sequence[uuid.UUID]) -> dict[uuid.UUID, bytes]:
        """The spooled image bytes of these items (those still present)."""
        if not uids:
            return {}
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader, self._load_sync, list(uids))

    def _load_sync(self, uids: list[uuid.UUID]) -> dict[uuid.UUID, bytes]:
        found: dict[uuid.UUID, bytes] = {}
        legacy: list[uuid.UUID] = []
        for uid in uids:
            data = self.files.read(uid)
            if data is not None:
                found[uid] = data
            else:
                legacy.append(uid)
        if legacy:  # written by a version that kept images inside SQLite
            assert self.path is not None
            if self._read_conn is None:
                self._read_conn = _connect(self.path)
            for uid in legacy:
                row = self._read_conn.execute(
                    "SELECT image FROM items WHERE uid = ? AND length(image) > 0", (str(uid),)
                ).fetchone()
                if row is not None:
                    found[uid] = bytes(row[0])
        return found
