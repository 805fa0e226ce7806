"""Where shadow comparisons go: memory always, the predictions database when it is there.

- In memory: running counts per (champion, challenger) version pair, this process since it
  started (inference/agreement.py). Always kept, so the comparison endpoint answers even when
  the database is down or unreachable (it says `"source": "memory"` then).
- In the database (PostgreSQL, or the embedded SQLite default): every comparison, inserted in
  batches every FLUSH_EVERY_S by a task on the event loop, never on the request path. The
  endpoint summarises from there (`"source": "database"`): every replica's comparisons, and the
  owners' feedback on the saved predictions among them.

Comparisons are statistics, not records anyone relies on: while the database cannot be reached
up to MAX_PENDING wait in memory, the oldest beyond that are dropped (counted), and a crash
loses the last few seconds' worth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import TYPE_CHECKING

from rottenbot_inference.inference.agreement import Aggregate, ComparisonRecord, Summary

if TYPE_CHECKING:
    from rottenbot_inference.storage.service import PredictionStore

log = logging.getLogger(__name__)

FLUSH_EVERY_S = 2.0
MAX_PENDING = 10_000


class ComparisonLog:
    """Collects comparisons from the shadow thread; summarises them for the endpoint."""

    def __init__(self, store: PredictionStore | None) -> None:
        self.store = store
        self._lock = threading.Lock()  # the shadow thread adds, the event loop flushes
        self._aggregate = Aggregate()
        self._pending: list[ComparisonRecord] = []
        self.stored = 0  # written to the database
        self.dropped = 0  # never written: too many waited while the database was away
        self._flushing: asyncio.Lock | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def add(self, record: ComparisonRecord) -> None:
        """(Any thread) one comparison."""
        with self._lock:
            self._aggregate.add(record)
            if self.store is None:
                return
            self._pending.append(record)
            if len(self._pending) > MAX_PENDING:
                del self._pending[0]
                self.dropped += 1

    @property
    def pending(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        """(Event loop) flush to the database every FLUSH_EVERY_S."""
        self._flushing = asyncio.Lock()
        if self.store is not None:
            self._task = asyncio.create_task(self._flush_forever(), name="shadow-comparisons")

    async def stop(self, timeout_s: float = 5.0) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), timeout_s)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            await self.flush()

    async def flush(self) -> bool:
        """Write what is pending; False if the database could not take it (kept for later)."""
        if self.store is None or self._flushing is None:
            return False
        from rottenbot_inference.storage.comparisons import ComparisonRepository
        from rottenbot_inference.storage.service import StorageUnavailable

        async with self._flushing:
            with self._lock:
                batch, self._pending = self._pending, []
            if not batch:
                return True
            try:
                async with self.store.database() as repository:
                    await ComparisonRepository(repository.engine).insert_many(batch)
            except StorageUnavailable as exc:
                with self._lock:
                    self._pending[:0] = batch
                    excess = len(self._pending) - MAX_PENDING
                    if excess > 0:
                        del self._pending[:excess]
                        self.dropped += excess
                if not self._failing:
                    log.warning("shadow comparisons wait in memory: %s", exc.detail)
                self._failing = True
                return False
            self.stored += len(batch)
            if self._failing:
                log.info("shadow comparisons are written to the database again")
            self._failing = False
            return True

    async def summary(self, champion_version: str, challenger_version: str) -> tuple[Summary, str]:
        """The pair's summary and where it came from: "database" (all replicas, with feedback)
        or "memory" (this process; no database, or it cannot be reached now)."""
        if self.store is not None and await self.flush():
            from rottenbot_inference.storage.comparisons import ComparisonRepository
            from rottenbot_inference.storage.service import StorageUnavailable

            try:
                async with self.store.database() as repository:
                    repo = ComparisonRepository(repository.engine)
                    return await repo.summary(champion_version, challenger_version), "database"
            except StorageUnavailable as exc:
                log.info("comparison from memory: %s", exc.detail)
        with self._lock:
            return self._aggregate.summary(champion_version, challenger_version), "memory"
