"""The outbox's SQLite files: one slot per process, adoption of abandoned slots, clean-up at start.

Each process locks a slot (`outbox-<n>.lock`, `flock`) and keeps its records in
`outbox-<n>.sqlite3`, so uvicorn workers sharing DATA_DIR never drain the same item twice. A
process that starts adopts the records of slots no live process holds (a worker count that
shrank, a crashed process), so nothing is stranded. Image files live in one folder shared by
every slot (outbox_disk.SpoolFiles), so adoption moves records only.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import sqlite3
import uuid
from pathlib import Path
from typing import IO

from rottenbot_inference.storage.outbox_disk import SpoolFiles

log = logging.getLogger(__name__)

MAX_SLOTS = 64
# `image` holds the bytes only in outboxes written before images moved to files (read still).
SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    uid TEXT NOT NULL UNIQUE,
    record TEXT NOT NULL,
    image BLOB NOT NULL,
    size INTEGER NOT NULL,
    enqueued_at REAL NOT NULL
)
"""


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect on a new file only
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    # The WAL is truncated back to this after a checkpoint: records are small, so it stays
    # small, and the space it keeps is reused by the next transactions.
    conn.execute("PRAGMA journal_size_limit=4194304")
    return conn


def try_lock(folder: Path, slot: int) -> IO[bytes] | None:
    handle = (folder / f"outbox-{slot}.lock").open("ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def claim_slot(folder: Path) -> tuple[IO[bytes], Path] | None:
    """Lock the first free slot: (its lock, its database path), or None if all are taken."""
    for slot in range(MAX_SLOTS):
        lock = try_lock(folder, slot)
        if lock is not None:
            return lock, folder / f"outbox-{slot}.sqlite3"
    return None


def adopt_orphans(conn: sqlite3.Connection, folder: Path, own: Path) -> None:
    """Move the records of slots no live process holds into ours, then delete their files."""
    for other in sorted(folder.glob("outbox-*.sqlite3")):
        if other == own:
            continue
        try:
            slot = int(other.stem.split("-", 1)[1])
        except ValueError:
            continue
        lock = try_lock(folder, slot)
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


def drop_drained(conn: sqlite3.Connection, files: SpoolFiles) -> None:
    """Rows whose image file is gone (and that hold no image themselves) were drained: the
    file is only ever unlinked after the drain, the row delete may not have committed."""
    drained = [
        uid
        for uid, legacy_size in conn.execute("SELECT uid, length(image) FROM items")
        if not legacy_size and not files.exists(uuid.UUID(uid))
    ]
    if drained:
        conn.executemany("DELETE FROM items WHERE uid = ?", [(uid,) for uid in drained])
        log.info("outbox: forgot %d items drained before the last stop", len(drained))


def remove_orphan_files(folder: Path, files: SpoolFiles) -> None:
    """Image files no slot's rows name: an add that never committed (a crash, a failure)."""
    referenced: set[str] = set()
    for other in folder.glob("outbox-*.sqlite3"):
        try:
            uri = f"{other.resolve().as_uri()}?mode=ro"
            with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
                referenced.update(uid for (uid,) in conn.execute("SELECT uid FROM items"))
        except sqlite3.Error:
            return  # cannot tell what is referenced: keep every file
    removed = files.remove_orphans(referenced)
    if removed:
        log.info("outbox: removed %d image files of saves never committed", removed)
