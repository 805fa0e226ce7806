"""Response bodies (the predict fields are a contract: add, never rename or remove)."""

from __future__ import annotations

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


class ErrorOut(BaseModel):
    detail: str


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
