"""Response bodies (the predict fields are a contract: add, never rename or remove)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ClassScoreOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    class_index: int = Field(serialization_alias="class", description="Class index")
    class_name: str
    confidence: float


class PredictionOut(BaseModel):
    predicted_class: int = Field(description="Index of the most probable class")
    predicted_class_name: str = Field(description="e.g. Apple__Rotten")
    confidence: float = Field(description="Softmax probability of that class, 0-1")
    model_version: str = Field(description="Version of the model that answered")
    top_k: list[ClassScoreOut] | None = Field(
        None, description="The k most probable classes, best first (when top_k is given)"
    )
    prediction_uid: uuid.UUID | None = Field(
        None, description="With save_prediction=true: the uid of the saved prediction"
    )


class FeedbackIn(BaseModel):
    """What the saved prediction really shows."""

    model_config = ConfigDict(extra="forbid")

    correct_class: str | int = Field(
        description="Class name (e.g. Apple__Rotten) or class index of the serving model",
        examples=["Apple__Rotten", 3],
    )


class FeedbackOut(BaseModel):
    correct_class: int
    correct_class_name: str
    agreed: bool = Field(description="true: the prediction was right")
    model_version: str | None = Field(None, description="Version that made the prediction")
    updated_at: dt.datetime


class SavedPredictionOut(BaseModel):
    """A prediction from the caller's history."""

    uid: uuid.UUID
    created_at: dt.datetime
    predicted_class: int
    predicted_class_name: str
    confidence: float
    model_name: str | None = None
    model_version: str | None = None
    content_type: str | None = None
    image_width: int | None = None
    image_height: int | None = None
    image_bytes: int | None = None
    top_k: list[ClassScoreOut] | None = None
    image_url: str = Field(description="Where to fetch the saved image (same auth)")
    status: str = Field(description="stored, or pending (accepted, not yet in the database)")
    feedback: FeedbackOut | None = Field(None, description="The owner's correction, if given")


class PredictionPageOut(BaseModel):
    items: list[SavedPredictionOut]
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` for the next (older) page; absent on the last"
    )


class ErrorOut(BaseModel):
    detail: str


ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Invalid request",
    401: "Missing, invalid, expired or revoked token (WWW-Authenticate: Bearer)",
    403: "Forbidden",
    404: "Not found",
    408: "The request body arrived too slowly; the connection is closed",
    413: "Request body over the upload limit",
    429: "Too many requests; see Retry-After",
    500: "Internal error",
    503: "Not ready, overloaded or a dependency is down; see Retry-After",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error codes (`{"detail": ...}` bodies). Every status a route
    can answer must be declared: tests/test_api_fuzz.py checks it."""
    return {
        code: {"model": ErrorOut, "description": ERROR_DESCRIPTIONS[code]} for code in codes
    }


class ModelOut(BaseModel):
    name: str
    version: str
    source: str
    input_shape: list[int | None]
    input_dtype: str
    input_range: list[int]
    classes: list[str]
    runtime: dict[str, Any]
    batching: dict[str, Any]
    notes: list[str]


class HealthOut(BaseModel):
    status: str
    detail: str | None = None
    model_version: str | None = None


class ExplanationOut(BaseModel):
    """A prediction and the occlusion heatmap of one class (see docs/explanations.md)."""

    predicted_class: int = Field(description="Index of the most probable class")
    predicted_class_name: str = Field(description="e.g. Banana__Rotten")
    confidence: float = Field(description="Softmax probability of that class, 0-1")
    model_version: str = Field(description="Version of the model that answered")
    class_name: str = Field(description="The class the heatmap explains")
    class_confidence: float = Field(description="Softmax probability of the explained class")
    versus: str | None = Field(
        description="The contrast class (the heatmap shows why class_name rather than it), "
        "or null"
    )
    method: str = Field(description="How the heatmap was computed: occlusion")
    rows: int = Field(description="Grid rows (top to bottom)")
    cols: int = Field(description="Grid columns (left to right)")
    grid: list[list[float]] = Field(
        description="rows x cols, top row first: how much hiding each cell lowers log "
        "p(class_name) - log p(versus) (log p(class_name) without versus); > 0: the answer "
        "relies on that part of the picture"
    )
    passes: int = Field(description="Model passes the explanation took")
