"""The outbox's writer thread: group commit of adds and removals.

One thread owns the write connection. Adds and removals queue up while it is busy and are
committed together in the next transaction: one WAL fsync (and one folder fsync) serves every
request that arrived meanwhile, so the fsync cost per request falls as load rises. Removals
are committed without fsync: only adds carry the promise. No SQLite call runs on the event loop;
the outcome of each operation is handed back through `settle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import sqlite3
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rottenbot_inference.storage.outbox_disk import DiskBudget, SpoolFiles, is_disk_full
from rottenbot_inference.storage.outbox_slots import connect

if TYPE_CHECKING:
    from rottenbot_inference.storage.outbox import Entry

log = logging.getLogger(__name__)

_BATCH_BYTES = 64 * 1024 * 1024  # one group commit carries at most this much image data


@dataclass(eq=False)
class Add:
    entry: Entry
    image: bytes
    future: asyncio.Future[None]


@dataclass(eq=False)
class Remove:
    uids: list[uuid.UUID]
    size: int  # their image bytes, released from the bound once the delete commits
    future: asyncio.Future[None]


Op = Add | Remove
Settle = Callable[[list[Op], list[BaseException | None]], None]
_STOP = object()


def _raise_if_full(results: list[BaseException | None]) -> list[BaseException | None]:
    """Raise a 'disk full' among per-file results, for `with_room` to retry the whole write
    once with the ballast released (files written meanwhile are simply rewritten)."""
    for error in results:
        if error is not None and is_disk_full(error):
            raise error
    return results


class SpoolWriter:
    """See the module docstring. `start`, then `put` operations; `stop` finishes the queue."""

    def __init__(self, path: Path, files: SpoolFiles, budget: DiskBudget, settle: Settle) -> None:
        self.path = path
        self.files = files
        self.budget = budget
        self.settle = settle
        self.transactions = 0  # group commits done (one fsync each)
        self.broken = False  # the thread is gone: nothing more can be written
        self._death: BaseException | None = None  # what ended the thread
        self.connection: sqlite3.Connection | None = None
        self._undeleted: list[uuid.UUID] = []  # drained, not deleted yet (the volume refused)
        self._synchronous_full: bool | None = None  # the connection's current mode
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="outbox-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, op: Op) -> None:
        self._queue.put(op)
        if self.broken:  # the thread died after the caller checked: answer what it left
            self._fail_queued(self._death or RuntimeError("the outbox writer stopped"))

    def stop(self) -> None:
        """Commit what is queued, then end the thread (blocking)."""
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        batch: list[Op] = []
        try:
            self.connection = self.budget.with_room(lambda: connect(self.path))
            self._synchronous_full = True
            while True:
                batch, stop = self._next_batch()
                if batch:
                    try:
                        results = self._commit(self.connection, batch)
                    except Exception as exc:  # a bug: fail this batch, keep the writer alive
                        log.exception("outbox: commit failed")
                        results = [exc] * len(batch)
                    self.settle(batch, results)
                    batch = []
                if stop:
                    return
        except BaseException as exc:
            # Never leave a request waiting on a writer that is gone: fail it and what is queued.
            log.exception("outbox writer stopped")
            self._death = exc
            self.broken = True  # before the drain: a later `put` drains what it queued itself
            self._fail_queued(exc, batch)
        finally:
            if self.connection is not None:
                self.connection.close()

    def _fail_queued(self, exc: BaseException, failed: list[Op] | None = None) -> None:
        """Fail `failed` and everything still queued (each queued op is taken exactly once)."""
        failed = list(failed or ())
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                failed.append(item)  # type: ignore[arg-type]
        if failed:
            self.settle(failed, [exc] * len(failed))

    def _next_batch(self) -> tuple[list[Op], bool]:
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch: list[Op] = [first]  # type: ignore[list-item]
        volume = first.entry.size if isinstance(first, Add) else 0
        while volume < _BATCH_BYTES:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)  # type: ignore[arg-type]
            if isinstance(item, Add):
                volume += item.entry.size
        return batch, False

    def _commit(self, conn: sqlite3.Connection, batch: list[Op]) -> list[BaseException | None]:
        """Files first (removals free their space, adds are written and fsynced), then one
        transaction for the rows. Returns each op's error; removals never fail: an item the
        volume will not let us delete yet was drained all the same, and is retried later."""
        results: list[BaseException | None] = [None] * len(batch)
        gone = self._unlink([uid for op in batch if isinstance(op, Remove) for uid in op.uids])
        adds = [(i, op) for i, op in enumerate(batch) if isinstance(op, Add)]
        if adds:
            try:
                written = self.budget.with_room(
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
            self.budget.with_room(lambda: self._apply(conn, inserts, gone))
        except Exception as exc:
            log.warning("outbox: group commit of %d adds, %d deletes failed: %s",
                        len(inserts), len(gone), exc)
            self._undeleted.extend(gone)
            for i, op in adds:
                if results[i] is None:  # isolate: commit each add alone
                    try:
                        self.budget.with_room(
                            lambda op=op: self._apply(conn, [op], [])  # type: ignore[misc]
                        )
                    except Exception as single:
                        results[i] = single
        self._discard([op.entry.uid for i, op in adds if results[i] is not None])
        if gone:
            self.budget.ensure_ballast()
        return results

    def _discard(self, uids: list[uuid.UUID]) -> None:
        """Remove the files of adds that failed (no row names them). A volume that refuses
        (read-only after an I/O error) must not fail the adds committed beside them: the files
        stay, and a later start removes them as orphans."""
        if not uids:
            return
        try:
            self.files.unlink_many(uids)
        except OSError as exc:
            log.warning("outbox: cannot remove the files of %d failed saves yet: %s",
                        len(uids), exc)

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
        self, conn: sqlite3.Connection, adds: Sequence[Add], deletes: Sequence[uuid.UUID]
    ) -> None:
        # Adds are fsynced (the promise). A transaction of deletes only is not: losing one to a
        # power cut leaves rows without their files, which the next start drops (see
        # outbox_slots.drop_drained); not fsyncing keeps adds from queueing behind it.
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
