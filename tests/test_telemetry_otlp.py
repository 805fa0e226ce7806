"""Telemetry end to end: `rottenbot-inference serve` exporting to a real OTLP/gRPC receiver.

The receiver is a small gRPC server implementing the OTLP TraceService, MetricsService and
LogsService from `opentelemetry-proto`, on loopback. The served process gets the standard
`OTEL_EXPORTER_OTLP_ENDPOINT` and short export intervals. No timing assertions: every wait
polls for what should arrive, with a generous limit.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import (
    free_port,
    jpeg_bytes,
    process_env,
    random_photo,
    running_server,
    token,
)

PREDICT = "/api/v1/inference/predict"


# --- a real OTLP receiver -------------------------------------------------------------------


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    links: list[tuple[str, str]]
    attributes: dict[str, Any]
    resource: dict[str, Any]
    kind: int


@dataclass
class ReceivedPoint:
    metric: str
    kind: str  # sum, gauge, histogram
    attributes: dict[str, Any]
    value: Any
    resource: dict[str, Any]


@dataclass
class ReceivedLog:
    body: Any
    severity: str
    trace_id: str
    span_id: str
    attributes: dict[str, Any]


@dataclass
class OtlpReceiver:
    """Collects everything exported to it (thread-safe; gRPC handler threads write)."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    points: list[ReceivedPoint] = field(default_factory=list)
    logs: list[ReceivedLog] = field(default_factory=list)
    raw_bytes: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_traces(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        received = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            links=[(ln.trace_id.hex(), ln.span_id.hex()) for ln in span.links],
                            attributes=_attributes(span.attributes),
                            resource=resource,
                            kind=span.kind,
                        )
                    )
        with self.lock:
            self.spans.extend(received)
            self.raw_bytes.append(request.SerializeToString())

    def add_metrics(self, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        received = []
        for resource_metrics in request.resource_metrics:
            resource = _attributes(resource_metrics.resource.attributes)
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    kind = metric.WhichOneof("data")
                    for point in getattr(metric, kind).data_points:
                        if kind == "histogram":
                            value: Any = {
                                "count": point.count,
                                "bounds": list(point.explicit_bounds),
                            }
                        else:
                            value = point.as_double if point.HasField("as_double") else point.as_int
                        received.append(
                            ReceivedPoint(
                                metric.name, kind, _attributes(point.attributes), value, resource
                            )
                        )
        with self.lock:
            self.points.extend(received)
            self.raw_bytes.append(request.SerializeToString())

    def add_logs(self, request: logs_service_pb2.ExportLogsServiceRequest) -> None:
        received = []
        for resource_logs in request.resource_logs:
            for scope_logs in resource_logs.scope_logs:
                for record in scope_logs.log_records:
                    received.append(
                        ReceivedLog(
                            body=_value(record.body),
                            severity=record.severity_text,
                            trace_id=record.trace_id.hex(),
                            span_id=record.span_id.hex(),
                            attributes=_attributes(record.attributes),
                        )
                    )
        with self.lock:
            self.logs.extend(received)
            self.raw_bytes.append(request.SerializeToString())

    def snapshot(self) -> tuple[list[ReceivedSpan], list[ReceivedPoint], list[ReceivedLog]]:
        with self.lock:
            return list(self.spans), list(self.points), list(self.logs)

    def wait_for(self, predicate: Callable[[OtlpReceiver], Any], timeout_s: float = 60) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            result = predicate(self)
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError("the expected telemetry never arrived at the receiver")
            time.sleep(0.2)


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self.receiver.add_traces(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self.receiver.add_metrics(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class _Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self.receiver.add_logs(request)
        return logs_service_pb2.ExportLogsServiceResponse()


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[OtlpReceiver, int]]:
    collected = OtlpReceiver()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(collected), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(collected), server)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_Logs(collected), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield collected, port
    finally:
        server.stop(grace=None)


def _server_env(tiny_model: Path, shared_cache: Path, folder: Path) -> dict[str, str]:
    return {
        **process_env(tiny_model, shared_cache, folder / "data"),
        "MAX_BATCH_SIZE": "4",
        "MAX_BATCH_DELAY_MS": "20",  # concurrent requests share batches
        "LOG_FORMAT": "json",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_BLRP_SCHEDULE_DELAY": "100",
        "OUTBOX_RETRY_BASE_S": "0.1",
    }


@dataclass
class Served:
    base_url: str
    log_path: Path
    receiver: OtlpReceiver


@pytest.fixture(scope="module")
def served(
    receiver: tuple[OtlpReceiver, int], tiny_model: Path, shared_cache: Path, tmp_path_factory
) -> Iterator[Served]:
    collected, port = receiver
    folder = tmp_path_factory.mktemp("otlp-server")
    env = {
        **_server_env(tiny_model, shared_cache, folder),
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
    }
    log_path = folder / "server.log"
    with running_server(env, log_path) as base_url:
        yield Served(base_url, log_path, collected)


def _traceparent() -> tuple[str, str, str]:
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    return f"00-{trace_id}-{parent_id}-01", trace_id, parent_id


def _predict(
    base_url: str, credential: str, traceparent: str | None = None, save: bool = False,
    seed: int = 0,
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {credential}"}
    if traceparent:
        headers["traceparent"] = traceparent
    return httpx.post(
        f"{base_url}{PREDICT}?save_prediction={save}",
        files={"file": ("photo.jpg", jpeg_bytes(random_photo(240, 320, seed=seed)), "image/jpeg")},
        headers=headers,
        timeout=60,
    )


def _one(spans: list[ReceivedSpan], name: str, trace_id: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name and s.trace_id == trace_id]
    assert len(found) == 1, f"{name}: {len(found)} spans in trace {trace_id}"
    return found[0]


# --- traces ----------------------------------------------------------------------------------


def test_predict_trace_continues_the_callers_trace_with_the_design_span_tree(
    served: Served,
) -> None:
    user = uuid.uuid4()
    credential = token(user)
    traceparent, trace_id, caller_span = _traceparent()
    response = _predict(served.base_url, credential, traceparent, save=True)
    assert response.status_code == 200, response.text
    prediction_uid = response.json()["prediction_uid"]

    def complete(receiver: OtlpReceiver) -> list[ReceivedSpan] | None:
        spans, _, _ = receiver.snapshot()
        names = {s.name for s in spans if s.trace_id == trace_id}
        drained = {
            s.name for s in spans if any(link[0] == trace_id for link in s.links)
        }
        wanted = {"save_image_s3", "save_prediction_db", "batch"}
        return spans if "predict_endpoint" in names and wanted <= drained else None

    spans = served.receiver.wait_for(complete)
    root = _one(spans, "predict_endpoint", trace_id)
    assert root.parent_id == caller_span  # the caller's traceparent is the parent
    assert root.kind == 2  # SERVER
    assert root.attributes["enduser.id"] == str(user)
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["http.route"] == PREDICT
    assert root.resource["service.name"] == "inference_service"

    children = {
        name: _one(spans, name, trace_id)
        for name in (
            "verify_token", "check_revocation", "read_image_contents", "model_prediction",
            "save_prediction_outbox",
        )
    }
    for name, span in children.items():
        assert span.parent_id == root.span_id, f"{name} is not a child of predict_endpoint"
    prediction = children["model_prediction"]
    preprocess = _one(spans, "preprocess_image", trace_id)
    get_prediction = _one(spans, "get_prediction", trace_id)
    assert preprocess.parent_id == prediction.span_id
    assert get_prediction.parent_id == prediction.span_id

    # Attributes: user, image, batch, model, predicted class.
    assert children["verify_token"].attributes["enduser.id"] == str(user)
    assert children["read_image_contents"].attributes["image.bytes"] > 0
    assert preprocess.attributes["image.format"] == "jpeg"
    assert (preprocess.attributes["image.width"], preprocess.attributes["image.height"]) == (
        320, 240,
    )
    assert get_prediction.attributes["batch.size"] >= 1
    assert get_prediction.attributes["queue_ms"] >= 0
    assert get_prediction.attributes["compute_ms"] > 0
    assert prediction.attributes["prediction.class_name"] == response.json()["predicted_class_name"]
    assert prediction.attributes["model.version"] == response.json()["model_version"]

    # The batch span (its own trace) links to the request's get_prediction, and back.
    request_link = (trace_id, get_prediction.span_id)
    batches = [s for s in spans if s.name == "batch" and request_link in s.links]
    assert len(batches) == 1
    batch = batches[0]
    assert batch.trace_id != trace_id and batch.parent_id == ""
    assert batch.attributes["batch.size"] >= 1
    assert batch.attributes["model.version"] == response.json()["model_version"]
    assert (batch.trace_id, batch.span_id) in get_prediction.links

    # The drainer's spans run after the response, linked to the request that saved.
    for name in ("save_image_s3", "save_prediction_db"):
        linked = [s for s in spans if s.name == name and (trace_id, root.span_id) in s.links]
        assert linked, f"no {name} span links to the saving request"
    image_span = next(
        s for s in spans
        if s.name == "save_image_s3" and s.attributes.get("prediction.uid") == prediction_uid
    )
    assert (trace_id, root.span_id) in image_span.links

    # Never the token, in any attribute of any span.
    for span in spans:
        for value in [*span.attributes.values(), *span.resource.values()]:
            for part in credential.split("."):
                assert part not in str(value), f"the token leaked into span {span.name}"


def test_concurrent_requests_share_a_batch_span_linked_to_each(served: Served) -> None:
    credential = token()
    parents = [_traceparent() for _ in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(
            pool.map(
                lambda item: _predict(served.base_url, credential, item[1][0], seed=item[0]),
                enumerate(parents),
            )
        )
    assert {r.status_code for r in statuses} == {200}
    trace_ids = {trace_id for _, trace_id, _ in parents}

    def linked(receiver: OtlpReceiver) -> list[ReceivedSpan] | None:
        spans, _, _ = receiver.snapshot()
        batches = [s for s in spans if s.name == "batch" and {t for t, _ in s.links} & trace_ids]
        covered = {t for s in batches for t, _ in s.links} & trace_ids
        return spans if covered == trace_ids else None

    spans = served.receiver.wait_for(linked)
    for trace_id in trace_ids:
        get_prediction = _one(spans, "get_prediction", trace_id)
        batch = next(
            s for s in spans if s.name == "batch" and (trace_id, get_prediction.span_id) in s.links
        )
        # Every image in the batch came from a sampled request: one link each.
        assert batch.attributes["batch.size"] == len(batch.links)
        assert get_prediction.attributes["batch.size"] == batch.attributes["batch.size"]


def test_a_request_without_traceparent_starts_a_new_trace_and_errors_are_marked(
    served: Served,
) -> None:
    before = {s.trace_id for s in served.receiver.snapshot()[0]}
    response = httpx.post(
        f"{served.base_url}{PREDICT}",
        files={"file": ("a.gif", b"GIF89a...", "image/gif")},
        headers={"Authorization": f"Bearer {token()}"},
    )
    assert response.status_code == 400

    def root_span(receiver: OtlpReceiver) -> ReceivedSpan | None:
        spans, _, _ = receiver.snapshot()
        return next(
            (
                s for s in spans
                if s.name == "predict_endpoint" and s.trace_id not in before
                and s.attributes.get("http.response.status_code") == 400
            ),
            None,
        )

    root = served.receiver.wait_for(root_span)
    assert root.parent_id == ""


# --- metrics ---------------------------------------------------------------------------------


def _prometheus_samples(base_url: str) -> dict[str, list[Any]]:
    response = httpx.get(f"{base_url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def test_metrics_are_pushed_over_otlp_and_scraped_with_the_same_names(served: Served) -> None:
    assert _predict(served.base_url, token()).status_code == 200

    def api_points(receiver: OtlpReceiver) -> list[ReceivedPoint] | None:
        _, points, _ = receiver.snapshot()
        names = {p.metric for p in points if p.attributes.get("endpoint") == "/predict"}
        wanted = {"inference_api_requests_total", "inference_api_duration_milliseconds"}
        return points if wanted <= names else None

    points = served.receiver.wait_for(api_points)
    counter = next(
        p for p in points
        if p.metric == "inference_api_requests_total" and p.attributes["endpoint"] == "/predict"
    )
    assert counter.kind == "sum"
    assert counter.attributes == {
        "endpoint": "/predict", "method": "POST", "service_name": "inference_service",
        "status": "200",
    }
    histogram = next(
        p for p in points
        if p.metric == "inference_api_duration_milliseconds"
        and p.attributes["endpoint"] == "/predict"
    )
    assert histogram.kind == "histogram"
    assert {10.0, 25.0, 50.0, 100.0} <= set(histogram.value["bounds"])

    samples = _prometheus_samples(served.base_url)
    exported = {p.metric: p.kind for p in points if p.metric.startswith("inference_")}
    assert len(exported) >= 15, sorted(exported)
    for name, kind in exported.items():
        expected = [f"{name}_bucket", f"{name}_sum", f"{name}_count"] if kind == "histogram" else [
            name
        ]
        for sample_name in expected:
            assert sample_name in samples, f"{sample_name} (pushed as {name}) is not at /metrics"
    scraped = {
        name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
        for name in samples if name.startswith("inference_")
    }
    assert scraped <= set(exported), scraped - set(exported)

    predict_count = [
        s for s in samples["inference_api_requests_total"]
        if s.labels.get("endpoint") == "/predict" and s.labels.get("status") == "200"
    ]
    assert predict_count and predict_count[0].value >= 1
    assert predict_count[0].labels["service_name"] == "inference_service"
    assert predict_count[0].labels["method"] == "POST"
    buckets = {
        s.labels["le"] for s in samples["inference_api_duration_milliseconds_bucket"]
        if s.labels.get("endpoint") == "/predict"
    }
    assert {"7.5", "10.0", "15.0", "100.0", "+Inf"} <= buckets
    model_info = samples["inference_model_info"]
    assert model_info[0].value == 1 and model_info[0].labels["model_version"]


# --- logs ------------------------------------------------------------------------------------


def test_json_logs_carry_trace_ids_and_never_the_token(served: Served) -> None:
    user = uuid.uuid4()
    credential = token(user)
    traceparent, trace_id, _ = _traceparent()
    assert _predict(served.base_url, credential, traceparent).status_code == 200
    assert httpx.get(
        f"{served.base_url}/api/v1/inference/model?token={credential}",
        headers={"Authorization": f"Bearer {credential}"},
    ).status_code == 200

    def access_line(_: OtlpReceiver) -> dict[str, Any] | None:
        # Access lines are written once the response has gone out: wait for both.
        lines = served.log_path.read_text().splitlines()
        if not any('"/api/v1/inference/model"' in line for line in lines):
            return None
        for line in lines:
            if trace_id in line and '"rottenbot_inference.access"' in line:
                return json.loads(line)
        return None

    entry = served.receiver.wait_for(access_line)
    assert entry["trace_id"] == trace_id and len(entry["span_id"]) == 16
    assert entry["level"] == "INFO" and entry["logger"] == "rottenbot_inference.access"
    assert entry["method"] == "POST" and entry["path"] == PREDICT and entry["status"] == 200
    assert entry["duration_ms"] > 0 and entry["user_id"] == str(user)
    assert entry["timestamp"].endswith("+00:00")

    lines = [line for line in served.log_path.read_text().splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines if line.startswith("{")]
    # Every Python log record is one JSON object; only native libraries (TensorFlow's C++
    # logging, if the model had to be converted) may write other lines to stderr.
    others = [line for line in lines if not line.startswith("{")]
    assert not [line for line in others if "rottenbot_inference" in line or "uvicorn" in line]
    assert len(parsed) > len(others)
    for item in parsed:
        assert {"timestamp", "level", "message", "logger", "trace_id", "span_id"} <= set(item)
    model_lines = [p for p in parsed if p.get("path") == "/api/v1/inference/model"]
    assert model_lines and all("token" not in str(p) for p in model_lines)  # no query string
    text = served.log_path.read_text()
    for part in credential.split("."):
        assert part not in text, "a token appeared in the server log"

    # The same records are shipped over OTLP, with the trace context.
    def shipped(receiver: OtlpReceiver) -> ReceivedLog | None:
        _, _, logs = receiver.snapshot()
        return next((r for r in logs if r.trace_id == trace_id), None)

    record = served.receiver.wait_for(shipped)
    assert record.attributes.get("path") == PREDICT
    with served.receiver.lock:
        exported = b"".join(served.receiver.raw_bytes)
    for part in credential.split("."):
        assert part.encode() not in exported, "a token was exported over OTLP"


# --- a collector that is down --------------------------------------------------------------


def test_a_collector_that_is_down_costs_requests_nothing(
    tiny_model: Path, shared_cache: Path, tmp_path: Path
) -> None:
    closed = free_port()  # nothing listens there
    env = {
        **_server_env(tiny_model, shared_cache, tmp_path),
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{closed}",
        "OTEL_METRIC_EXPORT_INTERVAL": "200",
        "OTEL_BSP_SCHEDULE_DELAY": "20",
        "OTEL_BSP_MAX_QUEUE_SIZE": "64",  # fills up at once: spans are dropped, never queued up
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "32",
    }
    log_path = tmp_path / "server.log"
    credential = token()
    with running_server(env, log_path) as base_url:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            responses = list(
                pool.map(
                    lambda seed: _predict(base_url, credential, save=seed % 2 == 0, seed=seed),
                    range(40),
                )
            )
        assert [r.status_code for r in responses] == [200] * 40
        samples = _prometheus_samples(base_url)
        total = sum(
            s.value for s in samples["inference_api_requests_total"]
            if s.labels["endpoint"] == "/predict"
        )
        assert total == 40
    logged = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    assert any(entry["message"] == "Application shutdown complete." for entry in logged)
    # The exporters' complaints are rate limited: a few lines, not one per export attempt.
    complaints = [entry for entry in logged if entry["logger"].startswith("opentelemetry")]
    assert len(complaints) <= 12, [entry["message"] for entry in complaints]
