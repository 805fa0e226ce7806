"""Request dependencies: the caller's identity and a ready model."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from rottenbot_inference.api.errors import ServiceUnavailable
from rottenbot_inference.api.state import SERVING, AppState, get_state
from rottenbot_inference.auth.blocklist import BlocklistUnavailable
from rottenbot_inference.auth.keys import KeysUnavailable
from rottenbot_inference.auth.tokens import AuthError, Principal
from rottenbot_inference.telemetry import traced
from rottenbot_inference.telemetry.metrics import record_rejection

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="Access token from the RottenBot auth service")

UNAVAILABLE_KEYS = "The token signing keys cannot be loaded right now; retry shortly."
UNAVAILABLE_REVOCATION = (
    "Token revocation cannot be checked right now (the revocation store is unreachable); "
    "retry shortly."
)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def bearer_token(request: Request) -> str:
    """The token of `Authorization: Bearer <token>`; 401 for anything else."""
    header = request.headers.get("authorization")
    if not header or not header.strip():
        raise _unauthorized("Not authenticated")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise _unauthorized("Not authenticated: use the Bearer scheme")
    token = token.strip()
    if not token:
        raise _unauthorized("Not authenticated: the Bearer token is empty")
    return token


async def current_user(
    request: Request,
    state: Annotated[AppState, Depends(get_state)],
    _docs: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The verified, unrevoked caller; every token failure is a 401 the frontend understands.

    Order: signature and claims first (cheap, no I/O), then the revocation store. If keys or
    the revocation store cannot be had, a 503 with Retry-After (fail closed).
    """
    token = bearer_token(request)
    # Spans carry the outcome and the user id, never the token.
    with traced("verify_token") as span:
        try:
            principal = await state.verifier.verify_async(token)
        except AuthError as exc:
            log.debug("token refused: %s", exc)
            span.set_attribute("auth.result", "refused")
            raise _unauthorized(str(exc)) from None
        except KeysUnavailable:
            record_rejection("auth_keys_unavailable")
            raise ServiceUnavailable(UNAVAILABLE_KEYS) from None
        user_id = str(principal.user_uid)
        span.set_attributes({"auth.result": "valid", "enduser.id": user_id})
    request.state.user_id = user_id  # the access log and the request span report it
    with traced("check_revocation") as span:
        try:
            revoked = await state.blocklist.is_revoked(principal.jti)
        except BlocklistUnavailable:
            record_rejection("revocation_unavailable")
            raise ServiceUnavailable(UNAVAILABLE_REVOCATION) from None
        span.set_attribute("auth.revoked", revoked)
    if revoked:
        log.debug("token refused: revoked (user %s)", principal.user_uid)
        raise _unauthorized("Token has been revoked")
    return principal


async def ready_state(state: Annotated[AppState, Depends(get_state)]) -> AppState:
    """The state, once a model is serving; 503 before that and once shut down.

    While draining, a request that was admitted before the signal still gets its answer (new
    ones are refused earlier, by api/draining.py).
    """
    if state.phase not in SERVING:
        record_rejection("not_ready")
        raise ServiceUnavailable(f"The model is not ready ({state.phase.value}).")
    return state


CurrentUser = Annotated[Principal, Depends(current_user)]
ReadyState = Annotated[AppState, Depends(ready_state)]
