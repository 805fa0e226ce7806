"""One saved prediction as plain data: what the outbox spools, the database stores, the API
shows."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

STORED_TOP_K = 5  # classes kept with a saved prediction (useful for retraining / review)


@dataclasses.dataclass(slots=True)
class PredictionRecord:
    uid: uuid.UUID
    user_uid: uuid.UUID
    created_at: dt.datetime  # aware, UTC
    image_path: str  # object key in the image store
    predicted_class: int
    predicted_class_name: str
    confidence: float
    model_name: str | None = None
    model_version: str | None = None
    content_type: str | None = None
    image_format: str | None = None
    image_width: int | None = None
    image_height: int | None = None
    image_bytes: int | None = None
    image_sha256: str | None = None
    top_k: list[dict[str, Any]] | None = None

    @property
    def sort_key(self) -> tuple[dt.datetime, uuid.UUID]:
        """History order (newest first = descending on this key), as the database sorts it."""
        return (self.created_at, self.uid)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["uid"] = str(self.uid)
        data["user_uid"] = str(self.user_uid)
        data["created_at"] = self.created_at.isoformat()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PredictionRecord:
        values = {f.name: data.get(f.name) for f in dataclasses.fields(cls)}
        values["uid"] = uuid.UUID(data["uid"])
        values["user_uid"] = uuid.UUID(data["user_uid"])
        values["created_at"] = dt.datetime.fromisoformat(data["created_at"])
        return cls(**values)

    def to_row(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_row(cls, row: Any) -> PredictionRecord:
        mapping = row._mapping if hasattr(row, "_mapping") else row
        return cls(**{f.name: mapping[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True, slots=True)
class FeedbackRecord:
    """What the owner says a saved prediction really shows."""

    prediction_uid: uuid.UUID
    user_uid: uuid.UUID
    correct_class: int
    correct_class_name: str
    model_version: str | None
    agreed: bool  # the correct class is the predicted one
    updated_at: dt.datetime  # aware, UTC

    def to_row(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_row(cls, row: Any) -> FeedbackRecord:
        mapping = row._mapping if hasattr(row, "_mapping") else row
        return cls(**{f.name: mapping[f.name] for f in dataclasses.fields(cls)})


def object_key(user_uid: uuid.UUID, created_at: dt.datetime, uid: uuid.UUID, extension: str) -> str:
    """`<user_uid>/<yyyy>/<mm>/<dd>/<prediction_uid>.<ext>`: ours, never the client's filename.

    Grouping by user makes a user's data easy to find (and erase); the date spreads keys.
    """
    day = created_at.astimezone(dt.UTC)
    return f"{user_uid}/{day:%Y}/{day:%m}/{day:%d}/{uid}.{extension}"
