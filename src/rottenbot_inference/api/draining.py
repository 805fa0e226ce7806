"""While the service drains (see shutdown.py): refuse new API requests, close connections.

- A request reaching the app while the phase is `draining` or `shutting_down` and whose path
  is under `/api/` is answered 503 + Retry-After + `Connection: close` without running it.
  Its body is read (and discarded) first, so the client, which sends the whole body before it
  reads the answer, gets the 503 instead of a connection reset. Health probes and /metrics
  keep working: liveness stays 200, readiness reports the drain.
- Every response sent while draining, including those of requests admitted before the signal,
  carries `Connection: close`, so keep-alive clients open their next connection elsewhere.

Requests already inside the app when the signal came are not affected: they finish normally.
"""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rottenbot_inference.api.state import STOPPING, AppState
from rottenbot_inference.telemetry.metrics import record_rejection

SHUTTING_DOWN = "The service is shutting down; retry on another replica."
_REFUSED_PREFIX = "/api/"
_CLOSE = (b"connection", b"close")


def _state(scope: Scope) -> AppState | None:
    app = scope.get("app")
    return getattr(getattr(app, "state", None), "rottenbot", None)


class DrainingMiddleware:
    """Pure ASGI middleware; costs one attribute lookup per request while serving."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes  # a refused body is read at most this far

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = _state(scope) if scope["type"] == "http" else None
        if state is None or state.phase not in STOPPING:
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith(_REFUSED_PREFIX):
            await self._refuse(state, receive, send)
            return

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(name.lower() == b"connection" for name, _ in headers):
                    headers.append(_CLOSE)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, closing)

    async def _refuse(self, state: AppState, receive: Receive, send: Send) -> None:
        record_rejection("shutting_down")
        read = 0
        while read <= self.max_body_bytes:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: the client is gone
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = orjson.dumps({"detail": SHUTTING_DOWN})
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(state.settings.retry_after_s).encode()),
            _CLOSE,
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
