"""How far a challenger agrees with the champion: one comparison, and the summary of many.

`Aggregate` keeps the counts of the comparisons of one (champion, challenger) version pair in
memory; the database (storage/comparisons.py) computes the same `Summary` with SQL over every
replica's comparisons. The agreement rate comes with a Wilson score interval, which stays inside
[0, 1] and is sound at small counts and at rates near 0 or 1 (where the normal approximation
is not).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import uuid
from collections import Counter
from typing import Any

Z_95 = 1.959963984540054  # two-sided 95 %


@dataclasses.dataclass(frozen=True, slots=True)
class ComparisonRecord:
    """One prediction scored by both models (what is stored per shadowed prediction)."""

    uid: uuid.UUID
    created_at: dt.datetime  # aware, UTC
    champion_version: str
    challenger_version: str
    champion_class: int
    champion_class_name: str
    champion_confidence: float
    challenger_class: int
    challenger_class_name: str
    challenger_confidence: float
    challenger_ms: float  # the challenger's model run for this image
    prediction_uid: uuid.UUID | None = None  # the saved prediction (feedback joins on it)

    @property
    def agreed(self) -> bool:
        return self.champion_class_name == self.challenger_class_name

    def to_row(self) -> dict[str, Any]:
        row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        row["agreed"] = self.agreed
        return row


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float] | None:
    """The Wilson score interval of a binomial proportion (None without trials)."""
    if trials <= 0:
        return None
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclasses.dataclass(frozen=True)
class Summary:
    """The comparison of one version pair (the endpoint's body, less the model descriptions)."""

    champion_version: str
    challenger_version: str
    samples: int
    agreed: int
    confusion: dict[tuple[str, str], int]  # (champion top-1, challenger top-1) -> count
    confidence_delta_sum: float  # sum of challenger - champion top-1 confidence
    challenger_ms_sum: float
    feedback_count: int = 0  # comparisons whose prediction got owner feedback
    champion_correct: int = 0
    challenger_correct: int = 0

    def as_dict(self) -> dict[str, Any]:
        n = self.samples
        interval = wilson_interval(self.agreed, n)
        feedback = None
        if self.feedback_count:
            feedback = {
                "count": self.feedback_count,
                "champion_accuracy": self.champion_correct / self.feedback_count,
                "challenger_accuracy": self.challenger_correct / self.feedback_count,
                "champion_correct": self.champion_correct,
                "challenger_correct": self.challenger_correct,
            }
        return {
            "champion_version": self.champion_version,
            "challenger_version": self.challenger_version,
            "samples": n,
            "agreed": self.agreed,
            "agreement_rate": self.agreed / n if n else None,
            "agreement_interval": None
            if interval is None
            else {"low": interval[0], "high": interval[1], "confidence": 0.95, "method": "wilson"},
            "confusion": [
                {"champion": champion, "challenger": challenger, "count": count}
                for (champion, challenger), count in sorted(
                    self.confusion.items(), key=lambda item: (-item[1], item[0])
                )
            ],
            "mean_confidence_delta": self.confidence_delta_sum / n if n else None,
            "mean_challenger_ms": self.challenger_ms_sum / n if n else None,
            "feedback": feedback,
        }


class Aggregate:
    """Running counts per version pair, in memory (not thread-safe: the caller locks)."""

    def __init__(self) -> None:
        self._pairs: dict[tuple[str, str], _Counts] = {}

    def add(self, record: ComparisonRecord) -> None:
        pair = (record.champion_version, record.challenger_version)
        counts = self._pairs.setdefault(pair, _Counts())
        counts.samples += 1
        counts.agreed += record.agreed
        counts.confusion[(record.champion_class_name, record.challenger_class_name)] += 1
        counts.delta += record.challenger_confidence - record.champion_confidence
        counts.milliseconds += record.challenger_ms

    def summary(self, champion_version: str, challenger_version: str) -> Summary:
        counts = self._pairs.get((champion_version, challenger_version), _Counts())
        return Summary(
            champion_version,
            challenger_version,
            counts.samples,
            counts.agreed,
            dict(counts.confusion),
            counts.delta,
            counts.milliseconds,
        )


@dataclasses.dataclass
class _Counts:
    samples: int = 0
    agreed: int = 0
    confusion: Counter[tuple[str, str]] = dataclasses.field(default_factory=Counter)
    delta: float = 0.0
    milliseconds: float = 0.0
