"""A durable local outbox: what makes "a 200 for save_prediction=true is never lost" true.

`await outbox.add(record, image)` returns only once the record and the image bytes are committed
to a SQLite file in DATA_DIR (WAL journal, `synchronous=FULL`: the WAL is fsynced at every
commit), so the promise holds through S3 and database outages and `kill -9`. The drainer
(drainer.py) later uploads the image, inserts the row and removes the item.

Design choices:
- **Group commit.** One writer thread owns the write connection. Adds (and removals) queue up
  while it is busy and are committed together in the next transaction: one fsync serves every
  request that arrived meanwhile, so the fsync cost per request falls as load rises instead of
  serialising requests behind one another. Removals of drained items are committed without
  fsync (see `_apply`): only adds carry the promise. No SQLite call runs on the event loop.
- **Bounded.** `max_items` / `max_bytes` (counted at the moment a save is accepted, so
  concurrent adds cannot overshoot): beyond them `OutboxFull` (the API answers 503 +
  Retry-After) rather than filling the disk or dropping saves silently.
- **An in-memory index** (uid -> record, size, retry state) mirrors the committed rows. The
  drainer schedules from it without polling SQLite, history reads pending saves from it
  (read-your-writes during outages), and backlog size/age are O(1) properties for metrics.
- **One file per process.** Each process locks a slot file (`outbox-<n>.sqlite3`, `flock`) so
  uvicorn workers sharing DATA_DIR never drain the same items twice; on start a process also
  adopts the items of slots no live process holds (a worker count that shrank, a crashed
  process), so nothing is stranded.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rottenbot_inference.storage.records import PredictionRecord

log = logging.getLogger(__name__)

MAX_SLOTS = 64
_BATCH_BYTES = 64 * 1024 * 1024  # one group commit carries at most this much image data
_VACUUM_EVERY = 256  # removed items between incremental vacuums (frees up to 16 MiB each)
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


class OutboxError(Exception):
    """The outbox cannot accept the save (the API answers 503)."""


class OutboxFull(OutboxError):
    """Too many pending saves: the image store or database has been unreachable for a while."""


class OutboxClosed(OutboxError):
    """The process is shutting down."""


@dataclass(eq=False)
class Entry:
    """A committed, not yet drained save, and its retry state."""

    record: PredictionRecord
    size: int
    enqueued_at: float  # wall-clock seconds when it was first committed
    attempts: int = 0
    due: float = 0.0  # time.monotonic() at which the drainer may try it
    last_error: str | None = None
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
    conn.execute("PRAGMA journal_size_limit=67108864")
    return conn


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Outbox:
    """See the module docstring. Open with `await open()`, close with `await close()`."""

    def __init__(self, folder: Path, max_items: int, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.path: Path | None = None
        self.transactions = 0  # group commits done (one fsync each)
        self._index: dict[uuid.UUID, Entry] = {}
        self._items = 0  # committed + being committed
        self._bytes = 0
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="outbox-read")
        self._read_conn: sqlite3.Connection | None = None
        self._lock_file: IO[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = True
        self._broken = False
        self._synchronous_full: bool | None = None  # the writer connection's current mode
        self._removed = 0  # removals since the last incremental vacuum
        self._listeners: list[Any] = []

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        rows = await asyncio.to_thread(self._open_sync)
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
            _fsync_dir(self.folder)
            self._adopt_orphans(conn)
            return conn.execute(
                "SELECT record, size, enqueued_at FROM items ORDER BY seq"
            ).fetchall()
        finally:
            conn.close()

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
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _close_reader(self) -> None:
        if self._read_conn is not None:
            self._read_conn.close()
            self._read_conn = None

    # --- the index -------------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Pending saves (committed, not yet in the database)."""
        return len(self._index)

    @property
    def backlog_bytes(self) -> int:
        return sum(entry.size for entry in self._index.values())

    @property
    def oldest_age_s(self) -> float:
        """Age of the oldest pending save, 0 when none is pending."""
        first = next(iter(self._index.values()), None)
        return 0.0 if first is None else max(0.0, time.time() - first.enqueued_at)

    def get(self, uid: uuid.UUID) -> Entry | None:
        return self._index.get(uid)

    def entries(self) -> Iterator[Entry]:
        """Pending entries, oldest first (a snapshot: safe to modify the outbox meanwhile)."""
        return iter(list(self._index.values()))

    def add_listener(self, callback: Any) -> None:
        """`callback()` runs on the event loop after each committed add (wakes the drainer)."""
        self._listeners.append(callback)

    # --- writes ----------------------------------------------------------------------------

    async def add(self, record: PredictionRecord, image: bytes) -> None:
        """Durably spool one save; returns once it is committed and fsynced."""
        if self._closed:
            raise OutboxClosed("The service is shutting down; retry on another replica.")
        if self._broken:
            raise OutboxError("The save spool is not writable; retry shortly.")
        size = len(image)
        if self._items + 1 > self.max_items or self._bytes + size > self.max_bytes:
            raise OutboxFull(
                "Too many saved predictions are waiting for storage; retry shortly."
            )
        self._items += 1
        self._bytes += size
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        entry = Entry(record, size, time.time())
        self._queue.put(_Add(entry, image, future))
        # Shielded: a client that disconnects does not undo a commit already under way.
        await asyncio.shield(future)

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
            conn = _connect(self.path)
            self._synchronous_full = True
            while True:
                batch, stop = self._next_batch()
                if batch:
                    self._settle(batch, self._commit(conn, batch))
                    self._maybe_vacuum(conn, batch)
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

    def _maybe_vacuum(self, conn: sqlite3.Connection, batch: list[_Add | _Remove]) -> None:
        """Give the space of drained images back to the file system, a little at a time (a
        long outage can grow the file to OUTBOX_MAX_BYTES; it should not stay that big)."""
        self._removed += sum(len(op.uids) for op in batch if isinstance(op, _Remove))
        if self._removed >= _VACUUM_EVERY:
            self._removed = 0
            try:
                self._set_synchronous(conn, full=False)
                # executescript steps the pragma to completion (execute frees one page only)
                conn.executescript("PRAGMA incremental_vacuum(4096);")
            except sqlite3.Error:
                log.warning("outbox: incremental vacuum failed", exc_info=True)

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
        """One transaction for the whole batch; if it fails, each op alone (to isolate it)."""
        try:
            self._apply(conn, batch)
            return [None] * len(batch)
        except Exception:
            log.exception("outbox: group commit of %d operations failed", len(batch))
        if len(batch) == 1:
            return [OutboxError("the outbox could not store the save")]
        results: list[BaseException | None] = []
        for op in batch:
            try:
                self._apply(conn, [op])
                results.append(None)
            except Exception as exc:
                log.exception("outbox: operation failed")
                results.append(exc)
        return results

    def _apply(self, conn: sqlite3.Connection, batch: Sequence[_Add | _Remove]) -> None:
        # Adds are fsynced (the promise). A batch of removals only is not: losing one to a power
        # cut means re-draining an item, which is idempotent; not fsyncing keeps the next group
        # of adds from queueing behind a removal's fsync. (A process kill loses neither: the
        # kernel keeps the written pages.)
        self._set_synchronous(conn, full=any(isinstance(op, _Add) for op in batch))
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in batch:
                if isinstance(op, _Add):
                    record = op.entry.record
                    conn.execute(
                        "INSERT INTO items (uid, record, image, size, enqueued_at) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (
                            str(record.uid),
                            json.dumps(record.to_json()),
                            op.image,
                            op.entry.size,
                            op.entry.enqueued_at,
                        ),
                    )
                else:
                    conn.executemany(
                        "DELETE FROM items WHERE uid = ?", [(str(uid),) for uid in op.uids]
                    )
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
                if error is None:
                    self._index[op.entry.uid] = op.entry
                    added = True
                else:
                    self._items -= 1
                    self._bytes -= op.entry.size
            else:
                if error is not None:
                    # The rows are still on disk; they are drained again after a restart
                    # (idempotently). Counting them as gone keeps the bound from leaking.
                    log.error("outbox: could not delete %d drained items", len(op.uids))
                self._items -= len(op.uids)
                self._bytes -= op.size
            if not op.future.done():
                if error is None:
                    op.future.set_result(None)
                else:
                    op.future.set_exception(OutboxError("the outbox could not store the save"))
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
        assert self.path is not None
        if self._read_conn is None:
            self._read_conn = _connect(self.path)
        found: dict[uuid.UUID, bytes] = {}
        for uid in uids:
            row = self._read_conn.execute(
                "SELECT image FROM items WHERE uid = ?", (str(uid),)
            ).fetchone()
            if row is not None:
                found[uid] = bytes(row[0])
        return found
