"""Metrics of the shadow challenger (same meter and `service_name` label as metrics.py).

- `inference_shadow_comparisons_total{champion_version, challenger_version, agreed}`: shadowed
  predictions by model pair and whether the two top-1 classes agreed (agreement rate =
  agreed="true" / all, per pair);
- `inference_challenger_duration_milliseconds{challenger_version}`: the challenger's model run
  for one shadowed image;
- `inference_shadow_skipped_total{reason}`: sampled predictions the challenger never scored
  (busy, shedding, queue_full, same_version, not_loaded, error);
- `inference_challenger_loads_total{outcome}`, `inference_challenger_reloads_total{trigger,
  outcome}`: the challenger's own model loads and reload checks (the champion's are counted in
  `inference_model_loads_total` / `inference_model_reloads_total`).

Nothing here is recorded without CHALLENGER_URI.
"""

from __future__ import annotations

from opentelemetry import metrics

from rottenbot_inference.telemetry import metrics as service_metrics

_meter = metrics.get_meter("rottenbot_inference")

SKIP_REASONS = ("busy", "shedding", "queue_full", "same_version", "not_loaded", "error")

comparisons = _meter.create_counter(
    "inference_shadow_comparisons_total",
    unit="1",
    description="Predictions scored by the challenger too, by champion and challenger version "
    "and whether their top-1 classes agreed (agreed=true|false)",
)
challenger_duration = _meter.create_histogram(
    "inference_challenger_duration_milliseconds",
    unit="ms",
    description="The challenger's model run for one shadowed image (niced, off the response path)",
    explicit_bucket_boundaries_advisory=service_metrics.STAGE_BUCKETS_MS,
)
skipped = _meter.create_counter(
    "inference_shadow_skipped_total",
    unit="1",
    description="Sampled predictions the challenger did not score, by reason (busy: the "
    "champion had work queued; shedding: requests were refused at admission; "
    "queue_full; same_version; not_loaded; error)",
)
challenger_loads = _meter.create_counter(
    "inference_challenger_loads_total",
    unit="1",
    description="Challenger model loads, by outcome (success, failure, reused)",
)
challenger_reloads = _meter.create_counter(
    "inference_challenger_reloads_total",
    unit="1",
    description="Challenger reload checks by trigger and outcome (unchanged polls not counted)",
)


def _labels(**extra: str) -> dict[str, str]:
    return {"service_name": service_metrics.SERVICE_NAME, **extra}


def start() -> None:
    """Every skip reason exists from 0 once a challenger is configured."""
    for reason in SKIP_REASONS:
        skipped.add(0, _labels(reason=reason))


def record_comparison(
    champion_version: str, challenger_version: str, agreed: bool, challenger_ms: float
) -> None:
    comparisons.add(
        1,
        _labels(
            champion_version=champion_version,
            challenger_version=challenger_version,
            agreed="true" if agreed else "false",
        ),
    )
    challenger_duration.record(challenger_ms, _labels(challenger_version=challenger_version))


def record_skip(reason: str) -> None:
    skipped.add(1, _labels(reason=reason))


def record_load(outcome: str) -> None:
    challenger_loads.add(1, _labels(outcome=outcome))


def record_reload(trigger: str, outcome: str) -> None:
    challenger_reloads.add(1, _labels(trigger=trigger, outcome=outcome))
