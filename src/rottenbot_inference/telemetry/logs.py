"""Logging: JSON lines (or readable text for a terminal) with trace ids, never a token.

- `configure_logging(settings)` replaces the root handlers with one stderr handler: JSON (one
  object per line: timestamp, level, logger, message, trace_id, span_id, plus the record's
  structured `fields`) unless `LOG_FORMAT=text` or, with `LOG_FORMAT=auto`, stderr is a terminal.
- Every line passes a redaction step: anything shaped like a JWT or a `Bearer` credential is
  replaced, whatever logged it (defence in depth: the service itself never logs tokens).
- The OpenTelemetry SDK's own warnings (collector unreachable, queue full) are rate limited:
  a collector that is down is worth one line a minute, not one per export attempt.
- `OtlpLogHandler` ships the same records over OTLP when a logs endpoint is configured.
- uvicorn's `color_message` (a copy of the message with ANSI colour codes, meant for its own
  coloured formatter) is never shown: neither as a JSON field nor as `key=value` text.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

import orjson
from opentelemetry import trace
from opentelemetry._logs import LogRecord as OtelLogRecord
from opentelemetry._logs import SeverityNumber

if TYPE_CHECKING:
    from opentelemetry.sdk._logs import LoggerProvider

    from rottenbot_inference.settings import Settings

# JWTs (three base64url parts, the first being a JSON header: "eyJ") and Bearer credentials.
_SECRET_PATTERNS = re.compile(
    r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/=-]{8,}"
)
REDACTED = "[REDACTED]"

# Attributes every LogRecord has; anything else was passed through `extra=`. uvicorn passes
# `color_message` (the message again, with ANSI escape codes) for its own formatter: not a field.
_RESERVED = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()
    | {"message", "asctime", "taskName", "trace_id", "span_id", "fields", "color_message"}
)


def redact(text: str) -> str:
    """`text` with anything that looks like a token replaced."""
    if "eyJ" not in text and "earer" not in text:  # the fast path: nearly every line
        return text
    return _SECRET_PATTERNS.sub(REDACTED, text)


def _trace_ids() -> tuple[str | None, str | None]:
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None, None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


class TraceContextFilter(logging.Filter):
    """Adds `trace_id`/`span_id` of the current span (None outside of one) to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "trace_id"):
            record.trace_id, record.span_id = _trace_ids()
        return True


class RateLimitFilter(logging.Filter):
    """Passes at most one record per `interval_s` for each message of the given loggers."""

    def __init__(self, prefixes: tuple[str, ...] = ("opentelemetry",), interval_s: float = 60.0):
        super().__init__()
        self._prefixes = prefixes
        self._interval = interval_s
        self._last: dict[tuple[str, Any], float] = {}
        self._suppressed: dict[tuple[str, Any], int] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._prefixes):
            return True
        key = (record.name, record.msg)
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, float("-inf")) < self._interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} similar messages suppressed)"
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """Structured fields: `extra={"fields": {...}}` plus any other simple `extra=` values."""
    fields: dict[str, Any] = {}
    for key, value in vars(record).items():
        if key not in _RESERVED and isinstance(value, str | int | float | bool):
            fields[key] = value
    extra = getattr(record, "fields", None)
    if isinstance(extra, dict):
        fields.update(extra)
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        trace_id = getattr(record, "trace_id", None)
        span_id = getattr(record, "span_id", None)
        if not hasattr(record, "trace_id"):
            trace_id, span_id = _trace_ids()
        entry: dict[str, Any] = {
            "timestamp": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
            "trace_id": trace_id,
            "span_id": span_id,
        }
        fields = _fields(record)
        if fields:
            for key, value in fields.items():
                entry.setdefault(key, redact(value) if isinstance(value, str) else value)
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        elif record.stack_info:
            entry["stack"] = redact(self.formatStack(record.stack_info))
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """`12:00:00.123 INFO  logger: message key=value [trace 4bf9...]` for a developer's terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        self.default_msec_format = "%s.%03d"

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if fields:
            line += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            line += f" [trace {trace_id}]"
        return redact(line)


def wants_json(settings: Settings, stream: Any = None) -> bool:
    if settings.log_format != "auto":
        return settings.log_format == "json"
    stream = stream or sys.stderr
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return True


class _ServiceHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler we installed, so configuring twice replaces instead of doubling."""


def configure_logging(settings: Settings, stream: Any = None) -> logging.Handler:
    """Root logging for the service process: one stderr handler, JSON or text."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _ServiceHandler) or type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    handler = _ServiceHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if wants_json(settings, stream) else TextFormatter())
    handler.addFilter(TraceContextFilter())
    handler.addFilter(RateLimitFilter())
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # The SDK's own diagnostics: warnings only (e.g. a collector that is down), rate limited.
    logging.getLogger("opentelemetry").setLevel(logging.WARNING)
    return handler


_SEVERITY = (
    (logging.CRITICAL, SeverityNumber.FATAL, "FATAL"),
    (logging.ERROR, SeverityNumber.ERROR, "ERROR"),
    (logging.WARNING, SeverityNumber.WARN, "WARN"),
    (logging.INFO, SeverityNumber.INFO, "INFO"),
    (logging.DEBUG, SeverityNumber.DEBUG, "DEBUG"),
)


class OtlpLogHandler(logging.Handler):
    """Python log records -> OpenTelemetry log records (batched and exported by the SDK).

    The SDK's own records are not shipped (a failing log export must not feed itself).
    """

    def __init__(self, provider: LoggerProvider, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self._provider = provider
        self.addFilter(RateLimitFilter())

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("opentelemetry"):
            return
        try:
            severity, text = SeverityNumber.TRACE, "TRACE"
            for level, number, name in _SEVERITY:
                if record.levelno >= level:
                    severity, text = number, name
                    break
            attributes: dict[str, Any] = {
                "code.function.name": record.funcName,
                "code.line.number": record.lineno,
                "code.file.path": record.pathname,
            }
            for key, value in _fields(record).items():
                attributes[key] = redact(value) if isinstance(value, str) else value
            if record.exc_info and record.exc_info[0] is not None:
                attributes["exception.type"] = record.exc_info[0].__name__
                attributes["exception.stacktrace"] = redact(
                    "".join(traceback.format_exception(*record.exc_info))
                )
            self._provider.get_logger(record.name).emit(
                OtelLogRecord(
                    timestamp=int(record.created * 1e9),
                    observed_timestamp=time.time_ns(),
                    severity_number=severity,
                    severity_text=text,
                    body=redact(record.getMessage()),
                    attributes=attributes,
                )
            )
        except Exception:  # never let telemetry break the caller
            self.handleError(record)
