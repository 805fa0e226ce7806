"""Admission control for `POST /predict`: shed excess load at the door, before any work.

Under overload the expensive part of a request is not the model but everything before it:
receiving and parsing the multipart body and decoding the JPEG, on the same cores as the
model. A bound on the model queue alone lets all of that pile up, so this middleware decides
first, from two plain numbers, before the body is read:

- admitted predict requests (reading, decoding, queued or computing) must stay under
  MAX_INFLIGHT_REQUESTS (default: what the batcher can hold, QUEUE_CAPACITY + MAX_BATCH_SIZE);
- the estimated wait, admitted requests x the recent interval between two answers while busy
  (inference/pace.py: decode, queue and model together), must stay under MAX_QUEUE_WAIT_MS,
  so that a slower model, bigger images or fewer cores shed sooner. The estimate is only
  applied once a full batch (MAX_BATCH_SIZE) is already in, so that a short burst or a slow
  request at normal load is never shed.

A refused request gets 503 + Retry-After at once (the body is left unread; uvicorn discards
it and keeps the connection) and is counted in `inference_rejected_requests_total` with reason
`inflight_limit` or `queue_wait`. An admitted request's arrival instant is recorded in the
scope, and its deadline (`request_deadline`) is measured from it, not from when it reached the
model queue.

One process, one controller: with `--workers N` each worker admits up to the limit.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from rottenbot_inference.telemetry.metrics import record_rejection

if TYPE_CHECKING:
    from starlette.requests import Request

    from rottenbot_inference.api.state import AppState
    from rottenbot_inference.settings import Settings

PREDICT_PATH = "/api/v1/inference/predict"
ARRIVED_AT = "arrived_at"  # key in scope["state"] (request.state): time.monotonic() at arrival
OVERLOADED = "The service is overloaded; retry shortly."


class AdmissionController:
    """Counts admitted requests; `refusal` says why one more may not enter (None: it may)."""

    def __init__(self, max_inflight: int, max_queue_wait_ms: float, min_queue: int = 1) -> None:
        self.max_inflight = max_inflight
        self.max_queue_wait_ms = max_queue_wait_ms
        self.min_queue = min_queue  # the wait estimate applies from this many admitted on
        self.inflight = 0  # touched only on the event loop: no lock

    def refusal(self, interval_ms: float) -> str | None:
        """`interval_ms`: the recent time between two answers while busy (0: not measured)."""
        if self.inflight >= self.max_inflight:
            return "inflight_limit"
        if (
            self.max_queue_wait_ms > 0
            and self.inflight >= self.min_queue
            and self.inflight * interval_ms > self.max_queue_wait_ms
        ):
            return "queue_wait"
        return None


def _state(scope: Scope) -> AppState | None:
    app = scope.get("app")
    return getattr(getattr(app, "state", None), "rottenbot", None)


class AdmissionMiddleware:
    """Pure ASGI middleware; other paths pass straight through."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.controller = AdmissionController(
            settings.effective_max_inflight, settings.max_queue_wait_ms, settings.max_batch_size
        )
        body = orjson.dumps({"detail": OVERLOADED})
        self._refusal_start = {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(settings.retry_after_s).encode()),
            ],
        }
        self._refusal_body = {"type": "http.response.body", "body": body}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PREDICT_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})[ARRIVED_AT] = time.monotonic()
        state = _state(scope)
        interval_ms = state.service.pace.interval_ms if state is not None else 0.0
        controller = self.controller
        reason = controller.refusal(interval_ms)
        if reason is not None:
            record_rejection(reason)
            if state is not None:
                state.service.pace.shed()  # no idle capacity now (shadow work stands aside)
            # Fresh messages (the header list too): a layer may rewrite them in place.
            start = {**self._refusal_start, "headers": list(self._refusal_start["headers"])}
            await send(start)
            await send({**self._refusal_body})
            return
        controller.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            controller.inflight -= 1


def request_deadline(request: Request, settings: Settings) -> float:
    """The `time.monotonic()` instant by which the request must have reached the model:
    its arrival (recorded by the middleware; now if it did not run) + REQUEST_TIMEOUT_S."""
    arrived = getattr(request.state, ARRIVED_AT, None)
    if arrived is None:
        arrived = time.monotonic()
    return arrived + settings.request_timeout_s
