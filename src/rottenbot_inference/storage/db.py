"""The predictions database: async engine, migrations on start, and the queries we need.

PostgreSQL through asyncpg (`DATABASE_URL`, `postgresql://` and `postgres://` are accepted and
mapped to asyncpg); embedded default `sqlite+aiosqlite:///<DATA_DIR>/predictions.db`.

Migrations (Alembic, shipped in the package) run on start and are safe when several replicas
start at once: on PostgreSQL the upgrade runs under `pg_advisory_lock` (the second replica
waits, then finds the schema at head and does nothing); on SQLite under an `flock` beside the
file. Our Alembic version table is `rottenbot_inference_alembic_version`, so a database that
another tool already versions with Alembic's default table is not confused with ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, event, func, or_, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from rottenbot_inference.settings import Settings
from rottenbot_inference.storage.models import Feedback, Prediction, UserErasure
from rottenbot_inference.storage.records import FeedbackRecord, PredictionRecord

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
VERSION_TABLE = "rottenbot_inference_alembic_version"
# pg_advisory_lock key: any constant shared by every replica ("rottenbot" as an int64).
MIGRATION_LOCK_KEY = int.from_bytes(b"rottenbt", "big") & 0x7FFF_FFFF_FFFF_FFFF
_TABLE = Prediction.__table__
_FEEDBACK = Feedback.__table__
_ERASURES = UserErasure.__table__


def database_url(settings: Settings) -> URL:
    """The async SQLAlchemy URL for the settings (drivers normalised to asyncpg/aiosqlite)."""
    raw = settings.database_url.get_secret_value() if settings.database_url else None
    if raw is None:
        return make_url(f"sqlite+aiosqlite:///{(settings.data_dir / 'predictions.db').resolve()}")
    url = make_url(raw)
    backend = url.get_backend_name()
    if backend in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+asyncpg")
    elif backend == "sqlite":
        url = url.set(drivername="sqlite+aiosqlite")
    else:
        raise ValueError(f"unsupported DATABASE_URL backend {backend!r} (PostgreSQL or SQLite)")
    return url


def create_engine(
    url: URL, timeout_s: float = 5.0, pool_size: int = 5, **kwargs: Any
) -> AsyncEngine:
    """An engine with short timeouts, pre-ping (survives a database restart), WAL on SQLite."""
    command_timeout = kwargs.pop("command_timeout", timeout_s)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            url, connect_args={"timeout": timeout_s}, pool_pre_ping=True, **kwargs
        )

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
            cursor.close()

        return engine
    connect_args = {
        "timeout": timeout_s,
        "command_timeout": command_timeout,
        "server_settings": {"application_name": "rottenbot-inference"},
    }
    if kwargs.get("poolclass") is NullPool:
        return create_async_engine(url, connect_args=connect_args, **kwargs)
    return create_async_engine(
        url,
        connect_args=connect_args,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=timeout_s,
        pool_recycle=1800,
        **kwargs,
    )


# --- migrations ------------------------------------------------------------------------------


def _alembic_config(connection: Any) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Any) -> None:
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # 7 lines per start
    from alembic import command

    command.upgrade(_alembic_config(connection), "head")


def current_revision(connection: Any) -> str | None:
    from alembic.migration import MigrationContext

    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


async def migrate(url: URL, timeout_s: float = 300.0) -> None:
    """Upgrade the schema to head (idempotent; concurrent callers are serialised)."""
    # A separate, pool-less engine: the lock wait may exceed the normal statement timeout.
    engine = create_engine(url, timeout_s=30.0, poolclass=NullPool, command_timeout=timeout_s)
    try:
        if url.get_backend_name() == "postgresql":
            async with engine.connect() as conn:
                await _locked_upgrade_pg(conn)
        else:
            lock_path = Path(f"{url.database}.migrate.lock")
            handle = await asyncio.to_thread(_flock, lock_path)
            try:
                async with engine.connect() as conn:
                    await conn.run_sync(_upgrade)
                    await conn.commit()
            finally:
                handle.close()
    finally:
        await engine.dispose()


async def _locked_upgrade_pg(conn: AsyncConnection) -> None:
    await conn.execute(select(func.pg_advisory_lock(MIGRATION_LOCK_KEY)))
    await conn.commit()
    try:
        await conn.run_sync(_upgrade)
        await conn.commit()
    finally:
        with contextlib.suppress(Exception):  # the session ending releases it anyway
            await conn.execute(select(func.pg_advisory_unlock(MIGRATION_LOCK_KEY)))
            await conn.commit()


def _flock(path: Path) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("ab")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


# --- queries ---------------------------------------------------------------------------------

Cursor = tuple[dt.datetime, uuid.UUID]


def _insert_ignoring_duplicates(engine: AsyncEngine) -> Any:
    """One statement for any number of rows (executemany), so SQLAlchemy compiles it once and
    caches it; a multi-row VALUES list was compiled afresh on every drain (~2 ms of CPU)."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    statement = insert(_TABLE).on_conflict_do_nothing(index_elements=["uid"])
    return statement.returning(_TABLE.c.uid)  # the rows really added (rowcount is unreliable)


class PredictionRepository:
    """Idempotent inserts and user-scoped reads/deletes of `predictions`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._insert = _insert_ignoring_duplicates(engine)

    async def insert_many(self, records: Sequence[PredictionRecord]) -> int:
        """Insert rows, ignoring uids already there (a retried drain). Returns rows added."""
        if not records:
            return 0
        async with self.engine.begin() as conn:
            result = await conn.execute(self._insert, [r.to_row() for r in records])
            return len(result.all())

    async def page(
        self,
        user_uid: uuid.UUID,
        limit: int,
        after: Cursor | None = None,
        class_name: str | None = None,
    ) -> list[PredictionRecord]:
        """The user's predictions, newest first, strictly after `after` (keyset pagination)."""
        c = _TABLE.c
        query = select(_TABLE).where(c.user_uid == user_uid)
        if class_name is not None:
            query = query.where(c.predicted_class_name == class_name)
        if after is not None:
            created_at, uid = after
            query = query.where(
                or_(c.created_at < created_at, and_(c.created_at == created_at, c.uid < uid))
            )
        query = query.order_by(c.created_at.desc(), c.uid.desc()).limit(limit)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [PredictionRecord.from_row(row) for row in rows]

    async def get(self, user_uid: uuid.UUID, uid: uuid.UUID) -> PredictionRecord | None:
        query = select(_TABLE).where(_TABLE.c.uid == uid, _TABLE.c.user_uid == user_uid)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else PredictionRecord.from_row(row)

    async def delete(self, user_uid: uuid.UUID, uid: uuid.UUID) -> bool:
        """Delete the row and its feedback (one transaction; SQLite has no cascade here)."""
        statement = delete(_TABLE).where(_TABLE.c.uid == uid, _TABLE.c.user_uid == user_uid)
        async with self.engine.begin() as conn:
            await conn.execute(
                delete(_FEEDBACK).where(
                    _FEEDBACK.c.prediction_uid == uid, _FEEDBACK.c.user_uid == user_uid
                )
            )
            result = await conn.execute(statement)
        return (result.rowcount or 0) > 0

    # --- feedback ------------------------------------------------------------------------

    async def set_feedback(self, feedback: FeedbackRecord) -> FeedbackRecord | None:
        """Insert or replace the feedback of a prediction; returns the one it replaced.

        Raises LookupError when the user has no such stored prediction; the owner check and the
        write are one transaction (the row is locked on PostgreSQL), so a concurrent delete
        cannot leave an orphan.
        """
        f = _FEEDBACK.c
        async with self.engine.begin() as conn:
            owned = select(_TABLE.c.uid).where(
                _TABLE.c.uid == feedback.prediction_uid, _TABLE.c.user_uid == feedback.user_uid
            )
            if self.engine.dialect.name == "postgresql":
                owned = owned.with_for_update()
            if (await conn.execute(owned)).first() is None:
                raise LookupError(str(feedback.prediction_uid))
            current = select(_FEEDBACK).where(f.prediction_uid == feedback.prediction_uid)
            previous_row = (await conn.execute(current)).first()
            if previous_row is None:
                await conn.execute(_FEEDBACK.insert().values(feedback.to_row()))
                return None
            previous = FeedbackRecord.from_row(previous_row)
            if (previous.correct_class, previous.correct_class_name) != (
                feedback.correct_class, feedback.correct_class_name,
            ):
                await conn.execute(
                    _FEEDBACK.update()
                    .where(f.prediction_uid == feedback.prediction_uid)
                    .values(feedback.to_row())
                )
            return previous

    async def delete_feedback(self, user_uid: uuid.UUID, uid: uuid.UUID) -> FeedbackRecord | None:
        """Retract the feedback of the user's prediction; returns what was removed, if any."""
        f = _FEEDBACK.c
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    select(_FEEDBACK).where(f.prediction_uid == uid, f.user_uid == user_uid)
                )
            ).first()
            if row is None:
                return None
            await conn.execute(delete(_FEEDBACK).where(f.prediction_uid == uid))
        return FeedbackRecord.from_row(row)

    async def feedback_for(self, uids: Sequence[uuid.UUID]) -> dict[uuid.UUID, FeedbackRecord]:
        """The feedback of these predictions (those that have one)."""
        if not uids:
            return {}
        query = select(_FEEDBACK).where(_FEEDBACK.c.prediction_uid.in_(list(uids)))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {row.prediction_uid: FeedbackRecord.from_row(row) for row in rows}

    async def feedback_stats(self, model_version: str) -> tuple[int, int]:
        """(feedback received, of which agreed) for a model version."""
        f = _FEEDBACK.c
        query = select(func.count(), func.count().filter(f.agreed.is_(True))).where(
            f.model_version == model_version
        )
        async with self.engine.connect() as conn:
            total, agreed = (await conn.execute(query)).one()
        return int(total), int(agreed or 0)

    # --- erasure -------------------------------------------------------------------------

    async def image_paths(self, user_uid: uuid.UUID, limit: int = 500) -> list[str]:
        """Up to `limit` object keys of the user's predictions (erasure walks them in pages)."""
        query = select(_TABLE.c.image_path).where(_TABLE.c.user_uid == user_uid).limit(limit)
        async with self.engine.connect() as conn:
            return [row[0] for row in (await conn.execute(query)).all()]

    async def mark_erasure(self, user_uid: uuid.UUID, requested_at: dt.datetime) -> None:
        """Note that the user's data is being erased (the export skips them from now on)."""
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        statement = insert(_ERASURES).values(user_uid=user_uid, requested_at=requested_at)
        async with self.engine.begin() as conn:
            await conn.execute(statement.on_conflict_do_nothing(index_elements=["user_uid"]))

    async def unmark_erasure(self, user_uid: uuid.UUID) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(delete(_ERASURES).where(_ERASURES.c.user_uid == user_uid))

    async def delete_rows(self, user_uid: uuid.UUID, image_paths: Sequence[str]) -> int:
        """Delete the user's rows with these keys, and their feedback."""
        if not image_paths:
            return 0
        c = _TABLE.c
        uids = select(c.uid).where(c.user_uid == user_uid, c.image_path.in_(list(image_paths)))
        async with self.engine.begin() as conn:
            await conn.execute(delete(_FEEDBACK).where(_FEEDBACK.c.prediction_uid.in_(uids)))
            result = await conn.execute(
                delete(_TABLE).where(c.user_uid == user_uid, c.image_path.in_(list(image_paths)))
            )
        return max(result.rowcount or 0, 0)

    async def count(self, user_uid: uuid.UUID | None = None) -> int:
        query = select(func.count()).select_from(_TABLE)
        if user_uid is not None:
            query = query.where(_TABLE.c.user_uid == user_uid)
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())
