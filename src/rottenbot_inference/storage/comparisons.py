"""Shadow comparisons in the predictions database (table `shadow_comparisons`, migration 0004).

Every replica inserts its comparisons; the summary of a (champion, challenger) version pair is
computed here with SQL over all of them, and joined with the owners' feedback
(`prediction_feedback`) on the saved predictions that were shadowed.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Integer, case, cast, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from rottenbot_inference.inference.agreement import ComparisonRecord, Summary
from rottenbot_inference.storage.models import Feedback, ShadowComparison

_TABLE = ShadowComparison.__table__
_FEEDBACK = Feedback.__table__


class ComparisonRepository:
    """Inserts and summaries of `shadow_comparisons`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def insert_many(self, records: Sequence[ComparisonRecord]) -> int:
        if not records:
            return 0
        async with self.engine.begin() as conn:
            await conn.execute(_TABLE.insert(), [record.to_row() for record in records])
        return len(records)

    async def summary(self, champion_version: str, challenger_version: str) -> Summary:
        c = _TABLE.c
        pair = (c.champion_version == champion_version) & (
            c.challenger_version == challenger_version
        )
        totals = select(
            func.count(),
            func.coalesce(func.sum(cast(c.agreed, Integer)), 0),
            func.coalesce(func.sum(c.challenger_confidence - c.champion_confidence), 0.0),
            func.coalesce(func.sum(c.challenger_ms), 0.0),
        ).where(pair)
        confusion = (
            select(c.champion_class_name, c.challenger_class_name, func.count())
            .where(pair)
            .group_by(c.champion_class_name, c.challenger_class_name)
        )
        f = _FEEDBACK.c
        right = f.correct_class_name
        feedback = (
            select(
                func.count(),
                func.coalesce(func.sum(case((c.champion_class_name == right, 1), else_=0)), 0),
                func.coalesce(func.sum(case((c.challenger_class_name == right, 1), else_=0)), 0),
            )
            .select_from(_TABLE.join(_FEEDBACK, f.prediction_uid == c.prediction_uid))
            .where(pair)
        )
        async with self.engine.connect() as conn:
            samples, agreed, delta, milliseconds = (await conn.execute(totals)).one()
            cells = (await conn.execute(confusion)).all()
            judged, champion_right, challenger_right = (await conn.execute(feedback)).one()
        return Summary(
            champion_version=champion_version,
            challenger_version=challenger_version,
            samples=int(samples),
            agreed=int(agreed),
            confusion={(row[0], row[1]): int(row[2]) for row in cells},
            confidence_delta_sum=float(delta),
            challenger_ms_sum=float(milliseconds),
            feedback_count=int(judged),
            champion_correct=int(champion_right),
            challenger_correct=int(challenger_right),
        )
