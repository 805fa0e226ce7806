"""Erasing all of a user's saved data (DELETE /api/v1/inference/predictions), durably.

An erasure is first recorded in a local journal (one fsynced file per user under
`DATA_DIR/erasures/`, beside the outbox), so it survives the database or image store being
down, and a restart. Then it runs: the user is marked in `user_erasures` (history reads and the
dataset export skip them from then on), the user's saves still pending in the outbox are
removed, then page by page each image is deleted before its rows (feedback first), and last the
mark and the journal file go. Anything unreachable stops it where it is; a background task
retries with backoff until it completes. Every step is idempotent, so a retry simply resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from rottenbot_inference.storage.drainer import backoff_s

if TYPE_CHECKING:
    from rottenbot_inference.storage.service import PredictionStore

log = logging.getLogger(__name__)

PAGE = 200  # images deleted per round


class ErasureJournal:
    """Users whose erasure was requested and is not complete (files named by user uid)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def record(self, user_uid: uuid.UUID) -> None:
        """Durably note the request (blocking: call from a thread)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / str(user_uid)
        temporary = path.with_suffix(".tmp")
        with temporary.open("w") as handle:
            handle.write(dt.datetime.now(dt.UTC).isoformat())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        directory = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def done(self, user_uid: uuid.UUID) -> None:
        (self.folder / str(user_uid)).unlink(missing_ok=True)

    def pending(self) -> list[uuid.UUID]:
        if not self.folder.is_dir():
            return []
        users = []
        for path in self.folder.iterdir():
            with contextlib.suppress(ValueError):
                users.append(uuid.UUID(path.name))
        return users


class Erasures:
    """Runs erasures now, and retries the unfinished ones in the background."""

    def __init__(self, store: PredictionStore, folder: Path) -> None:
        self.store = store
        self.journal = ErasureJournal(folder)
        self._retrying: asyncio.Task[None] | None = None

    async def request(self, user_uid: uuid.UUID) -> bool:
        """Record and try to complete the erasure; True when nothing of the user is left,
        False when it is pending (it completes in the background)."""
        await asyncio.to_thread(self.journal.record, user_uid)
        if await self._attempt(user_uid):
            return True
        self.retry_later()
        return False

    def pending(self, user_uid: uuid.UUID) -> bool:
        return (self.journal.folder / str(user_uid)).exists()

    def retry_later(self) -> None:
        """Start the background retries (if there is anything to retry and none runs)."""
        if self._retrying is None or self._retrying.done():
            self._retrying = asyncio.create_task(self._retry(), name="erasures")

    async def stop(self) -> None:
        if self._retrying is not None:
            self._retrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrying

    async def _retry(self) -> None:
        attempt = 0
        settings = self.store.settings
        while users := await asyncio.to_thread(self.journal.pending):
            attempt += 1
            await asyncio.sleep(
                backoff_s(attempt, settings.outbox_retry_base_s, settings.outbox_retry_max_s)
            )
            for user_uid in users:
                if await self._attempt(user_uid):
                    log.info("erasure of a user's data completed after %d retries", attempt)

    async def _attempt(self, user_uid: uuid.UUID) -> bool:
        from rottenbot_inference.storage.service import StorageUnavailable

        try:
            await self._erase(user_uid)
        except StorageUnavailable as exc:
            log.warning("erasure of a user's data is pending (%s); it will be retried",
                        exc.detail)
            return False
        await asyncio.to_thread(self.journal.done, user_uid)
        return True

    async def _erase(self, user_uid: uuid.UUID) -> None:
        store = self.store
        async with store._database() as repository:
            await store.ensure_schema()
            await repository.mark_erasure(user_uid, dt.datetime.now(dt.UTC))
        for entry in store.outbox.entries():  # saves not yet stored
            if entry.record.user_uid == user_uid:
                await store.delete(user_uid, entry.record.uid)
        while True:
            async with store._database() as repository:
                keys = await repository.image_paths(user_uid, PAGE)
            if not keys:
                break
            for key in keys:
                await store._images("delete", key)
            async with store._database() as repository:
                await repository.delete_rows(user_uid, keys)
        async with store._database() as repository:
            await repository.unmark_erasure(user_uid)
