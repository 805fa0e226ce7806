"""Spans: the service's tracer and a cheap span helper for the hot path.

Span tree of one predict request (names fixed by the dashboards, see docs/contracts.md):

    predict_endpoint                      (SERVER; child of an incoming W3C traceparent)
      verify_token, check_revocation      (auth)
      read_image_contents
      model_prediction
        preprocess_image
        get_prediction                    (queue_ms, compute_ms, batch_size; link -> batch)
      save_prediction_outbox              (only with save_prediction=true)
    batch                                 (inference thread; links -> each get_prediction)
    drain_outbox                          (drainer; links -> each saving predict_endpoint)
      save_image_s3, save_prediction_db
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode

tracer = trace.get_tracer("rottenbot_inference")

__all__ = ["Span", "SpanContext", "SpanKind", "current_span_context", "traced", "tracer"]


class traced:  # lower case: used like a function, `with traced("name") as span:`
    """A child span of the current one, made current for the block.

    Cheaper than `start_as_current_span` (no generator context manager, no traceback
    formatting): an exception marks the span ERROR with its type only; the log line that
    reports the failure carries the trace id and the traceback.
    """

    __slots__ = ("_attributes", "_kind", "_links", "_name", "_span", "_token")

    def __init__(
        self,
        name: str,
        attributes: dict[str, Any] | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        links: Sequence[SpanContext] = (),
    ) -> None:
        self._name = name
        self._attributes = attributes
        self._kind = kind
        self._links = links

    def __enter__(self) -> Span:
        span = tracer.start_span(
            self._name,
            kind=self._kind,
            attributes=self._attributes,
            links=[Link(context) for context in self._links] if self._links else None,
        )
        self._span = span
        self._token = otel_context.attach(trace.set_span_in_context(span))
        return span

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: Any
    ) -> None:
        span = self._span
        if error is not None and span.is_recording():
            name = type(error).__name__
            span.set_attribute("error.type", name)
            span.set_status(Status(StatusCode.ERROR, name))
        otel_context.detach(self._token)
        span.end()


def current_span_context() -> SpanContext | None:
    """The current span's context if it is sampled (worth linking to), else None."""
    context = trace.get_current_span().get_span_context()
    return context if context.is_valid and context.trace_flags.sampled else None
