"""Liveness and readiness probes (no auth)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from rottenbot_inference.api.schemas import HealthOut
from rottenbot_inference.api.state import AppState, Phase, get_state

router = APIRouter(prefix="/health", tags=["health"])


@router.get(
    "/live", response_model=HealthOut, response_model_exclude_none=True, summary="The process is up"
)
async def live() -> HealthOut:
    return HealthOut(status="alive")


@router.get(
    "/ready",
    response_model=HealthOut,
    responses={503: {"model": HealthOut}},
    summary="A warmed-up model is serving",
)
async def ready(state: Annotated[AppState, Depends(get_state)]) -> JSONResponse:
    bundle = state.service.bundle
    body = HealthOut(
        status=state.phase.value,
        detail=state.detail,
        model_version=bundle.version if bundle else None,
    )
    status = 200 if state.phase is Phase.READY else 503
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status)
