"""GET /api/v1/inference/model/comparison: how the shadow challenger compares with the champion.

Guarded by the admin key (`X-Admin-Key`, like POST /api/v1/admin/reload; 404 while
ADMIN_API_KEY is unset). 404 as well when no challenger is configured (CHALLENGER_URI).
See docs/challenger.md for the fields.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from rottenbot_inference.api.admin import Admin
from rottenbot_inference.api.deps import ReadyState
from rottenbot_inference.api.schemas import error_responses

router = APIRouter(prefix="/api/v1/inference", tags=["inference"])

NO_CHALLENGER = "No challenger is configured (CHALLENGER_URI is unset)."
Version = Annotated[str | None, Query(min_length=1, max_length=200)]


class ComparisonOut(BaseModel):
    """The champion against the shadow challenger, on the same predictions."""

    champion: dict[str, Any] = Field(description="The serving model (name, version)")
    challenger: dict[str, Any] = Field(
        description="The challenger (URI, version, reloads) and this process's shadow counts "
        "(sampled, scored, skipped by reason)"
    )
    source: str = Field(
        description="database: every replica's comparisons (and feedback); memory: this "
        "process's since it started (no database reachable)"
    )
    champion_version: str
    challenger_version: str | None
    samples: int = Field(description="Predictions scored by both models")
    agreed: int = Field(description="Of which both gave the same top-1 class")
    agreement_rate: float | None = Field(description="agreed / samples (null without samples)")
    agreement_interval: dict[str, Any] | None = Field(
        description="95 % Wilson score interval of the agreement rate: low, high"
    )
    confusion: list[dict[str, Any]] = Field(
        description="Top-1 pairs: champion class, challenger class, count (most frequent first)"
    )
    mean_confidence_delta: float | None = Field(
        description="Mean of challenger minus champion top-1 confidence"
    )
    mean_challenger_ms: float | None = Field(description="Mean challenger run time per image")
    feedback: dict[str, Any] | None = Field(
        description="On the shadowed predictions that were saved and got owners' feedback: "
        "count and each model's accuracy (null without such feedback, or from memory)"
    )


@router.get(
    "/model/comparison",
    response_model=ComparisonOut,
    responses=error_responses(401, 404, 503),
    summary="The shadow challenger against the serving model (admin key)",
)
async def comparison(
    state: ReadyState,
    _: Admin,
    champion_version: Version = None,
    challenger_version: Version = None,
) -> ComparisonOut:
    """Agreement (with its 95 % interval), top-1 confusion, confidence delta and, where owners
    gave feedback, each model's accuracy, for a (champion, challenger) version pair: by default
    the pair serving now."""
    challenger = state.challenger
    if challenger is None:
        raise HTTPException(status_code=404, detail=NO_CHALLENGER)
    bundle = state.service.bundle
    assert bundle is not None  # ReadyState guarantees it
    described = challenger.describe()
    champion = champion_version or bundle.version
    versus = challenger_version or described["version"]
    body: dict[str, Any] = {
        "champion": {"name": bundle.name, "version": bundle.version},
        "challenger": described,
    }
    if versus is None:  # not loaded (yet), and no version asked for
        body.update(
            source="memory",
            champion_version=champion,
            challenger_version=None,
            samples=0,
            agreed=0,
            agreement_rate=None,
            agreement_interval=None,
            confusion=[],
            mean_confidence_delta=None,
            mean_challenger_ms=None,
            feedback=None,
        )
        return ComparisonOut(**body)
    summary, source = await challenger.comparisons.summary(champion, versus)
    return ComparisonOut(**body, source=source, **summary.as_dict())
