"""Operator endpoints under /api/v1/admin, guarded by their own credential (ADMIN_API_KEY).

With ADMIN_API_KEY unset they do not exist (404). The key goes in `X-Admin-Key: <key>` (or
`Authorization: Bearer <key>`); user access tokens are no admin credential.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from rottenbot_inference.api.state import AppState, get_state

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1/admin", tags=["admin"])

STATUS_BY_OUTCOME = {"swapped": 200, "unchanged": 200, "failed": 409, "unreachable": 503}


async def require_admin(request: Request, state: Annotated[AppState, Depends(get_state)]) -> None:
    """404 when admin is off; 401 unless the request carries ADMIN_API_KEY (compared in
    constant time)."""
    configured = state.settings.admin_api_key
    if configured is None or not configured.get_secret_value():
        raise HTTPException(status_code=404, detail="Not Found")
    supplied = request.headers.get("x-admin-key")
    if supplied is None:
        scheme, _, value = (request.headers.get("authorization") or "").strip().partition(" ")
        supplied = value.strip() if scheme.lower() == "bearer" else None
    expected = configured.get_secret_value().encode()
    if not supplied or not hmac.compare_digest(supplied.encode(), expected):
        log.warning("admin request refused: missing or wrong admin key (%s)", request.url.path)
        raise HTTPException(
            status_code=401, detail="Not authenticated: admin key required",
            headers={"WWW-Authenticate": 'Bearer realm="admin"'},
        )


Admin = Annotated[None, Depends(require_admin)]


@router.post(
    "/reload",
    summary="Check the model source now and swap in a new version",
    responses={
        200: {"description": "swapped, or unchanged (already serving what the source names)"},
        202: {"description": "still loading after wait_s; see GET /api/v1/inference/model"},
        401: {"description": "missing or wrong admin key"},
        404: {"description": "ADMIN_API_KEY is not set"},
        409: {"description": "the new version was refused; the old one keeps serving"},
        503: {"description": "the registry is unreachable, or no model is loaded yet"},
    },
)
async def reload_model(
    state: Annotated[AppState, Depends(get_state)],
    _: Admin,
    reinstall: Annotated[
        bool, Query(description="Load and swap even if the version is the one serving")
    ] = False,
    wait_s: Annotated[
        float, Query(ge=0, le=3600, description="How long to wait for the outcome")
    ] = 300.0,
) -> JSONResponse:
    """Same as SIGHUP: re-resolve MODEL_URI (or re-read MODEL_PATH), and if it names another
    version, download, convert, verify and warm it up, then swap. A version refused earlier
    is tried again."""
    manager = state.models
    if manager is None or manager.current is None:
        return JSONResponse({"detail": "No model is loaded yet."}, status_code=503)
    future = manager.request_reload("admin", retry_failed=True, reinstall=reinstall)
    try:
        result = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), wait_s)
    except TimeoutError:
        return JSONResponse({"outcome": "pending", "version": manager.current.bundle.version},
                            status_code=202)
    except RuntimeError as exc:  # shutting down
        return JSONResponse({"detail": str(exc)}, status_code=503)
    return JSONResponse(result.as_dict(), status_code=STATUS_BY_OUTCOME[result.outcome])
