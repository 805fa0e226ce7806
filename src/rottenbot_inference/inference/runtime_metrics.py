"""`inference_model_runtime_info{runtime, precision, model_version}`: what computes the model.

Value 1 for the serving model (Prometheus: `inference_model_runtime_info`), with the runtime
(`onnxruntime`, `openvino`, `keras`) and the precision it computes in (`fp32`, `bf16`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import Observation

from rottenbot_inference.telemetry import metrics as service_metrics

_meter = metrics.get_meter("rottenbot_inference")


def _runtime_info(state: Any) -> Iterable[Observation]:
    bundle = state.service.bundle
    if bundle is not None:
        yield Observation(
            1,
            {
                "service_name": service_metrics.SERVICE_NAME,
                "model_version": bundle.version,
                "runtime": bundle.runtime.name,
                "precision": getattr(bundle.runtime, "precision", "fp32"),
            },
        )


_meter.create_observable_gauge(
    "inference_model_runtime_info",
    [service_metrics._observe(_runtime_info)],
    unit="1",
    description="The runtime computing the serving model and its precision (value 1)",
)
