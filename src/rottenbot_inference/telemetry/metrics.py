"""Metrics: one set of OpenTelemetry instruments, exported over OTLP and scraped at /metrics.

The instruments are created once from the global meter (proxies until the SDK is set up, so
recording before that is a no-op). The Prometheus exposition of the same instruments comes from
the SDK's PrometheusMetricReader, so names are identical on both paths: instrument names
already carry their unit and `_total` suffixes, which the Prometheus translation keeps as they
are (`inference_api_duration_milliseconds` with unit `ms` stays as it is).

Every data point carries `service_name` (the existing Grafana dashboard filters on it).
"""

from __future__ import annotations

import logging
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from fastapi.responses import Response
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from rottenbot_inference.storage.failures import REASONS as FAILURE_REASONS
from rottenbot_inference.storage.outbox import REFUSAL_REASONS

if TYPE_CHECKING:
    from rottenbot_inference.api.state import AppState

log = logging.getLogger(__name__)

SERVICE_NAME = "inference_service"  # replaced by OTEL_SERVICE_NAME at setup

# Fine enough for a p99 anywhere between 1 ms and 10 s, finest around 10-100 ms.
LATENCY_BUCKETS_MS = (
    1.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 75.0, 100.0, 150.0,
    200.0, 300.0, 500.0, 750.0, 1000.0, 2500.0, 5000.0, 10000.0,
)
STAGE_BUCKETS_MS = (
    0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.5, 15.0, 20.0, 25.0, 30.0, 40.0,
    50.0, 75.0, 100.0, 150.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0,
)
BATCH_SIZE_BUCKETS = (
    1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0, 256.0,
)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)
LOAD_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

_meter = metrics.get_meter("rottenbot_inference")

# --- HTTP API (names and labels the existing dashboard queries) ------------------------------
api_requests = _meter.create_counter(
    "inference_api_requests_total", unit="1",
    description="HTTP requests answered, by endpoint, method and status",
)
api_duration = _meter.create_histogram(
    "inference_api_duration_milliseconds", unit="ms",
    description="HTTP request duration, from the first byte in to the last byte out",
    explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
)
rejected = _meter.create_counter(
    "inference_rejected_requests_total", unit="1",
    description="Requests answered 503, by reason (queue_full, deadline_exceeded, not_ready, ...)",
)

# --- serving ------------------------------------------------------------------------------
queue_duration = _meter.create_histogram(
    "inference_queue_duration_milliseconds", unit="ms",
    description="Time an image waited in the batcher queue before its batch ran",
    explicit_bucket_boundaries_advisory=STAGE_BUCKETS_MS,
)
compute_duration = _meter.create_histogram(
    "inference_compute_duration_milliseconds", unit="ms",
    description="Model execution time of one batch",
    explicit_bucket_boundaries_advisory=STAGE_BUCKETS_MS,
)
batch_size = _meter.create_histogram(
    "inference_batch_size", unit="{image}",
    description="Images per model execution",
    explicit_bucket_boundaries_advisory=BATCH_SIZE_BUCKETS,
)
decode_duration = _meter.create_histogram(
    "inference_image_decode_duration_milliseconds", unit="ms",
    description="Image decode + resize time (in the preprocessing pool), by format",
    explicit_bucket_boundaries_advisory=STAGE_BUCKETS_MS,
)
model_loads = _meter.create_counter(
    "inference_model_loads_total", unit="1",
    description="Model loads, by outcome (success, failure, reused: a session already loaded)",
)
model_load_duration = _meter.create_histogram(
    "inference_model_load_duration_seconds", unit="s",
    description="Time to load (convert if needed) and warm up a model",
    explicit_bucket_boundaries_advisory=LOAD_BUCKETS_S,
)
model_swaps = _meter.create_counter(
    "inference_model_swaps_total", unit="1",
    description="Models installed for serving (the first load and every reload)",
)
model_reloads = _meter.create_counter(
    "inference_model_reloads_total", unit="1",
    description="Model reload checks by trigger (poll, signal, admin) and outcome "
    "(swapped, unchanged, failed, unreachable); unchanged polls are not counted",
)
registry_errors = _meter.create_counter(
    "inference_model_registry_errors_total", unit="1",
    description="Calls to the model registry (MLflow) that failed to reach it",
)

# --- model quality (drift) ------------------------------------------------------------------
predictions = _meter.create_counter(
    "inference_predictions_total", unit="1",
    description="Predictions served, by predicted class and model version",
)
confidence = _meter.create_histogram(
    "inference_prediction_confidence", unit="1",
    description="Confidence of the predicted class, by class and model version",
    explicit_bucket_boundaries_advisory=CONFIDENCE_BUCKETS,
)

# --- feedback: is the model right? (per model version) ----------------------------------------
FEEDBACK_WINDOW = 500  # the online accuracy gauge covers each version's latest this many
UNKNOWN_VERSION = "unknown"  # rows written by the previous service carry no model version

feedback_received = _meter.create_counter(
    "inference_feedback_total", unit="1",
    description="Feedback given or changed by owners of saved predictions, by model version "
    "and whether the correct class agreed with the prediction (agreed=true|false)",
)


class AccuracyWindow:
    """Per model version, the agreement of its latest FEEDBACK_WINDOW feedbacks (by prediction:
    a changed feedback replaces its earlier one, a retracted one leaves). In-process: each
    replica sees the feedback it handled since it started; the database has all of it."""

    def __init__(self, size: int = FEEDBACK_WINDOW) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._versions: dict[str, OrderedDict[uuid.UUID, bool]] = {}

    def add(self, model_version: str | None, uid: uuid.UUID, agreed: bool) -> None:
        version = model_version or UNKNOWN_VERSION
        with self._lock:
            self._drop(uid)
            window = self._versions.setdefault(version, OrderedDict())
            window[uid] = agreed
            while len(window) > self.size:
                window.popitem(last=False)

    def remove(self, uid: uuid.UUID) -> None:
        with self._lock:
            self._drop(uid)

    def _drop(self, uid: uuid.UUID) -> None:
        for window in self._versions.values():
            window.pop(uid, None)

    def accuracy(self) -> dict[str, tuple[float, int, int]]:
        """version -> (share agreeing, agreeing, feedbacks in the window); empty ones left out."""
        with self._lock:
            figures = {
                version: (sum(window.values()), len(window))
                for version, window in self._versions.items()
                if window
            }
        return {version: (agreed / n, agreed, n) for version, (agreed, n) in figures.items()}


def record_feedback(model_version: str | None, agreed: bool) -> None:
    """Feedback given or changed (the caller keeps its AccuracyWindow up to date)."""
    version = model_version or UNKNOWN_VERSION
    feedback_received.add(1, _labels(model_version=version, agreed=str(agreed).lower()))


# --- observed state (gauges read at collection time) ---------------------------------------
# One app per process in production; tests run several: the latest one still running is observed.
_states: list[weakref.ref[AppState]] = []


def bind_state(state: AppState) -> None:
    """Observe this app's batcher, outbox and model (from its start to its shutdown)."""
    _states.append(weakref.ref(state))


def unbind_state(state: AppState) -> None:
    _states[:] = [ref for ref in _states if ref() is not None and ref() is not state]


def _bound() -> AppState | None:
    for ref in reversed(_states):
        state = ref()
        if state is not None:
            return state
    return None


def _observe(read: Any) -> Any:
    """A callback yielding `read(state)`'s observations; never raises into the SDK."""

    def callback(_: CallbackOptions) -> Iterable[Observation]:
        state = _bound()
        if state is None:
            return []
        try:
            return list(read(state))
        except Exception:  # a half-started or stopping app: skip this collection
            log.debug("metrics callback failed", exc_info=True)
            return []

    return callback


def _labels(**extra: str) -> dict[str, str]:
    return {"service_name": SERVICE_NAME, **extra}


def _queued(state: AppState) -> Iterable[Observation]:
    yield Observation(state.service.batcher.queued, _labels())


def _executing(state: AppState) -> Iterable[Observation]:
    yield Observation(state.service.batcher.in_flight, _labels())


def _dropped(state: AppState) -> Iterable[Observation]:
    for reason, count in state.service.batcher.dropped.items():
        yield Observation(count, _labels(reason=reason))


def _model_info(state: AppState) -> Iterable[Observation]:
    bundle = state.service.bundle
    if bundle is not None:
        yield Observation(
            1,
            _labels(
                model_name=bundle.name, model_version=bundle.version,
                runtime=bundle.runtime.name,
            ),
        )


def _registry_reachable(state: AppState) -> Iterable[Observation]:
    models = getattr(state, "models", None)
    if models is not None and models.registry_reachable is not None:
        yield Observation(int(models.registry_reachable), _labels())


def _serving_from_cache(state: AppState) -> Iterable[Observation]:
    models = getattr(state, "models", None)
    if models is not None and models.current is not None:
        yield Observation(int(models.serving_from_cache), _labels())


def _backlog(state: AppState) -> Iterable[Observation]:
    if state.predictions is not None:
        yield Observation(state.predictions.backlog, _labels())


def _oldest(state: AppState) -> Iterable[Observation]:
    if state.predictions is not None:
        yield Observation(state.predictions.oldest_pending_age_s, _labels())


def _drained(state: AppState) -> Iterable[Observation]:
    if state.predictions is not None:
        yield Observation(state.predictions.drainer.drained, _labels())


def _drain_failures(state: AppState) -> Iterable[Observation]:
    if state.predictions is not None:
        yield from _by_reason(state.predictions.drainer.failures_by_reason, FAILURE_REASONS)


def _outbox_bytes(state: AppState) -> Iterable[Observation]:
    if state.predictions is not None:
        yield Observation(state.predictions.outbox.backlog_bytes, _labels())


def _outbox_parked(state: AppState) -> Iterable[Observation]:
    if state.predictions is not None:
        yield Observation(state.predictions.outbox.parked, _labels())


def _outbox_volume(state: AppState) -> Iterable[Observation]:
    if state.predictions is not None:
        free, total = state.predictions.outbox.volume_usage()
        yield Observation(free, _labels(kind="free"))
        yield Observation(total, _labels(kind="size"))


def _outbox_refused(state: AppState) -> Iterable[Observation]:
    if state.predictions is not None:
        yield from _by_reason(state.predictions.outbox.refused, REFUSAL_REASONS)


def _by_reason(counts: Mapping[str, int], known: Iterable[str]) -> Iterable[Observation]:
    """Every known reason from zero (so rates and alerts see the first one), then any other."""
    for reason in dict.fromkeys([*known, *counts]):
        yield Observation(counts.get(reason, 0), _labels(reason=reason))


_meter.create_observable_gauge(
    "inference_batcher_queue_size", [_observe(_queued)], unit="{image}",
    description="Images waiting in the batcher queue",
)
_meter.create_observable_gauge(
    "inference_batcher_executing", [_observe(_executing)], unit="{image}",
    description="Images in the batch the model is running now",
)
_meter.create_observable_counter(
    "inference_batcher_dropped_total", [_observe(_dropped)], unit="{image}",
    description="Images never computed because their client disconnected (cancelled) or "
    "their deadline passed (deadline) before the model reached them",
)
_meter.create_observable_gauge(
    "inference_model_info", [_observe(_model_info)], unit="1",
    description="The model serving now (value 1; name, version and runtime as labels)",
)
_meter.create_observable_gauge(
    "inference_model_registry_reachable", [_observe(_registry_reachable)], unit="1",
    description="1 when the last call to the model registry (MLflow) succeeded, 0 when not",
)
_meter.create_observable_gauge(
    "inference_model_serving_from_cache", [_observe(_serving_from_cache)], unit="1",
    description="1 while the model serving came from the local cache because the registry "
    "could not be reached to confirm it is current",
)
_meter.create_observable_gauge(
    "inference_outbox_backlog", [_observe(_backlog)], unit="{item}",
    description="Saved predictions durable in the outbox, not yet in the database",
)
_meter.create_observable_gauge(
    "inference_outbox_oldest_age_seconds", [_observe(_oldest)], unit="s",
    description="Age of the oldest saved prediction still in the outbox (0 when empty)",
)
_meter.create_observable_counter(
    "inference_outbox_drained_total", [_observe(_drained)], unit="1",
    description="Saved predictions moved from the outbox to the image store and database",
)
_meter.create_observable_counter(
    "inference_outbox_failures_total", [_observe(_drain_failures)], unit="1",
    description="Failed attempts to store an outbox item, by reason (transient ones retried "
    "with backoff, permanent ones parked)",
)
_meter.create_observable_gauge(
    "inference_outbox_bytes", [_observe(_outbox_bytes)], unit="By",
    description="Image bytes of the saved predictions waiting in the outbox",
)
_meter.create_observable_gauge(
    "inference_outbox_parked", [_observe(_outbox_parked)], unit="{item}",
    description="Outbox items set aside after a permanent failure (retried rarely, kept)",
)
_meter.create_observable_gauge(
    "inference_outbox_volume_bytes", [_observe(_outbox_volume)], unit="By",
    description="The outbox volume's free space (kind=free) and size (kind=size)",
)
_meter.create_observable_counter(
    "inference_outbox_refused_total", [_observe(_outbox_refused)], unit="{request}",
    description="Saves refused with 503, by reason (items, bytes, disk_reserve, disk_full, "
    "read_only, closed, error)",
)


def _online_accuracy(state: AppState) -> Iterable[Observation]:
    if state.predictions is not None:
        for version, (share, _agreed, _count) in state.predictions.accuracy.accuracy().items():
            yield Observation(share, _labels(model_version=version))


def _window_size(state: AppState) -> Iterable[Observation]:
    """Agreeing and disagreeing feedbacks in the window; the serving version's exist from 0."""
    if state.predictions is None:
        return
    found = state.predictions.accuracy.accuracy()
    bundle = state.service.bundle
    if bundle is not None and bundle.version not in found:
        found[bundle.version] = (0.0, 0, 0)
    for version, (_share, agreed, count) in found.items():
        yield Observation(agreed, _labels(model_version=version, agreed="true"))
        yield Observation(count - agreed, _labels(model_version=version, agreed="false"))


_meter.create_observable_gauge(
    "inference_feedback_accuracy", [_observe(_online_accuracy)], unit="1",
    description=f"Share of feedback agreeing with the prediction, per model version, over its "
    f"latest {FEEDBACK_WINDOW} feedbacks on this replica (online accuracy; absent until the "
    f"version gets feedback)",
)
_meter.create_observable_gauge(
    "inference_feedback_window", [_observe(_window_size)], unit="{feedback}",
    description="The feedbacks the online accuracy covers now, per model version, agreeing "
    "or not (agreed=true|false): sum them over replicas for the fleet's online accuracy",
)


# --- recording helpers for the hot path -----------------------------------------------------
_api_labels: dict[tuple[str, str, int], dict[str, str]] = {}


def api_labels(endpoint: str, method: str, status: int) -> dict[str, str]:
    key = (endpoint, method, status)
    labels = _api_labels.get(key)
    if labels is None:
        labels = _labels(endpoint=endpoint, method=method, status=str(status))
        if len(_api_labels) < 1000:  # endpoints are route templates: a bounded set
            _api_labels[key] = labels
    return labels


# HTTP requests in flight, by method: plain integers the middleware bumps on the event loop (far
# cheaper than two synchronous instrument updates per request), observed at collection time.
in_flight: dict[str, int] = {}


def _in_flight(_: CallbackOptions) -> Iterable[Observation]:
    return [Observation(count, _labels(method=method)) for method, count in list(in_flight.items())]


_meter.create_observable_up_down_counter(
    "inference_api_requests_in_flight", [_in_flight], unit="{request}",
    description="HTTP requests being handled now",
)


def record_rejection(reason: str) -> None:
    """A request answered 503, and why (queue_full, deadline_exceeded, not_ready, ...)."""
    rejected.add(1, _labels(reason=reason))


def record_prediction(class_name: str, model_version: str, top_confidence: float) -> None:
    labels = _labels(class_name=class_name, model_version=model_version)
    predictions.add(1, labels)
    confidence.record(top_confidence, labels)


def record_batch(compute_ms: float, size: int, queue_ms: Iterable[float]) -> None:
    labels = _labels()
    compute_duration.record(compute_ms, labels)
    batch_size.record(size, labels)
    for waited in queue_ms:
        queue_duration.record(waited, labels)


def record_decode(milliseconds: float, image_format: str) -> None:
    decode_duration.record(milliseconds, _labels(format=image_format))


def record_model_load(outcome: str, seconds: float | None = None) -> None:
    model_loads.add(1, _labels(outcome=outcome))
    if seconds is not None:
        model_load_duration.record(seconds, _labels(outcome=outcome))


def record_model_swap(model_version: str) -> None:
    model_swaps.add(1, _labels(model_version=model_version))
    for agreed in ("true", "false"):  # the version's feedback series exist from 0 on
        feedback_received.add(0, _labels(model_version=model_version, agreed=agreed))


def record_model_reload(trigger: str, outcome: str) -> None:
    model_reloads.add(1, _labels(trigger=trigger, outcome=outcome))


def record_registry_error() -> None:
    registry_errors.add(1, _labels())


# --- GET /metrics ---------------------------------------------------------------------------
router = APIRouter(tags=["observability"])


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
def prometheus_metrics() -> Response:
    # A plain def: FastAPI runs it in the thread pool, so a collection never blocks the loop.
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
