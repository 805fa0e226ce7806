"""An OTLP/gRPC receiver standing in for the OpenTelemetry collector (deploy/standins).

Accepts traces, metrics and logs on :4317 like the collector's `otlp` receiver, logs one line
per export, and answers GET :13133/ (the collector's health_check port) with the counts so far:
{"spans": N, "metric_points": N, "log_records": N, "services": [...]}.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

log = logging.getLogger("otlp-receiver")
counts: dict[str, int] = {"spans": 0, "metric_points": 0, "log_records": 0}
services: set[str] = set()
lock = threading.Lock()


def _record(kind: str, resources: Any, count: int) -> None:
    with lock:
        counts[kind] += count
        for resource in resources:
            for attribute in resource.resource.attributes:
                if attribute.key == "service.name":
                    services.add(attribute.value.string_value)
    log.info("received %d %s", count, kind)


class Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request: Any, context: Any) -> Any:
        spans = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        _record("spans", request.resource_spans, spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def Export(self, request: Any, context: Any) -> Any:
        points = sum(len(m.ListFields()) for r in request.resource_metrics
                     for s in r.scope_metrics for m in s.metrics)
        _record("metric_points", request.resource_metrics, points)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def Export(self, request: Any, context: Any) -> Any:
        records = sum(len(s.log_records) for r in request.resource_logs for s in r.scope_logs)
        _record("log_records", request.resource_logs, records)
        return logs_service_pb2.ExportLogsServiceResponse()


class Status(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        with lock:
            body = json.dumps({**counts, "services": sorted(services)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # quiet: probes every few seconds
        pass


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)
    server.add_insecure_port("0.0.0.0:4317")
    server.start()
    log.info("OTLP/gRPC on :4317, status on :13133")
    ThreadingHTTPServer(("0.0.0.0", 13133), Status).serve_forever()


if __name__ == "__main__":
    main()
