"""Telemetry in-process: span tree and attributes (in-memory exporter), /metrics, the access log,
log formats, OTLP target resolution, OTLP over HTTP, and the Grafana dashboard's queries."""

from __future__ import annotations

import http.server
import io
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from prometheus_client.parser import text_string_to_metric_families

from rottenbot_inference.app import create_app
from rottenbot_inference.settings import Settings
from rottenbot_inference.telemetry import setup_telemetry
from rottenbot_inference.telemetry.config import GRPC, HTTP, OtlpTarget, resolve_targets
from rottenbot_inference.telemetry.logs import (
    REDACTED,
    JsonFormatter,
    RateLimitFilter,
    TextFormatter,
    TraceContextFilter,
    configure_logging,
)
from rottenbot_inference.telemetry.metrics import LATENCY_BUCKETS_MS
from rottenbot_inference.telemetry.setup import (
    RecordWhenConsumed,
    _metric_exporter,
    _span_exporter,
)
from tests.helpers import jpeg_bytes, random_photo, token, wait_ready

PREDICT = "/api/v1/inference/predict"
DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "inference-dashboard.json"


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    """Spans of this process, in memory (added beside whatever the global provider exports)."""
    telemetry = setup_telemetry(Settings(_env_file=None))  # type: ignore[call-arg]  # once
    assert isinstance(trace.get_tracer_provider(), TracerProvider)
    memory = InMemorySpanExporter()
    telemetry.add_span_processor(SimpleSpanProcessor(memory))  # spans are recorded from now on
    return memory


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    exporter.clear()
    yield exporter
    exporter.clear()


def _upload(seed: int = 0) -> dict[str, Any]:
    return {"file": ("photo.jpg", jpeg_bytes(random_photo(240, 320, seed=seed)), "image/jpeg")}


def _bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer {token()}"}


def _hex(number: int, width: int) -> str:
    return format(number, f"0{width}x")


def _wait(predicate: Callable[[], Any], timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)
    return result


def _by_name(finished: tuple[ReadableSpan, ...], trace_id: int) -> dict[str, ReadableSpan]:
    return {s.name: s for s in finished if s.context.trace_id == trace_id}


def _scrape(client: TestClient) -> dict[str, list[Any]]:
    response = client.get("/metrics")  # no Authorization: Prometheus scrapes without one
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


# --- spans -----------------------------------------------------------------------------------


def test_predict_span_tree_continues_the_traceparent(
    client: TestClient, spans: InMemorySpanExporter
) -> None:
    user = uuid.uuid4()
    credential = token(user)
    trace_id, caller = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    response = client.post(
        f"{PREDICT}?save_prediction=True&user_uid={user}",
        files=_upload(),
        headers={
            "Authorization": f"Bearer {credential}", "traceparent": f"00-{trace_id}-{caller}-01"
        },
    )
    assert response.status_code == 200, response.text
    wanted = int(trace_id, 16)

    def drained() -> dict[str, ReadableSpan] | None:
        finished = spans.get_finished_spans()
        linked = {
            s.name for s in finished if any(link.context.trace_id == wanted for link in s.links)
        }
        ok = {"batch", "save_image_s3", "save_prediction_db"} <= linked
        return _by_name(finished, wanted) if ok else None

    tree = _wait(drained)
    root = tree["predict_endpoint"]
    assert root.kind == trace.SpanKind.SERVER
    assert root.parent is not None and _hex(root.parent.span_id, 16) == caller
    assert root.parent.is_remote
    for child in ("verify_token", "check_revocation", "read_image_contents", "model_prediction",
                  "save_prediction_outbox"):
        assert tree[child].parent.span_id == root.context.span_id, child
    for grandchild in ("preprocess_image", "get_prediction"):
        assert tree[grandchild].parent.span_id == tree["model_prediction"].context.span_id
    assert root.attributes["enduser.id"] == str(user)
    assert tree["get_prediction"].attributes["batch.size"] >= 1
    assert "queue_ms" in tree["get_prediction"].attributes
    assert tree["preprocess_image"].attributes["image.format"] == "jpeg"
    assert tree["model_prediction"].attributes["prediction.class"] == response.json()[
        "predicted_class"
    ]

    finished = spans.get_finished_spans()
    batch = next(s for s in finished if s.name == "batch" and any(
        link.context.span_id == tree["get_prediction"].context.span_id for link in s.links
    ))
    assert batch.parent is None and batch.context.trace_id != wanted
    assert [link.context.span_id for link in tree["get_prediction"].links] == [
        batch.context.span_id
    ]
    for name in ("save_image_s3", "save_prediction_db"):
        drain = next(s for s in finished if s.name == name and any(
            link.context.trace_id == wanted for link in s.links
        ))
        assert drain.parent is None
        assert root.context.span_id in [link.context.span_id for link in drain.links]

    for span in finished:
        for value in span.attributes.values():
            for part in credential.split("."):
                assert part not in str(value), f"token in {span.name}"


def test_refused_tokens_are_traced_without_the_token(
    client: TestClient, spans: InMemorySpanExporter
) -> None:
    bad = token(secret="w" * 40)
    response = client.post(PREDICT, files=_upload(), headers={"Authorization": f"Bearer {bad}"})
    assert response.status_code == 401
    finished = _wait(
        lambda: [s for s in spans.get_finished_spans() if s.name == "predict_endpoint"]
    )
    root = finished[-1]
    tree = _by_name(spans.get_finished_spans(), root.context.trace_id)
    assert root.parent is None  # no traceparent: a new trace
    assert root.attributes["http.response.status_code"] == 401
    assert tree["verify_token"].status.status_code == trace.StatusCode.ERROR
    assert tree["verify_token"].attributes["auth.result"] == "refused"
    assert "model_prediction" not in tree and "enduser.id" not in root.attributes
    for span in spans.get_finished_spans():
        rendered = json.dumps(dict(span.attributes)) + json.dumps(
            [dict(event.attributes or {}) for event in span.events]
        )
        for part in bad.split("."):
            assert part not in rendered


def test_unsampled_callers_get_answers_and_no_recorded_spans(
    client: TestClient, spans: InMemorySpanExporter
) -> None:
    trace_id = uuid.uuid4().hex
    response = client.post(
        PREDICT,
        files=_upload(),
        headers={**{"Authorization": f"Bearer {token()}"},
                 "traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-00"},
    )
    assert response.status_code == 200
    assert not [s for s in spans.get_finished_spans() if s.context.trace_id == int(trace_id, 16)]


def test_without_a_span_consumer_spans_carry_ids_but_record_nothing() -> None:
    sampler = RecordWhenConsumed(ParentBased(ALWAYS_ON), recording=False)
    provider = TracerProvider(sampler=sampler)
    tracer = provider.get_tracer("tests")
    with tracer.start_as_current_span("not recorded") as span:
        context = span.get_span_context()
        line = JsonFormatter().format(_record("inside"))
    assert context.is_valid and not span.is_recording()
    assert json.loads(line)["trace_id"] == _hex(context.trace_id, 32)  # logs still correlate
    sampler.recording = True  # an exporter (or a test's in-memory one) was added
    assert tracer.start_span("recorded").is_recording()


# --- the access log ----------------------------------------------------------------------------


def test_access_log_has_status_duration_and_user_but_no_secrets(
    client: TestClient, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    user = uuid.uuid4()
    credential = token(user)
    trace_id = uuid.uuid4().hex
    with caplog.at_level(logging.INFO, logger="rottenbot_inference.access"):
        response = client.post(
            f"{PREDICT}?save_prediction=False&user_uid={user}",
            files=_upload(),
            headers={"Authorization": f"Bearer {credential}",
                     "traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"},
        )
        assert response.status_code == 200
        client.get("/health/live")  # probes are logged at DEBUG only
        refused = client.post(  # an unknown parameter is a 422; its value is not logged either
            f"{PREDICT}?secret=hunter2", files=_upload(),
            headers={"Authorization": f"Bearer {credential}"},
        )
        assert refused.status_code == 422
    records = [r for r in caplog.records if r.name == "rottenbot_inference.access"]
    assert len(records) == 2
    record, refused_record = records
    assert "hunter2" not in JsonFormatter().format(refused_record)
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["method"] == "POST" and fields["path"] == PREDICT and fields["status"] == 200
    assert fields["endpoint"] == "/predict" and fields["duration_ms"] > 0
    assert fields["user_id"] == str(user)
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert entry["trace_id"] == trace_id  # logged inside the request span
    assert "user_uid" not in line  # no query string in the log
    for part in credential.split("."):
        assert part not in line


# --- /metrics --------------------------------------------------------------------------------


def test_metrics_endpoint_exposes_the_dashboard_names_and_buckets(client: TestClient) -> None:
    before = _scrape(client)
    assert client.post(PREDICT, files=_upload(), headers=_bearer()).status_code == 200
    samples = _scrape(client)

    def count(found: dict[str, list[Any]]) -> float:
        return sum(
            s.value for s in found.get("inference_api_requests_total", [])
            if s.labels.get("endpoint") == "/predict" and s.labels.get("status") == "200"
        )

    assert count(samples) == count(before) + 1
    sample = next(
        s for s in samples["inference_api_requests_total"] if s.labels["endpoint"] == "/predict"
    )
    assert set(sample.labels) == {"endpoint", "method", "service_name", "status"}
    assert sample.labels["service_name"] == "inference_service"
    for suffix in ("_bucket", "_sum", "_count"):
        assert f"inference_api_duration_milliseconds{suffix}" in samples
    bounds = {
        float(s.labels["le"]) for s in samples["inference_api_duration_milliseconds_bucket"]
        if s.labels["endpoint"] == "/predict" and s.labels["le"] != "+Inf"
    }
    assert bounds == set(LATENCY_BUCKETS_MS)
    for name in (
        "inference_queue_duration_milliseconds_bucket",
        "inference_compute_duration_milliseconds_bucket",
        "inference_batch_size_bucket",
        "inference_image_decode_duration_milliseconds_bucket",
        "inference_prediction_confidence_bucket",
        "inference_predictions_total",
        "inference_batcher_queue_size",
        "inference_batcher_executing",
        "inference_api_requests_in_flight",
        "inference_outbox_backlog",
        "inference_outbox_oldest_age_seconds",
        "inference_model_info",
        "inference_model_loads_total",
        "inference_model_swaps_total",
    ):
        assert name in samples, name
    info = samples["inference_model_info"][0]
    assert info.value == 1 and {"model_name", "model_version", "runtime"} <= set(info.labels)


def _failed_app(make_settings: Callable[..., Settings], tmp_path: Path) -> TestClient:
    return TestClient(
        create_app(make_settings(model_path=tmp_path / "no-such-model.keras")),
        raise_server_exceptions=False,
    )


def test_rejections_are_counted_by_reason(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    with _failed_app(make_settings, tmp_path) as failed:
        _wait(lambda: failed.get("/health/ready").json()["status"] == "failed")
        before = _scrape(failed)
        response = failed.post(PREDICT, files=_upload(), headers=_bearer())
        assert response.status_code == 503
        after = _scrape(failed)

    def rejected(samples: dict[str, list[Any]]) -> float:
        return sum(
            s.value for s in samples.get("inference_rejected_requests_total", [])
            if s.labels["reason"] == "not_ready"
        )

    assert rejected(after) == rejected(before) + 1
    failures = [
        s for s in after["inference_model_loads_total"] if s.labels["outcome"] == "failure"
    ]
    assert failures and failures[0].value >= 1


# --- the dashboard -----------------------------------------------------------------------------

_SELECTOR = re.compile(r"\b(inference_[a-z0-9_]+)\s*(\{[^}]*\})?")
# Exported only with CHALLENGER_URI set: checked by tests/test_challenger.py instead.
CHALLENGER_ONLY = ("inference_shadow_", "inference_challenger_")
_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)")


def _expressions(dashboard: dict[str, Any]) -> list[str]:
    found = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    found += [a["expr"] for a in dashboard.get("annotations", {}).get("list", []) if "expr" in a]
    return found


def test_dashboard_queries_only_metric_names_and_labels_the_service_exposes(
    client: TestClient, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("p50 / p95 / p99", "request rate", "errors by status", "queue wait vs compute",
                  "batch size", "outbox backlog", "predictions per class"):
        assert topic in titles, topic
    # Traffic that makes every series exist: a save (outbox), a rejection and a failed load.
    response = client.post(
        f"{PREDICT}?save_prediction=True", files=_upload(), headers=_bearer()
    )
    assert response.status_code == 200
    with _failed_app(make_settings, tmp_path) as failed:
        _wait(lambda: failed.get("/health/ready").json()["status"] == "failed")
        refused = failed.post(PREDICT, files=_upload(), headers=_bearer())
        assert refused.status_code == 503, refused.text  # the model failed to load
    samples = _scrape(client)
    labels_of: dict[str, set[str]] = {}
    for name, found in samples.items():
        for sample in found:
            labels_of.setdefault(name, set()).update(sample.labels)
    expressions = _expressions(dashboard)
    assert len(expressions) >= 20
    used = set()
    for expression in expressions:
        for name, selector in _SELECTOR.findall(expression):
            if name.startswith(CHALLENGER_ONLY):
                continue
            used.add(name)
            assert name in samples, f"the dashboard queries {name}, which /metrics lacks"
            for label, _ in _LABEL.findall(selector or ""):
                assert label in labels_of[name], f"{name} has no label {label}"
    assert {"inference_api_requests_total", "inference_api_duration_milliseconds_bucket"} <= used


# --- log formats -------------------------------------------------------------------------------


def _record(message: str, *args: object, name: str = "tests", **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord(name, logging.WARNING, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_lines_carry_trace_context_and_redact_tokens(exporter: InMemorySpanExporter) -> None:
    credential = token()
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("outer") as span:
        record = _record("user sent %s", f"Bearer {credential}", fields={"header": credential})
        TraceContextFilter().filter(record)
        line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert entry["trace_id"] == _hex(span.get_span_context().trace_id, 32)
    assert entry["span_id"] == _hex(span.get_span_context().span_id, 16)
    assert entry["level"] == "WARNING" and entry["logger"] == "tests"
    assert REDACTED in entry["message"] and entry["header"] == REDACTED
    for part in credential.split("."):
        assert part not in line
    outside = json.loads(JsonFormatter().format(_record("plain")))
    assert outside["trace_id"] is None and outside["message"] == "plain"
    try:
        raise ValueError(f"bad {credential}")
    except ValueError:
        import sys

        failing = _record("failed")
        failing.exc_info = sys.exc_info()
    rendered = JsonFormatter().format(failing)
    assert "ValueError" in json.loads(rendered)["exception"] and credential not in rendered


def test_configure_logging_picks_json_or_text(make_settings: Callable[..., Settings]) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        stream = io.StringIO()  # not a terminal: JSON
        configure_logging(make_settings(log_format="auto"), stream)
        logging.getLogger("tests.json").info("hello %s", "world", extra={"fields": {"k": 1}})
        entry = json.loads(stream.getvalue().splitlines()[-1])
        assert entry["message"] == "hello world" and entry["k"] == 1
        stream = io.StringIO()
        configure_logging(make_settings(log_format="text"), stream)
        logging.getLogger("tests.text").info("hello", extra={"fields": {"k": 1}})
        line = stream.getvalue().splitlines()[-1]
        assert "INFO" in line and "tests.text: hello k=1" in line
        assert sum(type(h).__name__ == "_ServiceHandler" for h in root.handlers) == 1
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert TextFormatter().format(_record(f"x {token()}")).count(REDACTED) == 1


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_uvicorn_color_message_is_not_logged(
    make_settings: Callable[..., Settings], log_format: str
) -> None:
    """uvicorn passes `color_message` (ANSI escape codes) with its start-up lines."""
    import uvicorn

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    try:
        configure_logging(make_settings(log_format=log_format), stream)
        config = uvicorn.Config(lambda: None, host="127.0.0.1", port=0, log_config=None)
        config.bind_socket().close()  # logs uvicorn's own "Uvicorn running on ..." line
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    line = stream.getvalue().splitlines()[-1]
    assert "Uvicorn running on http://127.0.0.1:" in line
    assert "\x1b" not in line and "color_message" not in line
    if log_format == "json":
        assert json.loads(line)["logger"] == "uvicorn.error"


def test_sdk_complaints_are_rate_limited() -> None:
    limiter = RateLimitFilter(interval_s=3600)
    complaint = "Transient error %s encountered while exporting traces"
    passed = [
        limiter.filter(_record(complaint, "UNAVAILABLE", name="opentelemetry.exporter.otlp"))
        for _ in range(50)
    ]
    assert passed.count(True) == 1
    assert all(limiter.filter(_record("ours")) for _ in range(5))  # other loggers untouched


# --- OTLP target resolution --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "environ", "expected"),
    [
        ({}, {}, {}),
        ({"alloy_endpoint": "http://alloy:4317"}, {},
         {s: ("http://alloy:4317", GRPC) for s in ("traces", "metrics", "logs")}),
        ({"alloy_endpoint": "alloy:4317"}, {"OTEL_LOGS_EXPORTER": "none"},
         {s: ("http://alloy:4317", GRPC) for s in ("traces", "metrics")}),
        ({"alloy_endpoint": "http://alloy:4317"},
         {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
          "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
         {s: (f"http://collector:4318/v1/{s}", HTTP) for s in ("traces", "metrics", "logs")}),
        ({}, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://tempo:4317",
              "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://mimir/otlp/v1/metrics",
              "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf"},
         {"traces": ("https://tempo:4317", GRPC),
          "metrics": ("http://mimir/otlp/v1/metrics", HTTP)}),
        ({"otel_exporter_otlp_endpoint": "http://c:4317"}, {"OTEL_SDK_DISABLED": "true"}, {}),
    ],
)
def test_otlp_targets_follow_the_standard_variables(
    settings: dict[str, str], environ: dict[str, str], expected: dict[str, tuple[str, str]]
) -> None:
    resolved = resolve_targets(Settings(_env_file=None, **settings), environ)  # type: ignore[call-arg]
    assert {s: (t.endpoint, t.protocol) for s, t in resolved.items()} == expected


# --- OTLP over HTTP ----------------------------------------------------------------------------


class _HttpReceiver(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


def test_http_protobuf_exporters_reach_an_otlp_http_receiver() -> None:
    received: list[tuple[str, bytes]] = []
    handler = type("Handler", (_HttpReceiver,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        environ = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": base, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"
        }
        targets = resolve_targets(Settings(_env_file=None), environ)  # type: ignore[call-arg]
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_span_exporter(targets["traces"])))
        with provider.get_tracer("tests").start_as_current_span("over_http"):
            pass
        reader = PeriodicExportingMetricReader(
            _metric_exporter(targets["metrics"]), export_interval_millis=3_600_000
        )
        meters = MeterProvider(metric_readers=[reader])
        meters.get_meter("tests").create_counter("http_probe_total").add(1)
        meters.force_flush()
        provider.shutdown()
        meters.shutdown()
    finally:
        server.shutdown()
    paths = {path for path, _ in received}
    assert {"/v1/traces", "/v1/metrics"} <= paths
    traces = trace_service_pb2.ExportTraceServiceRequest.FromString(
        next(body for path, body in received if path == "/v1/traces")
    )
    assert traces.resource_spans[0].scope_spans[0].spans[0].name == "over_http"
    metrics_request = metrics_service_pb2.ExportMetricsServiceRequest.FromString(
        next(body for path, body in received if path == "/v1/metrics")
    )
    names = {
        m.name for rm in metrics_request.resource_metrics for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert "http_probe_total" in names
    assert OtlpTarget("traces", base, HTTP).protocol == HTTP


def test_served_app_is_ready_with_telemetry_installed(client: TestClient) -> None:
    wait_ready("", client=client)
    assert client.get("/api/v1/openapi.json").json()["paths"]["/metrics"]
