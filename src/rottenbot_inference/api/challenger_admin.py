"""POST /api/v1/admin/challenger/reload: the reload endpoint, for the shadow challenger.

Same credential and answers as POST /api/v1/admin/reload (api/admin.py); 404 as well when no
challenger is configured (CHALLENGER_URI).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import JSONResponse

from rottenbot_inference.api.admin import STATUS_BY_OUTCOME, Admin
from rottenbot_inference.api.comparison import NO_CHALLENGER
from rottenbot_inference.api.state import AppState, get_state

router = APIRouter(prefix="/api/v1/admin", tags=["admin"])


@router.post(
    "/challenger/reload",
    summary="Check the challenger's source now and swap in a new version",
    responses={
        200: {"description": "swapped, or unchanged (already serving what the source names)"},
        202: {"description": "still loading after wait_s; see GET .../model/comparison"},
        401: {"description": "missing or wrong admin key"},
        404: {"description": "ADMIN_API_KEY or CHALLENGER_URI is not set"},
        409: {"description": "the new version was refused; the old one keeps serving"},
        503: {"description": "the registry is unreachable, or the service is not started"},
    },
)
async def reload_challenger(
    state: Annotated[AppState, Depends(get_state)],
    _: Admin,
    reinstall: Annotated[
        bool, Query(description="Load and swap even if the version is the one serving")
    ] = False,
    wait_s: Annotated[
        float, Query(ge=0, le=3600, description="How long to wait for the outcome")
    ] = 300.0,
) -> JSONResponse:
    """Re-resolve CHALLENGER_URI; a new version is loaded, verified and swapped in, a version
    refused earlier is tried again."""
    challenger = state.challenger
    if challenger is None:
        raise HTTPException(status_code=404, detail=NO_CHALLENGER)
    future = challenger.manager.request_reload("admin", retry_failed=True, reinstall=reinstall)
    try:
        result = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), wait_s)
    except TimeoutError:
        return JSONResponse({"outcome": "pending"}, status_code=202)
    except RuntimeError as exc:  # not watching yet (champion still loading), or shutting down
        return JSONResponse({"detail": str(exc)}, status_code=503)
    return JSONResponse(result.as_dict(), status_code=STATUS_BY_OUTCOME[result.outcome])
