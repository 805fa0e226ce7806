"""ASGI middleware: the request's SERVER span, the API metrics and the access log line.

Outermost of the app's middleware, so it also sees the early 413 of the body-size limit and
the 500s of unhandled errors. Per request it costs one span, three metric updates and one log
line. /metrics and /health/* are counted but neither traced nor logged above DEBUG (a scraper
and probes would otherwise flood traces and logs).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rottenbot_inference.telemetry import metrics as service_metrics
from rottenbot_inference.telemetry.tracing import tracer

access_log = logging.getLogger("rottenbot_inference.access")

API_PREFIX = "/api/v1/inference"  # the old service labelled its predict route "/predict"
PREDICT_ROUTE = f"{API_PREFIX}/predict"
ROOT_SPAN_NAMES = {PREDICT_ROUTE: "predict_endpoint"}
_PROPAGATION_HEADERS = frozenset({b"traceparent", b"tracestate", b"baggage"})
CLIENT_CLOSED = 499  # no response was sent: the client went away first
# Metric labels stay bounded whatever a client sends: other methods count as "_OTHER".
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _DictGetter(Getter[dict[str, str]]):
    def get(self, carrier: dict[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return None if value is None else [value]

    def keys(self, carrier: dict[str, str]) -> list[str]:
        return list(carrier)


_getter = _DictGetter()


def endpoint_label(route_path: str | None) -> str:
    """The `endpoint` label: the route template, without the inference API prefix."""
    if route_path is None:
        return "unmatched"
    if route_path.startswith(API_PREFIX + "/"):
        return route_path[len(API_PREFIX):]
    return route_path


def _route_path(scope: Scope) -> str | None:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    # Answered before routing (the early 413 of the body-size limit): a static route still
    # counts under its own name; anything else is "unmatched" (never the raw path: unbounded).
    app = scope.get("app")
    for candidate in getattr(app, "routes", ()):
        candidate_path = getattr(candidate, "path", None)
        if candidate_path == scope["path"] and "{" not in candidate_path:
            return candidate_path
    return None


def fastapi_options() -> dict[str, Any]:
    """`FastAPI(**fastapi_options())`: switch off FastAPI's own OpenTelemetry (0.16x+).

    This middleware makes the request span (named as the dashboards expect: predict_endpoint)
    and the API metrics; FastAPI's native spans would add a second server span and put its
    dependency/endpoint spans between predict_endpoint and its children.
    """
    import inspect

    from fastapi import FastAPI

    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    off = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
    return {"telemetry": off}


def _quiet(path: str) -> bool:
    return path == "/metrics" or path.startswith("/health/")


class TelemetryMiddleware:
    def __init__(self, app: ASGIApp, access_log_enabled: bool = True) -> None:
        self.app = app
        self.access_log_enabled = access_log_enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method: str = scope["method"] if scope["method"] in _METHODS else "_OTHER"
        path: str = scope["path"]
        quiet = _quiet(path)
        state = scope.setdefault("state", {})  # shared with request.state (user id)
        status = 0

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        span = token = None
        if not quiet:
            carrier = {
                name.decode("latin-1"): value.decode("latin-1")
                for name, value in scope["headers"]
                if name in _PROPAGATION_HEADERS
            }
            parent = propagate.extract(carrier, getter=_getter) if carrier else None
            span = tracer.start_span(
                f"{method} {path}",
                context=parent,
                kind=SpanKind.SERVER,
                attributes={"http.request.method": method, "url.path": path},
            )
            token = otel_context.attach(trace.set_span_in_context(span))
        in_flight = service_metrics.in_flight
        in_flight[method] = in_flight.get(method, 0) + 1
        error: BaseException | None = None
        try:
            await self.app(scope, receive, send_with_status)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if status == 0:
                status = 500 if isinstance(error, Exception) else CLIENT_CLOSED
            duration_ms = (time.perf_counter() - started) * 1000
            route_path = _route_path(scope)
            endpoint = endpoint_label(route_path)
            labels = service_metrics.api_labels(endpoint, method, status)
            in_flight[method] -= 1
            service_metrics.api_requests.add(1, labels)
            service_metrics.api_duration.record(duration_ms, labels)
            user_id = state.get("user_id")
            if span is not None:
                self._finish_span(span, method, route_path, status, user_id, error)
            if self.access_log_enabled:
                self._log(quiet, method, path, endpoint, status, duration_ms, user_id, span)
            if span is not None:
                otel_context.detach(token)
                span.end()

    @staticmethod
    def _finish_span(
        span: Any, method: str, route_path: str | None, status: int, user_id: str | None,
        error: BaseException | None,
    ) -> None:
        if not span.is_recording():
            return
        name = ROOT_SPAN_NAMES.get(route_path or "") or f"{method} {route_path or 'unmatched'}"
        span.update_name(name)
        attributes: dict[str, Any] = {"http.response.status_code": status}
        if route_path is not None:
            attributes["http.route"] = route_path
        if user_id is not None:
            attributes["enduser.id"] = user_id
        span.set_attributes(attributes)
        if status >= 500:
            if error is not None and isinstance(error, Exception):
                span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))

    @staticmethod
    def _log(
        quiet: bool, method: str, path: str, endpoint: str, status: int, duration_ms: float,
        user_id: str | None, span: Any,
    ) -> None:
        level = logging.DEBUG if quiet and status < 400 else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        fields: dict[str, Any] = {
            "method": method,
            "path": path,  # never the query string (it may carry anything)
            "endpoint": endpoint,
            "status": status,
            "duration_ms": round(duration_ms, 3),
        }
        if user_id is not None:
            fields["user_id"] = user_id
        extra: dict[str, Any] = {"fields": fields}
        context = span.get_span_context() if span is not None else None
        if context is not None and context.is_valid:  # the request's trace, even unsampled
            extra["trace_id"] = format(context.trace_id, "032x")
            extra["span_id"] = format(context.span_id, "016x")
        access_log.log(level, "%s %s %d %.1f ms", method, path, status, duration_ms, extra=extra)

