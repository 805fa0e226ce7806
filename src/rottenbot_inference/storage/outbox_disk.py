"""The outbox's volume: spooled image files, the free-space budget and the ballast.

Images are kept as one file each (`<folder>/images/<uid>`), not inside SQLite, so that draining
an item frees its bytes at once by unlinking a file: no SQLite write is needed to give space
back, and the SQLite file holds only the small records. A full volume therefore never blocks the
operation that would empty it.

The **ballast** is a file of `ballast_bytes` kept in the outbox folder while there is room. When
a write the outbox needs fails for lack of space (a delete's write-ahead log, a checkpoint, the
database file at start), the ballast is released and the write retried; it is re-created once the
volume has room again. Other programs filling the volume to the last byte thus cannot stop the
outbox from recording what it drained.

The **budget** refuses new saves before the volume fills: a save is accepted only while the
volume keeps at least `min_free_bytes` (or `min_free_percent` of its size, whichever is larger)
free after it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

_ORPHAN_MIN_AGE_S = 600.0  # an image file no outbox row names is removed once this old


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, or SQLite's 'database or disk is full'."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.Error) and "full" in str(exc).lower()


def is_read_only(exc: BaseException) -> bool:
    """EROFS / EACCES on the volume, or SQLite's 'attempt to write a readonly database'."""
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return True
    return isinstance(exc, sqlite3.Error) and "readonly" in str(exc).lower().replace("-", "")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolFiles:
    """One file per spooled image, shared by every outbox slot of a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="outbox-fsync")

    def open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def path(self, uid: uuid.UUID) -> Path:
        return self.folder / str(uid)

    def write_many(self, items: list[tuple[uuid.UUID, bytes]]) -> list[BaseException | None]:
        """Write and fsync each file (in parallel), then the folder once; per-item errors."""
        if len(items) == 1:
            results = [self._write_one(*items[0])]
        else:
            results = list(self._pool.map(lambda item: self._write_one(*item), items))
        if any(error is None for error in results):
            try:
                fsync_dir(self.folder)  # the new names are durable before any row names them
            except OSError as exc:
                results = [exc if error is None else error for error in results]
        return results

    def _write_one(self, uid: uuid.UUID, data: bytes) -> BaseException | None:
        path = self.path(uid)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink()
            return exc
        return None

    def read(self, uid: uuid.UUID) -> bytes | None:
        try:
            return self.path(uid).read_bytes()
        except FileNotFoundError:
            return None

    def exists(self, uid: uuid.UUID) -> bool:
        return self.path(uid).exists()

    def unlink_many(self, uids: Iterable[uuid.UUID]) -> int:
        """Remove files (missing ones are fine); returns the bytes freed."""
        freed = 0
        for uid in uids:
            path = self.path(uid)
            try:
                size = path.stat().st_size
                path.unlink()
                freed += size
            except FileNotFoundError:
                continue
        return freed

    def remove_orphans(self, referenced: set[str]) -> int:
        """Delete image files no outbox row names (an add that never committed, a crash), once
        they are old enough that no live writer can still be about to commit them."""
        removed = 0
        cutoff = time.time() - _ORPHAN_MIN_AGE_S
        for path in self.folder.iterdir():
            if path.name in referenced:
                continue
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed


class DiskBudget:
    """Free-space checks for new saves, and the ballast released when a needed write fails."""

    def __init__(
        self, folder: Path, min_free_bytes: int, min_free_percent: float, ballast_bytes: int
    ) -> None:
        self.folder = folder
        self.min_free_bytes = min_free_bytes
        self.min_free_percent = min_free_percent
        self.ballast_bytes = ballast_bytes
        self.ballast_path = folder / "ballast"
        self.ballast_releases = 0
        self._lock = threading.Lock()

    def usage(self) -> tuple[int, int]:
        """(free bytes available to us, volume size)."""
        stat = os.statvfs(self.folder)
        return stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize

    def reserve_bytes(self, total: int) -> int:
        return max(self.min_free_bytes, int(total * self.min_free_percent / 100))

    def room_for(self, size: int, pending: int = 0) -> bool:
        """Whether `size` more bytes (besides `pending` bytes being written) leave the reserve."""
        free, total = self.usage()
        return free - pending - size >= self.reserve_bytes(total)

    def with_room(self, operation: Callable[[], T]) -> T:
        """Run a write the outbox needs; if it fails for lack of space, release the ballast
        and retry once."""
        try:
            return operation()
        except (OSError, sqlite3.Error) as exc:
            # SQLite reports a shared-memory file it cannot grow as a plain "disk I/O error".
            if not ((is_disk_full(exc) or self.exhausted()) and self.release_ballast()):
                raise
        return operation()

    def exhausted(self) -> bool:
        """Less than a megabyte free: a failed write was most likely for lack of space."""
        return self.usage()[0] < 1024 * 1024

    @property
    def ballast_present(self) -> bool:
        return self.ballast_path.exists()

    def ensure_ballast(self) -> bool:
        """Create the ballast if it is missing and the volume has room; True if present."""
        if self.ballast_bytes <= 0:
            return False
        with self._lock:
            tmp = self.ballast_path.with_suffix(".tmp")
            try:
                if self.ballast_path.exists():
                    return True
                free, total = self.usage()
                if free - self.ballast_bytes < self.reserve_bytes(total):
                    return False
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.posix_fallocate(fd, 0, self.ballast_bytes)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self.ballast_path)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                log.debug("outbox: could not create the ballast: %s", exc)
                return False
            return True

    def release_ballast(self) -> bool:
        """Free the ballast's space for a write that needs it; False if there was none."""
        with self._lock:
            try:
                self.ballast_path.unlink()
            except FileNotFoundError:
                return False
            self.ballast_releases += 1
        log.warning(
            "outbox: the volume of %s is full; released %d bytes of ballast to keep draining",
            self.folder, self.ballast_bytes,
        )
        return True
