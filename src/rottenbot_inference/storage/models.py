"""The `predictions` table: the old columns (docs/contracts.md) plus what retraining needs."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    Text,
    TypeDecorator,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UtcDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC in Python on every backend.

    PostgreSQL stores `timestamptz`. SQLite has no time zones, so values are stored as UTC
    without an offset (SQLAlchemy's fixed-width text format keeps them sortable) and come back
    tagged UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: use an aware UTC datetime")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    pass


class Prediction(Base):
    __tablename__ = "predictions"

    uid: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    image_path: Mapped[str] = mapped_column(Text, unique=True)
    predicted_class: Mapped[int] = mapped_column(Integer)
    predicted_class_name: Mapped[str] = mapped_column(Text)
    confidence: Mapped[float] = mapped_column(Float)
    user_uid: Mapped[uuid.UUID] = mapped_column(Uuid)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    # Added by us (nullable: rows written by the previous service lack them).
    model_name: Mapped[str | None] = mapped_column(Text)
    model_version: Mapped[str | None] = mapped_column(Text)
    content_type: Mapped[str | None] = mapped_column(Text)
    image_format: Mapped[str | None] = mapped_column(Text)
    image_width: Mapped[int | None] = mapped_column(Integer)
    image_height: Mapped[int | None] = mapped_column(Integer)
    image_bytes: Mapped[int | None] = mapped_column(Integer)
    image_sha256: Mapped[str | None] = mapped_column(Text)
    top_k: Mapped[list[dict[str, Any]] | None] = mapped_column(
        JSON().with_variant(JSONB(), "postgresql")
    )


class Feedback(Base):
    """The owner's correction of a saved prediction (migration 0002): at most one each."""

    __tablename__ = "prediction_feedback"

    prediction_uid: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("predictions.uid", ondelete="CASCADE"), primary_key=True
    )
    user_uid: Mapped[uuid.UUID] = mapped_column(Uuid)
    correct_class: Mapped[int] = mapped_column(Integer)
    correct_class_name: Mapped[str] = mapped_column(Text)
    model_version: Mapped[str | None] = mapped_column(Text)
    agreed: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)


class UserErasure(Base):
    """A user whose data is being erased (migration 0003); deleted once nothing is left."""

    __tablename__ = "user_erasures"

    user_uid: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    requested_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)


class ShadowComparison(Base):
    """One prediction scored by the champion and the shadow challenger (migration 0004).

    `prediction_uid` names the saved prediction, when it was saved (feedback joins on it); no
    foreign key: the comparison is written before the outbox has drained the prediction.
    """

    __tablename__ = "shadow_comparisons"

    uid: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    champion_version: Mapped[str] = mapped_column(Text)
    challenger_version: Mapped[str] = mapped_column(Text)
    champion_class: Mapped[int] = mapped_column(Integer)
    champion_class_name: Mapped[str] = mapped_column(Text)
    champion_confidence: Mapped[float] = mapped_column(Float)
    challenger_class: Mapped[int] = mapped_column(Integer)
    challenger_class_name: Mapped[str] = mapped_column(Text)
    challenger_confidence: Mapped[float] = mapped_column(Float)
    agreed: Mapped[bool] = mapped_column(Boolean)
    challenger_ms: Mapped[float] = mapped_column(Float)
    prediction_uid: Mapped[uuid.UUID | None] = mapped_column(Uuid)


Index("ix_prediction_feedback_model_version_updated", Feedback.model_version, Feedback.updated_at)
Index(
    "ix_shadow_comparisons_pair_created",
    ShadowComparison.champion_version, ShadowComparison.challenger_version,
    ShadowComparison.created_at,
)
Index("ix_shadow_comparisons_prediction", ShadowComparison.prediction_uid)


# History: WHERE user_uid = ? [AND predicted_class_name = ?] ORDER BY created_at DESC, uid DESC
# (keyset pagination walks these indexes without sorting).
Index(
    "ix_predictions_user_created_uid",
    Prediction.user_uid, Prediction.created_at.desc(), Prediction.uid.desc(),
)
Index(
    "ix_predictions_user_class_created_uid",
    Prediction.user_uid, Prediction.predicted_class_name, Prediction.created_at.desc(),
    Prediction.uid.desc(),
)
