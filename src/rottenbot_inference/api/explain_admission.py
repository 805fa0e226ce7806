"""Admission for explanation requests: shed them first, before their body is read.

Explanations cost EXPLAIN_GRID² + 1 model passes each, so they are refused (503 +
Retry-After, the body left unread) as soon as predictions are busy or EXPLAIN_MAX_CONCURRENT
explanations are already admitted: see `Explainer.refusal`. An admitted request's arrival is
recorded like a prediction's (`ARRIVED_AT`), so its deadline counts from there.
"""

from __future__ import annotations

import time

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from rottenbot_inference.api.admission import ARRIVED_AT
from rottenbot_inference.telemetry.explain_metrics import record_refusal

EXPLAIN_PATH = "/api/v1/inference/explain"
SAVED_PREFIX = "/api/v1/inference/predictions/"
SAVED_SUFFIX = "/explanation.png"
SHED = "Explanations are paused while the service is busy with predictions; retry shortly."
BUSY = "Too many explanations are being computed; retry shortly."


def is_explanation(scope: Scope) -> bool:
    """POST /explain or GET /predictions/{uid}/explanation.png."""
    path = scope["path"]
    if scope["method"] == "POST":
        return path == EXPLAIN_PATH
    return (
        scope["method"] in ("GET", "HEAD")
        and path.startswith(SAVED_PREFIX)
        and path.endswith(SAVED_SUFFIX)
    )


class ExplainAdmissionMiddleware:
    """Pure ASGI middleware; other requests pass straight through."""

    def __init__(self, app: ASGIApp, retry_after_s: int) -> None:
        self.app = app
        self.retry_after = str(retry_after_s).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_explanation(scope):
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})[ARRIVED_AT] = time.monotonic()
        app = scope.get("app")
        state = getattr(getattr(app, "state", None), "rottenbot", None)
        explainer = getattr(state, "explainer", None)
        if explainer is None:  # not started yet: the route answers (503 not ready)
            await self.app(scope, receive, send)
            return
        reason = explainer.refusal()
        if reason is not None:
            record_refusal(reason)
            await self._refuse(send, SHED if reason == "explain_shed" else BUSY)
            return
        explainer.admit()
        try:
            await self.app(scope, receive, send)
        finally:
            explainer.release()

    async def _refuse(self, send: Send, detail: str) -> None:
        body = orjson.dumps({"detail": detail})
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", self.retry_after),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
