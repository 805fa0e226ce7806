"""Request dependencies: the caller's identity and a ready model."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from rottenbot_inference.api.errors import ServiceUnavailable
from rottenbot_inference.api.state import AppState, Phase, get_state
from rottenbot_inference.auth.tokens import AuthError, Principal

_bearer = HTTPBearer(auto_error=False, description="Access token from the RottenBot auth service")


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


async def current_user(
    state: Annotated[AppState, Depends(get_state)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The verified caller; every failure is a 401 the frontend understands."""
    if credentials is None:
        raise _unauthorized("Not authenticated")
    try:
        return state.verifier.verify(credentials.credentials)
    except AuthError as exc:
        raise _unauthorized(str(exc)) from None


def ready_state(state: Annotated[AppState, Depends(get_state)]) -> AppState:
    """The state, once a model is serving; 503 before that and while shutting down."""
    if state.phase is not Phase.READY:
        raise ServiceUnavailable(f"The model is not ready ({state.phase.value}).")
    return state


CurrentUser = Annotated[Principal, Depends(current_user)]
ReadyState = Annotated[AppState, Depends(ready_state)]
