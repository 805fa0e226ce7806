"""PredictionStore: the saved-predictions use case the HTTP layer calls.

- `save` spools the record and image durably in the outbox and returns the prediction uid; it
  never waits for the image store or the database (the drainer does that in the background).
- History reads merge the database with the saves still pending in the outbox, so a user sees
  their save at once, even while the database or image store is down (read-your-writes).
- Everything is scoped by the caller's user uid: another user's prediction is simply not found.
- Start-up: only the outbox (stdlib sqlite3) is opened on the readiness path. The database
  engine and image store clients (SQLAlchemy, asyncpg, boto3, Alembic: about a third of the
  process's imports) are built in a thread once the model is ready, so they never delay
  readiness; saves meanwhile wait safely in the outbox, history reads wait for them briefly.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import json
import logging
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rottenbot_inference.heap import freeze_startup_objects
from rottenbot_inference.settings import Settings
from rottenbot_inference.storage.drainer import Drainer, backoff_s
from rottenbot_inference.storage.erasure import Erasures
from rottenbot_inference.storage.images import ImageStore, ImageStoreError, StoredImage
from rottenbot_inference.storage.outbox import Outbox, OutboxError
from rottenbot_inference.storage.records import (
    STORED_TOP_K,
    FeedbackRecord,
    PredictionRecord,
    object_key,
)
from rottenbot_inference.telemetry import metrics
from rottenbot_inference.telemetry.tracing import current_span_context, traced

if TYPE_CHECKING:
    from sqlalchemy.engine import URL
    from sqlalchemy.ext.asyncio import AsyncEngine

    from rottenbot_inference.inference.service import Classification
    from rottenbot_inference.storage.db import Cursor, PredictionRepository

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 100
CONNECT_AT_LATEST_S = 10.0  # backends are built after the model is ready, or after this
DATABASE_BACKENDS = ("postgresql", "postgres", "sqlite")


class StorageUnavailable(Exception):
    """The outbox is full, or the database / image store cannot be reached (a 503)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidCursor(ValueError):
    pass


class PredictionPending(Exception):
    """Feedback on a save still in the outbox (a 409: retry once it is stored, in seconds)."""


@dataclass(frozen=True)
class SavedPrediction:
    record: PredictionRecord
    pending: bool  # still in the outbox (not yet in the database)
    feedback: FeedbackRecord | None = None


@dataclass(frozen=True)
class Page:
    items: list[SavedPrediction]
    next_cursor: str | None


def encode_cursor(key: Cursor) -> str:
    created_at, uid = key
    raw = json.dumps([created_at.isoformat(), uid.hex], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def check_database_url(settings: Settings) -> None:
    """Refuse an unsupported DATABASE_URL at start (cheaply: no SQLAlchemy import here)."""
    if settings.database_url is None:
        return
    scheme = settings.database_url.get_secret_value().partition(":")[0]
    if scheme.partition("+")[0].lower() not in DATABASE_BACKENDS:
        raise ValueError(
            f"unsupported DATABASE_URL backend {scheme!r} (PostgreSQL or SQLite)"
        )


def decode_cursor(cursor: str) -> Cursor:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, uid = json.loads(raw)
        created_at = dt.datetime.fromisoformat(created)
        if created_at.tzinfo is None:
            raise ValueError("naive")
        return created_at, uuid.UUID(hex=uid)
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError) as exc:
        raise InvalidCursor("Invalid cursor.") from exc


class PredictionStore:
    """Owns the outbox, the drainer, the database engine and the image store."""

    def __init__(self, settings: Settings, images: ImageStore | None = None) -> None:
        check_database_url(settings)
        self.settings = settings
        # Built by `_connect` (in a thread, off the readiness path); see the module docstring.
        self.url: URL | None = None
        self.engine: AsyncEngine | None = None
        self.repository: PredictionRepository | None = None
        self.images: ImageStore | None = images
        self._connected = asyncio.Event()
        self._connecting: asyncio.Task[None] | None = None
        self.outbox = Outbox(
            settings.outbox_dir or settings.data_dir / "outbox",
            max_items=settings.outbox_max_items,
            max_bytes=settings.outbox_max_bytes,
            min_free_bytes=settings.outbox_min_free_bytes,
            min_free_percent=settings.outbox_min_free_percent,
            ballast_bytes=settings.outbox_ballast_bytes,
        )
        self.executor = ThreadPoolExecutor(
            max_workers=settings.outbox_upload_concurrency + 4, thread_name_prefix="storage-io"
        )
        self.drainer = Drainer(
            self.outbox,
            self.executor,
            batch_size=settings.outbox_batch_size,
            upload_concurrency=settings.outbox_upload_concurrency,
            retry_base_s=settings.outbox_retry_base_s,
            retry_max_s=settings.outbox_retry_max_s,
            park_retry_s=settings.outbox_park_retry_s,
            ensure_schema=self.ensure_schema,
        )
        self._schema_ready = not settings.migrate_on_start
        self._schema_event = asyncio.Event()  # set with _schema_ready
        if self._schema_ready:
            self._schema_event.set()
        self._schema_lock = asyncio.Lock()
        self._migrating: asyncio.Task[None] | None = None
        self._hurried = False
        self._hurry_event = asyncio.Event()
        self._refusing: str | None = None  # why saves are being refused, if they are
        self._opening: asyncio.Task[None] | None = None  # retrying an outbox that failed to open
        self.accuracy = metrics.AccuracyWindow()  # online accuracy by model version (feedback)
        self.erasures = Erasures(self, settings.data_dir / "erasures")  # DELETE all of a user's

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self, after: asyncio.Future[Any] | None = None) -> None:
        """Open the outbox (saves are accepted from now on); connect the database and image
        store once `after` (the model load) is done, or CONNECT_AT_LATEST_S at the latest, then
        drain. Never waits for the database or image store, which may be down at start."""
        try:
            await self.outbox.open()
        except Exception as exc:  # a read-only or full volume: serve on, saves get 503
            log.error("outbox: cannot open %s (%s); saves are refused until it can be opened, "
                      "retrying", self.outbox.folder, exc)
            self._opening = asyncio.create_task(self._open_until_done(), name="outbox-open")
        self._connecting = asyncio.create_task(self._connect(after), name="storage-connect")

    async def _open_until_done(self) -> None:
        attempt = 0
        while True:
            attempt += 1
            await asyncio.sleep(backoff_s(attempt, 1.0, self.settings.outbox_retry_max_s))
            try:
                await self.outbox.open()
            except Exception as exc:
                log.debug("outbox: still cannot open: %s", exc)
                continue
            log.info("outbox: opened %s; accepting saves", self.outbox.path)
            return

    async def _connect(self, after: asyncio.Future[Any] | None) -> None:
        if after is not None:
            await asyncio.wait({after}, timeout=CONNECT_AT_LATEST_S)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.executor, self._build_backends)
        except Exception:  # a configuration error: history answers 503 and points here
            log.exception("saved predictions: the database / image store clients cannot be built")
            raise
        freeze_startup_objects("storage set-up", self.settings.gc_freeze)
        assert self.url is not None and self.images is not None
        log.info(
            "saved predictions: database %s, images in %s, outbox %s",
            self.url.render_as_string(hide_password=True), self.images.description,
            self.outbox.path,
        )
        assert self.repository is not None
        self.drainer.attach(self.images, self.repository)
        self.drainer.start()
        self._connected.set()
        self.erasures.retry_later()  # erasures a previous process could not finish
        if not self._schema_ready:
            self._migrating = asyncio.create_task(self._migrate_until_done(), name="migrate")

    def _build_backends(self) -> None:
        """Import and build the database engine and image store client (in a thread)."""
        from rottenbot_inference.storage.db import (
            PredictionRepository,
            create_engine,
            database_url,
        )
        from rottenbot_inference.storage.images import build_image_store

        settings = self.settings
        self.url = database_url(settings)
        self.engine = create_engine(
            self.url, timeout_s=settings.database_timeout_s, pool_size=settings.database_pool_size
        )
        self.repository = PredictionRepository(self.engine)
        if self.images is None:
            self.images = build_image_store(settings)

    async def stop(self) -> None:
        """Drain for the grace period, then close; pending saves stay in the outbox.

        Stopped before the backends were connected (a signal soon after start), it still
        connects within the grace period when saves are pending, so that they are drained.
        """
        if self._opening is not None:
            self._opening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._opening
        loop = asyncio.get_running_loop()
        grace_s = 0.0 if self._hurried else self.settings.outbox_shutdown_grace_s
        deadline = loop.time() + grace_s
        connecting = self._connecting
        if connecting is not None and not connecting.done():
            if self.outbox.backlog and grace_s > 0:
                hurried = asyncio.ensure_future(self._hurry_event.wait())
                await asyncio.wait(
                    {connecting, hurried}, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED
                )
                hurried.cancel()
            if not connecting.done():
                connecting.cancel()  # never connected: everything stays in the outbox
            try:
                await connecting
            except asyncio.CancelledError:
                pass
            except Exception as exc:
                log.warning("saved predictions: the storage backends never connected: %s", exc)
        if self._migrating is not None:
            self._migrating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._migrating
        await self.erasures.stop()  # unfinished ones stay in the journal for the next start
        remaining_s = 0.0 if self._hurried else max(0.0, deadline - loop.time())
        await self.drainer.stop(remaining_s)
        await self.outbox.close()
        if self.engine is not None:
            await self.engine.dispose()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def hurry(self) -> None:
        """A hurried shutdown: stop (or skip) the final drain; pending saves stay durable."""
        self._hurried = True
        self._hurry_event.set()
        self.drainer.cut_short()

    async def ensure_schema(self) -> None:
        if self._schema_ready:
            return
        async with self._schema_lock:
            if not self._schema_ready:
                from rottenbot_inference.storage.db import migrate

                assert self.url is not None
                await migrate(self.url)
                self._schema_ready = True
                self._schema_event.set()
                log.info("database schema is at head")

    async def _migrate_until_done(self) -> None:
        attempt = 0
        while not self._schema_ready:
            try:
                await self.ensure_schema()
            except Exception as exc:
                attempt += 1
                delay = backoff_s(attempt, 1.0, self.settings.outbox_retry_max_s)
                log.warning("database migration failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)

    # --- metrics -----------------------------------------------------------------------------

    @property
    def schema_ready(self) -> bool:
        """Migrations have run (or MIGRATE_ON_START=false)."""
        return self._schema_ready

    @property
    def backlog(self) -> int:
        return self.outbox.backlog

    @property
    def oldest_pending_age_s(self) -> float:
        return self.outbox.oldest_age_s

    # --- use cases -----------------------------------------------------------------------

    async def save(
        self, user_uid: uuid.UUID, result: Classification, image: bytes
    ) -> uuid.UUID:
        """Spool a prediction durably; returns its uid once it can no longer be lost."""
        uid = uuid.uuid4()
        now = dt.datetime.now(dt.UTC)
        image_format = result.image.format
        best = result.best
        record = PredictionRecord(
            uid=uid,
            user_uid=user_uid,
            created_at=now,
            image_path=object_key(user_uid, now, uid, image_format.extension),
            predicted_class=best.index,
            predicted_class_name=best.name,
            confidence=best.confidence,
            model_name=result.model_name,
            model_version=result.model_version,
            content_type=image_format.content_type,
            image_format=image_format.value,
            image_width=result.image.width,
            image_height=result.image.height,
            image_bytes=len(image),
            top_k=[
                {"class": s.index, "class_name": s.name, "confidence": s.confidence}
                for s in result.ranked[:STORED_TOP_K]
            ],
        )
        # The request's span, for the drainer's spans to link to (the save outlives the request).
        self.drainer.remember_request(uid, current_span_context())
        try:
            with traced("save_prediction_outbox", {"image.bytes": len(image)}):
                await self.outbox.add(record, image)
        except OutboxError as exc:
            self.drainer.forget(uid)
            self._note_refusal(exc.reason)
            raise StorageUnavailable(str(exc)) from exc
        self._note_refusal(None)
        return uid

    def _note_refusal(self, reason: str | None) -> None:
        """Log when saves start or stop being refused (once per change, not per request)."""
        if reason == self._refusing:
            return
        if reason is None:
            log.info("outbox: accepting saves again (%d pending)", self.outbox.backlog)
        else:
            free, total = self.outbox.volume_usage()
            log.warning(
                "outbox: refusing saves (%s): %d pending, %d bytes; volume %d of %d bytes free",
                reason, self.outbox.backlog, self.outbox.backlog_bytes, free, total,
            )
        self._refusing = reason

    async def list(
        self,
        user_uid: uuid.UUID,
        limit: int = 20,
        cursor: str | None = None,
        class_name: str | None = None,
    ) -> Page:
        """The user's saved predictions, newest first; pass `next_cursor` for the next page."""
        limit = max(1, min(limit, MAX_PAGE_SIZE))
        after = decode_cursor(cursor) if cursor else None
        async with self._database() as repository:
            stored = await repository.page(user_uid, limit + 1, after, class_name)
            feedback = await repository.feedback_for([record.uid for record in stored])
        merged = {
            record.uid: SavedPrediction(record, pending=False, feedback=feedback.get(record.uid))
            for record in stored
        }
        for entry in self.outbox.entries():
            record = entry.record
            if (
                record.user_uid == user_uid
                and record.uid not in merged
                and (class_name is None or record.predicted_class_name == class_name)
                and (after is None or record.sort_key < after)
            ):
                merged[record.uid] = SavedPrediction(record, pending=True)
        ordered = sorted(merged.values(), key=lambda s: s.record.sort_key, reverse=True)
        items = ordered[:limit]
        more = len(ordered) > limit
        return Page(items, encode_cursor(items[-1].record.sort_key) if more else None)

    async def get(self, user_uid: uuid.UUID, uid: uuid.UUID) -> SavedPrediction | None:
        entry = self.outbox.get(uid)
        if entry is not None and entry.record.user_uid == user_uid:
            return SavedPrediction(entry.record, pending=True)
        async with self._database() as repository:
            record = await repository.get(user_uid, uid)
            if record is None:
                return None
            feedback = (await repository.feedback_for([uid])).get(uid)
        return SavedPrediction(record, pending=False, feedback=feedback)

    async def set_feedback(
        self, user_uid: uuid.UUID, uid: uuid.UUID, correct_class: int, correct_class_name: str
    ) -> FeedbackRecord | None:
        """Record (or replace) what the owner says the prediction shows; None: no such
        prediction for this user. Idempotent: the same class again changes nothing.

        Raises PredictionPending while the save is still in the outbox: the feedback row refers
        to the stored prediction, and the outbox is the lead's durable queue of saves only.
        """
        self._refuse_pending(user_uid, uid)
        async with self._database() as repository:
            record = await repository.get(user_uid, uid)
            if record is None:
                return None
            feedback = FeedbackRecord(
                prediction_uid=uid,
                user_uid=user_uid,
                correct_class=correct_class,
                correct_class_name=correct_class_name,
                model_version=record.model_version,
                agreed=correct_class_name == record.predicted_class_name,
                updated_at=dt.datetime.now(dt.UTC),
            )
            try:
                previous = await repository.set_feedback(feedback)
            except LookupError:  # deleted meanwhile
                return None
        if previous is not None and previous.correct_class_name == correct_class_name:
            return previous  # unchanged: the stored one (and its time) stands
        metrics.record_feedback(feedback.model_version, feedback.agreed)
        self.accuracy.add(feedback.model_version, uid, feedback.agreed)
        return feedback

    async def delete_feedback(self, user_uid: uuid.UUID, uid: uuid.UUID) -> bool:
        """Retract the feedback (idempotent); False: no such prediction for this user."""
        self._refuse_pending(user_uid, uid)
        async with self._database() as repository:
            if await repository.get(user_uid, uid) is None:
                return False
            removed = await repository.delete_feedback(user_uid, uid)
        if removed is not None:
            self.accuracy.remove(uid)
        return True

    async def feedback_stats(self, model_version: str) -> tuple[int, int]:
        """(feedback received, agreeing) for a model version, from the database."""
        async with self._database() as repository:
            await self.ensure_schema()  # asked before the first save was drained
            return await repository.feedback_stats(model_version)

    def database(self) -> contextlib.AbstractAsyncContextManager[PredictionRepository]:
        """The repository (its `engine` too) once connected and migrated, for other tables of
        the same database (shadow comparisons); failures raise StorageUnavailable."""
        return self._database()

    def _refuse_pending(self, user_uid: uuid.UUID, uid: uuid.UUID) -> None:
        entry = self.outbox.get(uid)
        if entry is not None and entry.record.user_uid == user_uid:
            raise PredictionPending(str(uid))

    async def open_image(self, user_uid: uuid.UUID, uid: uuid.UUID) -> StoredImage | None:
        """The saved image (from the outbox while pending), or None."""
        entry = self.outbox.get(uid)
        if entry is not None and entry.record.user_uid == user_uid:
            try:
                data = (await self.outbox.load_images([uid])).get(uid)
            except Exception as exc:
                raise StorageUnavailable("The saved image cannot be read right now.") from exc
            if data is not None:
                content_type = entry.record.content_type or "application/octet-stream"
                return StoredImage(content_type, len(data), iter([data]))
        async with self._database() as repository:
            record = await repository.get(user_uid, uid)
        if record is None:
            return None
        return await self._images("get", record.image_path)

    async def delete(self, user_uid: uuid.UUID, uid: uuid.UUID) -> bool:
        """Remove row, image and any pending save; False if the user has no such prediction.

        Order: the image before the row, and a pending save's outbox item last, so a failure
        midway (503) leaves the row or item in place for a retry to finish the job, never an
        orphaned image nobody can find again.
        """
        entry = self.outbox.get(uid)
        if entry is not None and entry.record.user_uid == user_uid:
            while entry.busy:  # the drainer is storing it right now: let it finish
                await entry.idle.wait()
            if self.outbox.get(uid) is entry:
                entry.claim()
                try:
                    # A previous drain attempt may have stored the image, or even the row.
                    await self._images("delete", entry.record.image_path)
                    async with self._database() as repository:
                        await repository.delete(user_uid, uid)
                    await self.outbox.remove([uid])
                    self.drainer.forget(uid)
                finally:
                    entry.release()
                return True
        async with self._database() as repository:
            record = await repository.get(user_uid, uid)
        if record is None:
            return False
        await self._images("delete", record.image_path)
        async with self._database() as repository:
            await repository.delete(user_uid, uid)  # and its feedback
        self.accuracy.remove(uid)
        return True

    # --- helpers ---------------------------------------------------------------------------

    async def _backends(self) -> tuple[PredictionRepository, ImageStore]:
        """The database repository and image store, waiting briefly if still being built."""
        if not self._connected.is_set():
            if self._connecting is None:
                raise StorageUnavailable("Saved predictions are not available (not started).")
            if self._connecting.done() and self._connecting.exception() is not None:
                raise StorageUnavailable(
                    "Saved predictions cannot be reached (storage set-up failed); see the logs."
                )
            try:
                await asyncio.wait_for(self._connected.wait(), self.settings.database_timeout_s)
            except TimeoutError:
                raise StorageUnavailable(
                    "Saved predictions are still starting up; retry shortly."
                ) from None
        assert self.repository is not None and self.images is not None
        return self.repository, self.images

    @contextlib.asynccontextmanager
    async def _database(self) -> AsyncIterator[PredictionRepository]:
        repository, _ = await self._backends()
        from sqlalchemy.exc import SQLAlchemyError  # imported by now (the engine is built)

        if not self._schema_ready:  # right after start: the migrations are running
            try:
                await asyncio.wait_for(self._schema_event.wait(), self.settings.database_timeout_s)
            except TimeoutError:
                raise StorageUnavailable(
                    "Saved predictions are still starting up (database migrations); retry "
                    "shortly."
                ) from None
        try:
            yield repository
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            log.warning("database unavailable: %s", exc)
            raise StorageUnavailable(
                "Saved predictions cannot be read right now (database unavailable); retry shortly."
            ) from exc

    async def _images(self, operation: str, *args: Any) -> Any:
        _, images = await self._backends()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, getattr(images, operation), *args)
        except ImageStoreError as exc:
            log.warning("image store unavailable: %s", exc)
            raise StorageUnavailable(
                "Saved images cannot be reached right now (image store unavailable); retry shortly."
            ) from exc
