"""GET /api/v1/inference/model: what is serving and how."""

from __future__ import annotations

from fastapi import APIRouter

from rottenbot_inference.api.deps import CurrentUser, ReadyState
from rottenbot_inference.api.schemas import ModelOut

router = APIRouter(prefix="/api/v1/inference", tags=["inference"])


@router.get("/model", response_model=ModelOut, summary="The model serving now")
async def model_info(state: ReadyState, _: CurrentUser) -> ModelOut:
    bundle = state.service.bundle
    assert bundle is not None  # ReadyState guarantees it
    settings = state.settings
    return ModelOut(
        **bundle.describe(),
        batching={
            "max_batch_size": settings.max_batch_size,
            "max_batch_delay_ms": settings.max_batch_delay_ms,
            "queue_capacity": settings.queue_capacity,
            "request_timeout_s": settings.request_timeout_s,
            "preprocess_threads": settings.effective_preprocess_threads,
        },
    )
