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
  fsync: only adds carry the promise (outbox_writer.py). No SQLite call runs on the event loop.
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
import json
import logging
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rottenbot_inference.storage import outbox_slots as slots
from rottenbot_inference.storage.outbox_disk import (
    DiskBudget,
    SpoolFiles,
    fsync_dir,
    is_disk_full,
    is_read_only,
)
from rottenbot_inference.storage.outbox_writer import Add, Op, Remove, SpoolWriter
from rottenbot_inference.storage.records import PredictionRecord

log = logging.getLogger(__name__)


# Why a save can be refused (metrics report each from zero).
REFUSAL_REASONS = ("items", "bytes", "disk_reserve", "disk_full", "read_only", "closed", "error")


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
        self.refused: Counter[str] = Counter()  # saves refused, by reason
        self._index: dict[uuid.UUID, Entry] = {}
        self._items = 0  # committed + being committed
        self._bytes = 0
        self._writing = 0  # image bytes accepted, not yet on disk
        self._writer: SpoolWriter | None = None
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="outbox-read")
        self._read_conn: sqlite3.Connection | None = None
        self._lock_file: IO[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = True
        self._listeners: list[Any] = []
        self.unavailable: OutboxError | None = None  # why the last `open` failed

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the slot and load the pending items. If the volume refuses (read-only, full,
        missing), saves are refused with that reason until a later `open` succeeds."""
        self._loop = asyncio.get_running_loop()
        try:
            rows = await asyncio.to_thread(self.budget.with_room, self._open_sync)
        except OutboxError as exc:  # every slot taken
            self.unavailable = exc
            raise
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
        assert self.path is not None
        self._writer = SpoolWriter(self.path, self.files, self.budget, self._settle)
        self._writer.start()
        if self._index:
            log.info("outbox %s: resuming %d pending saves", self.path, len(self._index))

    def _open_sync(self) -> list[tuple[str, int, float]]:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.files.open()
        if self.path is None:
            claimed = slots.claim_slot(self.folder)
            if claimed is None:
                raise OutboxError(f"all {slots.MAX_SLOTS} outbox slots in {self.folder} are used")
            self._lock_file, self.path = claimed
        conn = slots.connect(self.path)
        try:
            conn.execute(slots.SCHEMA)
            fsync_dir(self.folder)
            slots.adopt_orphans(conn, self.folder, self.path)
            slots.drop_drained(conn, self.files)
            rows = conn.execute(
                "SELECT record, size, enqueued_at FROM items ORDER BY seq"
            ).fetchall()
        finally:
            conn.close()
        slots.remove_orphan_files(self.folder, self.files)
        self.budget.ensure_ballast()
        return rows

    async def close(self) -> None:
        """Finish the queued writes and release the slot (pending items stay on disk)."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            await asyncio.to_thread(self._writer.stop)
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

    @property
    def _writer_broken(self) -> bool:
        return self._writer is not None and self._writer.broken

    @property
    def transactions(self) -> int:
        """Group commits done (one fsync each)."""
        return 0 if self._writer is None else self._writer.transactions

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
        if self._writer_broken:
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
        assert self._writer is not None
        self._writer.put(Add(entry, image, future))
        # Shielded: a client that disconnects does not undo a commit already under way.
        try:
            await asyncio.shield(future)
        except OutboxError as exc:
            raise self._refuse(exc) from None

    async def remove(self, uids: Sequence[uuid.UUID]) -> None:
        """Durably delete items (drained or discarded); they leave the index at once."""
        if self._writer_broken or self._closed:
            raise OutboxError("The save spool is not writable.")
        removed = [entry for uid in uids if (entry := self._index.pop(uid, None)) is not None]
        if not removed:
            return
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        size = sum(entry.size for entry in removed)
        assert self._writer is not None
        self._writer.put(Remove([entry.uid for entry in removed], size, future))
        await asyncio.shield(future)

    def _settle(self, batch: list[Op], results: list[BaseException | None]) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is gone (interpreter shutdown)
            self._loop.call_soon_threadsafe(self._settle_on_loop, batch, results)

    def _settle_on_loop(
        self, batch: list[Op], results: list[BaseException | None]
    ) -> None:
        added = False
        for op, error in zip(batch, results, strict=True):
            if isinstance(op, Add):
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
                self._read_conn = slots.connect(self.path)
            for uid in legacy:
                row = self._read_conn.execute(
                    "SELECT image FROM items WHERE uid = ? AND length(image) > 0", (str(uid),)
                ).fetchone()
                if row is not None:
                    found[uid] = bytes(row[0])
        return found
