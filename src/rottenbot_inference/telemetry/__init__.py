"""Observability: OpenTelemetry traces, metrics and logs; Prometheus /metrics; JSON logs.

See docs/observability.md for what is emitted and how to point it at a collector.

    setup_telemetry(settings)       providers, once per process (create_app calls it)
    configure_logging(settings)     JSON or text logs on stderr (the CLI calls it)
    TelemetryMiddleware             SERVER span, API metrics, access log per request
    traced("name")                  a child span for the block
    metrics.router                  GET /metrics
"""

from rottenbot_inference.telemetry import metrics
from rottenbot_inference.telemetry.logs import configure_logging
from rottenbot_inference.telemetry.middleware import TelemetryMiddleware
from rottenbot_inference.telemetry.setup import Telemetry, get_telemetry, setup_telemetry
from rottenbot_inference.telemetry.tracing import (
    SpanContext,
    current_span_context,
    traced,
    tracer,
)

__all__ = [
    "SpanContext",
    "Telemetry",
    "TelemetryMiddleware",
    "configure_logging",
    "current_span_context",
    "get_telemetry",
    "metrics",
    "setup_telemetry",
    "traced",
    "tracer",
]
