"""Process-wide OpenTelemetry setup: tracer, meter and logger providers, done once.

- Traces: an SDK TracerProvider always (every request gets trace and span ids for its log
  lines). Spans are recorded only while something consumes them: with a traces endpoint, a
  BatchSpanProcessor with an OTLP exporter (and the sampler of OTEL_TRACES_SAMPLER, default
  parent-based always-on); without one, spans are non-recording (ids only, about half the cost).
  The processor's queue is bounded (OTEL_BSP_MAX_QUEUE_SIZE, default 2048; the oldest spans are
  dropped when full) and it exports from its own thread, so a collector that is down costs a
  request nothing and memory stays bounded.
- Metrics: a MeterProvider with a PrometheusMetricReader (GET /metrics) and, with an endpoint, a
  PeriodicExportingMetricReader (OTEL_METRIC_EXPORT_INTERVAL, default 60 s) - the same
  instruments on both paths.
- Logs: with an endpoint, a LoggerProvider with a bounded BatchLogRecordProcessor and a handler
  on the root logger.
- Shutdown (at process exit) and flush (at app shutdown) are bounded in time: a collector that
  is down never holds up a stop.

`OTEL_SDK_DISABLED=true` leaves the no-op API providers in place (no spans, no metrics).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
)

from rottenbot_inference import __version__
from rottenbot_inference.telemetry import metrics as service_metrics
from rottenbot_inference.telemetry.config import GRPC, OtlpTarget, Signal, resolve_targets
from rottenbot_inference.telemetry.logs import OtlpLogHandler

if TYPE_CHECKING:
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

    from rottenbot_inference.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Telemetry:
    """What `setup_telemetry` built (one per process)."""

    service_name: str
    targets: dict[Signal, OtlpTarget] = field(default_factory=dict)
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    logger_provider: LoggerProvider | None = None
    log_handler: logging.Handler | None = None
    exporters: list[Any] = field(default_factory=list)
    enabled: bool = True
    sampler: RecordWhenConsumed | None = None

    def add_span_processor(self, processor: Any) -> None:
        """Add a span processor (e.g. an in-memory exporter in tests); spans are recorded now."""
        assert self.tracer_provider is not None and self.sampler is not None
        self.tracer_provider.add_span_processor(processor)
        self.sampler.recording = True

    @property
    def exporting(self) -> bool:
        return bool(self.targets)

    def flush(self, timeout_s: float = 2.0) -> None:
        """Export what is buffered, waiting at most `timeout_s` (app shutdown)."""
        if not self.targets:
            return

        def flush() -> None:
            for provider in (self.tracer_provider, self.meter_provider, self.logger_provider):
                if provider is not None:
                    try:
                        provider.force_flush(int(timeout_s * 1000))
                    except Exception:
                        log.debug("telemetry flush failed", exc_info=True)

        _bounded(flush, timeout_s, "telemetry-flush")

    def shutdown(self, timeout_s: float = 3.0) -> None:
        """Flush and stop the exporters (process exit); gives up after `timeout_s`."""
        if self.log_handler is not None:
            logging.getLogger().removeHandler(self.log_handler)

        def shutdown() -> None:
            for provider in (self.tracer_provider, self.logger_provider, self.meter_provider):
                if provider is not None:
                    try:
                        provider.shutdown()
                    except Exception:
                        log.debug("telemetry shutdown failed", exc_info=True)

        if not _bounded(shutdown, timeout_s, "telemetry-shutdown"):
            for exporter in self.exporters:  # abort retries against a collector that is down
                with contextlib.suppress(Exception):
                    exporter.shutdown()


class RecordWhenConsumed(Sampler):
    """The configured sampler while spans are exported; otherwise DROP (ids, no recording).

    A dropped span still gets a trace id (the caller's, or a new one) and a span id, so logs are
    correlated either way; recording spans nobody reads would only cost CPU.
    """

    def __init__(self, delegate: Sampler, recording: bool) -> None:
        self.delegate = delegate
        self.recording = recording

    def should_sample(
        self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
        attributes: Any = None, links: Any = None, trace_state: Any = None,
    ) -> SamplingResult:
        if self.recording:
            return self.delegate.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )
        parent = trace.get_current_span(parent_context).get_span_context()
        return SamplingResult(Decision.DROP, None, parent.trace_state if parent.is_valid else None)

    def get_description(self) -> str:
        state = "recording" if self.recording else "ids only"
        return f"RecordWhenConsumed({self.delegate.get_description()}, {state})"


def _configured_sampler() -> Sampler:
    try:  # OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG, as the SDK reads them
        from opentelemetry.sdk.trace.sampling import _get_from_env_or_default

        return _get_from_env_or_default()
    except Exception:
        return ParentBased(ALWAYS_ON)


def _bounded(function: Any, timeout_s: float, name: str) -> bool:
    """Run `function` in a daemon thread; True if it finished within `timeout_s`."""
    thread = threading.Thread(target=function, name=name, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive()


_lock = threading.Lock()
_telemetry: Telemetry | None = None


def get_telemetry() -> Telemetry | None:
    return _telemetry


def setup_telemetry(settings: Settings) -> Telemetry:
    """Set up the providers once per process (later calls return the first setup)."""
    global _telemetry
    with _lock:
        if _telemetry is None:
            _telemetry = _setup(settings)
            atexit.register(_telemetry.shutdown)
        return _telemetry


def _resource(service_name: str) -> Resource:
    return Resource.create(
        {
            "service.name": service_name,
            "service.version": __version__,
            "service.instance.id": f"{socket.gethostname()}-{os.getpid()}",
        }
    )


def _setup(settings: Settings) -> Telemetry:
    service_name = settings.otel_service_name
    service_metrics.SERVICE_NAME = service_name
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return Telemetry(service_name, enabled=False)
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

    targets = resolve_targets(settings)
    resource = _resource(service_name)
    telemetry = Telemetry(service_name, targets)

    sampler = RecordWhenConsumed(_configured_sampler(), recording=False)
    tracer_provider = TracerProvider(resource=resource, sampler=sampler, shutdown_on_exit=False)
    telemetry.sampler = sampler
    if "traces" in targets:
        processor = _exporting(telemetry, "traces", _span_processor)
        if processor is not None:
            tracer_provider.add_span_processor(processor)
            sampler.recording = True
    trace.set_tracer_provider(tracer_provider)
    telemetry.tracer_provider = tracer_provider

    readers: list[Any] = [PrometheusMetricReader(scope_info_enabled=False)]
    if "metrics" in targets:
        reader = _exporting(telemetry, "metrics", _metric_reader)
        if reader is not None:
            readers.append(reader)
    exemplars: dict[str, Any] = {}
    if len(readers) == 1 and not os.environ.get("OTEL_METRICS_EXEMPLAR_FILTER"):
        from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter

        exemplars["exemplar_filter"] = AlwaysOffExemplarFilter()  # text exposition shows none
    meter_provider = MeterProvider(
        metric_readers=readers, resource=resource, shutdown_on_exit=False, **exemplars
    )
    metrics.set_meter_provider(meter_provider)
    telemetry.meter_provider = meter_provider

    if "logs" in targets:
        from opentelemetry._logs import set_logger_provider
        from opentelemetry.sdk._logs import LoggerProvider

        logger_provider = LoggerProvider(resource=resource, shutdown_on_exit=False)
        log_processor = _exporting(telemetry, "logs", _log_processor)
        if log_processor is not None:
            logger_provider.add_log_record_processor(log_processor)
            set_logger_provider(logger_provider)
            telemetry.logger_provider = logger_provider
            telemetry.log_handler = OtlpLogHandler(logger_provider)
            logging.getLogger().addHandler(telemetry.log_handler)

    if telemetry.targets:
        log.info(
            "telemetry: exporting %s",
            ", ".join(
                f"{t.signal} to {t.endpoint} ({t.protocol})" for t in telemetry.targets.values()
            ),
        )
    return telemetry


def _exporting(telemetry: Telemetry, signal: Signal, build: Any) -> Any:
    """`build(target)` -> (exporter, processor or reader); a bad OTEL_* value is logged and that
    signal is not exported: telemetry never keeps the service from starting."""
    target = telemetry.targets[signal]
    try:
        exporter, component = build(target)
    except Exception as exc:
        log.error("telemetry: %s are NOT exported to %s: %s", signal, target.endpoint, exc)
        del telemetry.targets[signal]
        return None
    telemetry.exporters.append(exporter)
    return component


def _span_processor(target: OtlpTarget) -> tuple[Any, Any]:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporter = _span_exporter(target)
    return exporter, BatchSpanProcessor(exporter)  # bounded queue: OTEL_BSP_MAX_QUEUE_SIZE


def _metric_reader(target: OtlpTarget) -> tuple[Any, Any]:
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    exporter = _metric_exporter(target)
    return exporter, PeriodicExportingMetricReader(exporter)  # OTEL_METRIC_EXPORT_INTERVAL


def _log_processor(target: OtlpTarget) -> tuple[Any, Any]:
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

    exporter = _log_exporter(target)
    return exporter, BatchLogRecordProcessor(exporter)  # bounded queue: OTEL_BLRP_MAX_QUEUE_SIZE


def _span_exporter(target: OtlpTarget) -> Any:
    if target.protocol == GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=target.endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    return HttpSpanExporter(endpoint=target.endpoint)


def _metric_exporter(target: OtlpTarget) -> Any:
    if target.protocol == GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter(endpoint=target.endpoint)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpMetricExporter,
    )

    return HttpMetricExporter(endpoint=target.endpoint)


def _log_exporter(target: OtlpTarget) -> Any:
    if target.protocol == GRPC:
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter

        return OTLPLogExporter(endpoint=target.endpoint)
    from opentelemetry.exporter.otlp.proto.http._log_exporter import (
        OTLPLogExporter as HttpLogExporter,
    )

    return HttpLogExporter(endpoint=target.endpoint)
