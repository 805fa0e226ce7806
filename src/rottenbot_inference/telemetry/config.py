"""Where telemetry goes: OTLP targets resolved from the settings and the standard variables.

Precedence for each signal (traces, metrics, logs), as the OpenTelemetry specification has it:
`OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT` (used as is), then `OTEL_EXPORTER_OTLP_ENDPOINT` (a base
URL: HTTP adds `/v1/<signal>`), then the deployment's `ALLOY_ENDPOINT` (gRPC). The protocol is
`OTEL_EXPORTER_OTLP_<SIGNAL>_PROTOCOL`, then `OTEL_EXPORTER_OTLP_PROTOCOL`, then gRPC (what
Alloy listens on at 4317, and what the Python distro defaults to). `OTEL_<SIGNAL>_EXPORTER=none`
or `OTEL_SDK_DISABLED=true` turn a signal's export off. With no endpoint at all nothing is
exported (and nothing is logged about it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from rottenbot_inference.settings import Settings

Signal = Literal["traces", "metrics", "logs"]
SIGNALS: tuple[Signal, ...] = ("traces", "metrics", "logs")
GRPC = "grpc"
HTTP = "http/protobuf"


@dataclass(frozen=True)
class OtlpTarget:
    signal: Signal
    endpoint: str  # gRPC: scheme://host:port; HTTP: the full URL of the signal
    protocol: str  # GRPC or HTTP


def _clean(value: str | None) -> str | None:
    return value.strip() if value and value.strip() else None


def _protocol(value: str | None) -> str:
    value = (value or GRPC).strip().lower()
    if value.startswith("http"):
        return HTTP  # http/json is not supported by the Python exporters: protobuf it is
    return GRPC


def resolve_targets(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> dict[Signal, OtlpTarget]:
    """The OTLP target of each signal that is exported (none: an empty dict)."""
    env = os.environ if environ is None else environ
    if (_clean(env.get("OTEL_SDK_DISABLED")) or "").lower() == "true":
        return {}
    base = _clean(settings.otel_exporter_otlp_endpoint) or _clean(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    alloy = _clean(settings.alloy_endpoint)
    default_protocol = settings.otel_exporter_otlp_protocol or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    targets: dict[Signal, OtlpTarget] = {}
    for signal in SIGNALS:
        upper = signal.upper()
        if (_clean(env.get(f"OTEL_{upper}_EXPORTER")) or "otlp").lower() == "none":
            continue
        protocol = _protocol(env.get(f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL") or default_protocol)
        specific = _clean(env.get(f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT"))
        if specific:
            endpoint = specific
        elif base:
            endpoint = f"{base.rstrip('/')}/v1/{signal}" if protocol == HTTP else base
        elif alloy:
            endpoint = f"{alloy.rstrip('/')}/v1/{signal}" if protocol == HTTP else alloy
        else:
            continue
        if "://" not in endpoint:
            endpoint = f"http://{endpoint}"  # `alloy:4317`, as compose files often write it
        targets[signal] = OtlpTarget(signal, endpoint, protocol)
    return targets
