"""Spans for the storage path, if OpenTelemetry is installed (no-ops otherwise).

Span names dashboards already query (DESIGN.md §1): `save_image_s3` and `save_prediction_db`
(in the drainer, which runs after the response: they are not children of `predict_endpoint`),
plus `save_prediction_outbox` for the durable commit inside the request.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

try:
    from opentelemetry import trace

    _tracer: Any = trace.get_tracer("rottenbot_inference.storage")
except ImportError:  # pragma: no cover - telemetry is optional
    _tracer = None


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[None]:
    if _tracer is None:
        yield
        return
    with _tracer.start_as_current_span(name, attributes=attributes):
        yield
