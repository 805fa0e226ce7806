"""GET /api/v1/inference/model: what is serving and how."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter
from pydantic import Field

from rottenbot_inference.api.deps import CurrentUser, ReadyState
from rottenbot_inference.api.schemas import ModelOut, error_responses
from rottenbot_inference.api.state import AppState

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1/inference", tags=["inference"])


class ModelInfoOut(ModelOut):
    """The model, plus where it came from and how reloading goes (docs/models.md)."""

    run_id: str | None = Field(None, description="MLflow run that logged the model")
    serving_from_cache: bool = Field(
        False, description="true: the registry was unreachable; this is the last good model"
    )
    registry: dict[str, Any] | None = Field(
        None, description="MLflow coordinates (URI, version, alias, run) and reachability"
    )
    reload: dict[str, Any] | None = Field(
        None, description="Last reload check, last refused version, counts"
    )
    feedback: dict[str, Any] | None = Field(
        None,
        description="Owners' feedback on this version's saved predictions (all replicas, from "
        "the database): count, agreed, accuracy (agreed / count; null without feedback); "
        "absent when saved predictions are off or the database cannot be reached",
    )


@router.get(
    "/model",
    response_model=ModelInfoOut,
    responses=error_responses(401, 503),
    summary="The model serving now",
)
async def model_info(state: ReadyState, _: CurrentUser) -> ModelInfoOut:
    bundle = state.service.bundle
    assert bundle is not None  # ReadyState guarantees it
    settings = state.settings
    return ModelInfoOut(
        feedback=await _feedback(state, bundle.version),
        **bundle.describe(),
        **(state.models.describe() if state.models is not None else {}),
        batching={
            "max_batch_size": settings.max_batch_size,
            "max_batch_delay_ms": settings.max_batch_delay_ms,
            "queue_capacity": settings.queue_capacity,
            "request_timeout_s": settings.request_timeout_s,
            "inference_workers": state.service.batcher.workers,
            "preprocess_threads": settings.effective_preprocess_threads,
        },
    )


async def _feedback(state: AppState, version: str) -> dict[str, Any] | None:
    from rottenbot_inference.storage.service import StorageUnavailable

    if state.predictions is None:
        return None
    try:
        count, agreed = await state.predictions.feedback_stats(version)
    except StorageUnavailable as exc:
        log.debug("model info without feedback: %s", exc.detail)
        return None
    return {"count": count, "agreed": agreed, "accuracy": agreed / count if count else None}
