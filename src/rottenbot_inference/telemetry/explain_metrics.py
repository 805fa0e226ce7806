"""Metrics of explanation heatmaps (same meter and `service_name` label as metrics.py).

- `inference_explanations_total{outcome}`: explanation requests by outcome (ok, shed, busy,
  deadline, cancelled, bad_input, error);
- `inference_explanation_duration_milliseconds`: time one explanation took in its thread
  (decode, every model pass, and the time it stood aside for predictions);
- `inference_explanation_yield_milliseconds`: of that, the time it stood aside;
- `inference_explanations_in_progress`: explanation requests admitted and not yet answered.

Refusals (503) are also counted in `inference_rejected_requests_total` with reason
`explain_shed` or `explain_busy`.
"""

from __future__ import annotations

from opentelemetry import metrics

from rottenbot_inference.telemetry import metrics as service_metrics

_meter = metrics.get_meter("rottenbot_inference")

EXPLAIN_BUCKETS_MS = (
    5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 400.0, 500.0, 750.0, 1000.0,
    1500.0, 2500.0, 5000.0, 10000.0, 30000.0,
)

explanations = _meter.create_counter(
    "inference_explanations_total", unit="1",
    description="Explanation requests, by outcome (ok, shed, busy, deadline, cancelled, "
    "bad_input, error)",
)
explanation_duration = _meter.create_histogram(
    "inference_explanation_duration_milliseconds", unit="ms",
    description="Time one explanation took in its thread (decode, model passes, yields)",
    explicit_bucket_boundaries_advisory=EXPLAIN_BUCKETS_MS,
)
explanation_yield = _meter.create_histogram(
    "inference_explanation_yield_milliseconds", unit="ms",
    description="Time one explanation stood aside while predictions were queued",
    explicit_bucket_boundaries_advisory=EXPLAIN_BUCKETS_MS,
)
in_progress = _meter.create_up_down_counter(
    "inference_explanations_in_progress", unit="{request}",
    description="Explanation requests admitted and not yet answered",
)


def _labels(**extra: str) -> dict[str, str]:
    return {"service_name": service_metrics.SERVICE_NAME, **extra}


def record_outcome(outcome: str) -> None:
    explanations.add(1, _labels(outcome=outcome))


def record_refusal(reason: str) -> None:
    """A 503 before any work: `explain_shed` (predictions busy) or `explain_busy` (cap)."""
    service_metrics.record_rejection(reason)
    record_outcome(reason.removeprefix("explain_"))


def record_duration(total_ms: float, yielded_ms: float) -> None:
    explanation_duration.record(total_ms, _labels())
    explanation_yield.record(yielded_ms, _labels())


def admitted(delta: int) -> None:
    in_progress.add(delta, _labels())
