"""The per-user rate limit as a dependency of the predict route (see auth/ratelimit.py).

Runs after the token is verified (the bucket is the token's `user_uid`) and answers:
- over the limit: 429 with Retry-After and RateLimit-Limit/-Remaining/-Reset;
- within it: the request goes on, and its response carries the RateLimit-* headers;
- the shared bucket unreachable: 503 + Retry-After, or with AUTH_FAIL_OPEN the request goes
  through unlimited (logged) - the revocation check's policy.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Depends, HTTPException, Response

from rottenbot_inference.api.deps import CurrentUser
from rottenbot_inference.api.errors import ServiceUnavailable
from rottenbot_inference.api.state import AppState, get_state
from rottenbot_inference.auth.ratelimit import RateLimitUnavailable
from rottenbot_inference.auth.redis_store import RateLimitedLog
from rottenbot_inference.telemetry.metrics import record_rejection

log = logging.getLogger(__name__)
_warn_open = RateLimitedLog(log, logging.WARNING)

UNAVAILABLE_RATE_LIMIT = "The rate limit cannot be checked right now; retry shortly."


async def enforce_rate_limit(
    state: Annotated[AppState, Depends(get_state)], user: CurrentUser, response: Response
) -> None:
    limiter = state.rate_limiter
    if limiter is None:
        return
    try:
        decision = await limiter.acquire(str(user.user_uid))
    except RateLimitUnavailable:
        if state.settings.auth_fail_open:
            _warn_open("AUTH_FAIL_OPEN: the rate limit store is unreachable; not limiting")
            return
        record_rejection("rate_limit_unavailable")
        raise ServiceUnavailable(UNAVAILABLE_RATE_LIMIT) from None
    headers = decision.headers()
    if not decision.allowed:
        raise HTTPException(
            status_code=429,
            detail=f"Too many requests; retry in {decision.retry_after_s} s.",
            headers=headers,
        )
    response.headers.update(headers)


RateLimited = Depends(enforce_rate_limit)
