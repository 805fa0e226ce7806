"""Moves saves from the outbox to their final homes: image store first, then the database.

Order and idempotency: the image is uploaded before the row is inserted, so a row never points
at a missing image; the insert ignores a uid already there and the upload overwrites the same
key with the same bytes, so an item retried after a crash (at-least-once) never duplicates.
Only after both succeed is the item removed from the outbox.

Scheduling: items are taken oldest first in batches (uploads in parallel, one multi-row insert,
one outbox commit). A failed item is retried after an exponential backoff with jitter, capped.
While a dependency is failing the drainer also backs off as a whole and probes with a single
item at a time (not the whole backlog, each item waiting out its own timeout); the first success
restores full batches. A permanent failure (failures.py: credentials refused, a row the database
rejects) parks the items concerned instead: retried every `park_retry_s`, without holding up the
items behind them. Failures are counted by reason and logged once per change of state, not per
attempt. On shutdown it keeps draining for a grace period, then leaves the rest in the outbox for
the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from rottenbot_inference.storage.failures import Failure, classify
from rottenbot_inference.storage.outbox import Entry, Outbox
from rottenbot_inference.telemetry import SpanContext, traced

if TYPE_CHECKING:
    from rottenbot_inference.storage.db import PredictionRepository
    from rottenbot_inference.storage.images import ImageStore

log = logging.getLogger(__name__)


def backoff_s(attempts: int, base_s: float, max_s: float, rng: random.Random = random) -> float:  # type: ignore[assignment]
    """Exponential backoff with jitter: uniformly in [d/2, d], d = min(max, base * 2^(n-1))."""
    ceiling = min(max_s, base_s * 2 ** max(0, attempts - 1))
    return ceiling * (0.5 + 0.5 * rng.random())


class Drainer:
    def __init__(
        self,
        outbox: Outbox,
        executor: Executor,
        *,
        batch_size: int = 16,
        upload_concurrency: int = 4,
        retry_base_s: float = 0.5,
        retry_max_s: float = 30.0,
        park_retry_s: float = 300.0,
        ensure_schema: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.outbox = outbox
        self.images: ImageStore | None = None  # set by `attach`, before `start`
        self.repository: PredictionRepository | None = None
        self.executor = executor
        self.batch_size = batch_size
        self.upload_concurrency = upload_concurrency
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.park_retry_s = park_retry_s
        self.ensure_schema = ensure_schema
        self.drained = 0  # items moved to the image store + database by this process
        self.failures = 0  # failed attempts (item-level)
        self.failures_by_reason: Counter[str] = Counter()
        self.last_error: str | None = None
        self._failing: str | None = None  # the transient failure reason in force, if any
        self._consecutive_failures = 0
        self._resume_at = 0.0  # monotonic; the global backoff while a dependency is down
        self._bucket_ready = False
        self._uploaded: set[uuid.UUID] = set()  # uploaded, row not yet inserted (skip re-upload)
        # The span of the request that saved each item: drain spans link to it. In memory only
        # (bounded by the outbox): items resumed after a restart are drained without a link.
        self._request_spans: dict[uuid.UUID, SpanContext] = {}
        self._wake = asyncio.Event()
        self._cut = asyncio.Event()  # a hurried shutdown: stop draining now
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._deadline = float("inf")
        outbox.add_listener(self._wake.set)

    @property
    def closing(self) -> bool:
        """Shutdown has begun: draining what is left within the grace period."""
        return self._closing

    @property
    def healthy(self) -> bool:
        """False while the last attempt failed (a dependency is probably down)."""
        return self._consecutive_failures == 0

    def forget(self, uid: uuid.UUID) -> None:
        """The item was discarded (a user's delete): drop what we remember about it."""
        self._uploaded.discard(uid)
        self._request_spans.pop(uid, None)

    def remember_request(self, uid: uuid.UUID, span_context: SpanContext | None) -> None:
        """The span of the request that saved `uid` (its drain spans will link to it)."""
        if span_context is not None:
            self._request_spans[uid] = span_context

    def attach(self, images: ImageStore, repository: PredictionRepository) -> None:
        """Where drained items go; built after the drainer (off the readiness path)."""
        self.images, self.repository = images, repository

    def start(self) -> None:
        if self.images is None or self.repository is None:
            raise RuntimeError("Drainer.start before attach")
        self._task = asyncio.create_task(self._run(), name="outbox-drainer")

    def cut_short(self) -> None:
        """Stop draining now, even in the middle of `stop`'s grace period (a hurried
        shutdown); an item cut off mid-way is retried at the next start (idempotent)."""
        self._cut.set()

    async def stop(self, grace_s: float) -> None:
        """Keep draining up to `grace_s` seconds (or until `cut_short`), then stop; the rest
        stays in the outbox."""
        if self._task is None:
            return
        self._closing = True
        self._deadline = time.monotonic() + grace_s
        self._wake.set()
        cut = asyncio.ensure_future(self._cut.wait())
        try:
            await asyncio.wait(
                {self._task, cut}, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            cut.cancel()
        if not self._task.done():
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self.outbox.backlog:
            log.warning(
                "stopping with %d saves still in the outbox; they are drained at the next start",
                self.outbox.backlog,
            )

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            limit = self.batch_size if self.healthy else 1
            due, next_due = self._due(now, limit)
            if self._closing and (
                (not due and (next_due is None or next_due > self._deadline))
                or self._resume_at > self._deadline
            ):
                return
            if due and now >= self._resume_at:
                try:
                    await self._drain(due)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a bug, not an outage: keep the loop alive (backoff)
                    log.exception("drainer: unexpected error")
                    self._failed(due, Failure("unexpected", False, str(exc)))
                continue
            wake_at = max(self._resume_at, next_due or float("inf")) if not due else self._resume_at
            self._wake.clear()
            timeout = None if wake_at == float("inf") else max(0.0, wake_at - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)

    def _due(self, now: float, limit: int) -> tuple[list[Entry], float | None]:
        due: list[Entry] = []
        next_due: float | None = None
        for entry in self.outbox.entries():
            if entry.busy:
                continue
            if entry.due <= now:
                if len(due) < limit:
                    due.append(entry)
                    continue
                return due, now
            next_due = entry.due if next_due is None else min(next_due, entry.due)
        return due, next_due

    async def _drain(self, entries: list[Entry]) -> None:
        for entry in entries:
            entry.claim()
        try:
            await self._drain_claimed(entries)
        finally:
            for entry in entries:
                entry.release()

    async def _drain_claimed(self, entries: list[Entry]) -> None:
        loop = asyncio.get_running_loop()
        try:
            if not self._bucket_ready:
                await loop.run_in_executor(self.executor, self.images.ensure_ready)
                self._bucket_ready = True
        except Exception as exc:
            self._failed(entries, classify("image_store", exc))
            return
        try:
            images = await self.outbox.load_images([e.uid for e in entries])
        except Exception as exc:
            self._failed(entries, classify("outbox", exc))
            return
        gate = asyncio.Semaphore(self.upload_concurrency)
        failed: list[tuple[Entry, Failure]] = []

        async def upload(entry: Entry) -> Entry | None:
            data = images.get(entry.uid)
            if data is None:
                return None  # removed from the outbox meanwhile
            record = entry.record
            record.image_bytes = len(data)
            record.image_sha256 = hashlib.sha256(data).hexdigest()
            if entry.uid in self._uploaded:
                return entry
            async with gate:
                try:
                    request_span = self._request_spans.get(entry.uid)
                    with traced(
                        "save_image_s3",
                        {"prediction.uid": str(entry.uid), "image.bytes": len(data)},
                        links=(request_span,) if request_span else (),
                    ):
                        await loop.run_in_executor(
                            self.executor,
                            self.images.put,
                            record.image_path,
                            data,
                            record.content_type or "application/octet-stream",
                        )
                except Exception as exc:
                    failed.append((entry, classify("image_store", exc)))
                    return None
            self._uploaded.add(entry.uid)
            return entry

        uploaded = [e for e in await asyncio.gather(*map(upload, entries)) if e is not None]
        for failure in {f.reason: f for _, f in failed}.values():
            self._failed([e for e, f in failed if f.reason == failure.reason], failure)
        if not uploaded:
            return
        inserted = await self._insert(uploaded)
        if not inserted:
            return
        uids = [e.uid for e in inserted]
        try:
            await self.outbox.remove(uids)
        except Exception as exc:
            self._failed(inserted, classify("outbox", exc))
            return
        self._uploaded.difference_update(uids)
        for uid in uids:
            self._request_spans.pop(uid, None)
        self.drained += len(uids)
        if failed or len(inserted) < len(uploaded):
            return
        if self._failing is not None:
            log.info(
                "drainer: storage reachable again after %s; %d saves pending",
                self._failing, self.outbox.backlog,
            )
            self._failing = None
        self._consecutive_failures = 0
        self._resume_at = 0.0

    async def _insert(self, entries: list[Entry]) -> list[Entry]:
        """Insert the rows; the entries stored. A batch the database rejects is retried row
        by row, so that one bad row is parked alone."""
        assert self.repository is not None
        try:
            if self.ensure_schema is not None:
                await self.ensure_schema()
            links = [s for e in entries if (s := self._request_spans.get(e.uid))]
            with traced("save_prediction_db", {"db.rows": len(entries)}, links=links):
                await self.repository.insert_many([e.record for e in entries])
            return entries
        except Exception as exc:
            failure = classify("database", exc)
        if not failure.permanent or len(entries) == 1:
            self._failed(entries, failure)
            return []
        stored: list[Entry] = []
        for entry in entries:
            stored += await self._insert([entry])
        return stored

    def _failed(self, entries: list[Entry], failure: Failure) -> None:
        now = time.monotonic()
        self.failures += len(entries)
        self.failures_by_reason[failure.reason] += len(entries)
        self.last_error = str(failure)
        for entry in entries:
            entry.attempts += 1
            entry.last_error = str(failure)
            entry.parked = failure.permanent
            entry.due = now + (
                self.park_retry_s
                if failure.permanent
                else backoff_s(entry.attempts, self.retry_base_s, self.retry_max_s)
            )
        if not failure.permanent:
            self._consecutive_failures += 1
            self._resume_at = now + backoff_s(
                self._consecutive_failures, self.retry_base_s, self.retry_max_s
            )
        # Parked items hold up nobody: the next ones are tried at once, and tell whether the
        # store works at all.
        if failure.reason == self._failing:
            log.debug("drainer: %d saves not stored yet (%s)", len(entries), failure)
            return
        self._failing = failure.reason
        if failure.permanent:
            log.warning(
                "drainer: saves parked (%s): they stay in the outbox, retried every %g s; "
                "%d pending", failure, self.park_retry_s, self.outbox.backlog,
            )
        else:
            log.warning(
                "drainer: saves not stored yet (%s); retrying with backoff, %d pending",
                failure, self.outbox.backlog,
            )
