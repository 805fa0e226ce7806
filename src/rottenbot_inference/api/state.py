"""What the routes share: settings, the inference service, the token verifier, readiness."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from fastapi import Request

from rottenbot_inference.auth.blocklist import Blocklist, InMemoryBlocklist
from rottenbot_inference.auth.tokens import TokenVerifier
from rottenbot_inference.inference.service import InferenceService
from rottenbot_inference.settings import Settings

if TYPE_CHECKING:
    from rottenbot_inference.auth.ratelimit import RateLimiter
    from rottenbot_inference.inference.challenger import Challenger
    from rottenbot_inference.inference.explainer import Explainer
    from rottenbot_inference.inference.reloader import ModelManager
    from rottenbot_inference.storage.service import PredictionStore


class Phase(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"  # signalled to stop: in-flight requests finish, new ones get 503
    SHUTTING_DOWN = "shutting_down"


SERVING = frozenset({Phase.READY, Phase.DRAINING})  # requests already admitted keep going
STOPPING = frozenset({Phase.DRAINING, Phase.SHUTTING_DOWN})  # new API requests are refused


@dataclass
class AppState:
    settings: Settings
    service: InferenceService
    verifier: TokenVerifier
    phase: Phase = Phase.LOADING
    detail: str | None = None
    blocklist: Blocklist = field(default_factory=InMemoryBlocklist)
    predictions: PredictionStore | None = None  # saved predictions (outbox, database, images)
    models: ModelManager | None = None  # model loading, hot swaps and their reporting
    rate_limiter: RateLimiter | None = None  # per-user token buckets (RATE_LIMIT_PER_MINUTE)
    explainer: Explainer | None = None  # explanation heatmaps (low priority, own cap)
    challenger: Challenger | None = None  # the shadow challenger (CHALLENGER_URI)


async def get_state(request: Request) -> AppState:
    """The app's state. Cheap dependencies are `async def` on purpose: FastAPI runs a plain
    `def` dependency in a worker thread, a thread hand-off per request for nothing."""
    return request.app.state.rottenbot
