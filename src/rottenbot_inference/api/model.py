"""GET /api/v1/inference/model: what is serving and how."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import Field

from rottenbot_inference.api.deps import CurrentUser, ReadyState
from rottenbot_inference.api.schemas import ModelOut, error_responses

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
