"""Cancel a predict request's work when its client disconnects before the answer.

Uvicorn does not cancel a request's task when the client goes away: the work would go on for
nobody, and under overload clients that gave up are exactly the ones whose images are still
queued. This middleware runs the request in a child task; once the app has read the whole
body it keeps listening on the connection (`receive()` then returns only `http.disconnect`),
and if the client disconnects before the response has started, it cancels the child. The
cancellation reaches whatever the request awaits: a decode not yet started is dropped from
the pool's queue, and a queued image is skipped by the batcher (counted as
`inference_batcher_dropped_total{reason="cancelled"}`). A save already being committed to the
outbox is shielded and completes. The request is logged with status 499.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rottenbot_inference.api.admission import PREDICT_PATH


class CancelOnDisconnect:
    """Pure ASGI middleware for the given paths (default: predict); others pass through."""

    def __init__(self, app: ASGIApp, paths: Collection[str] = (PREDICT_PATH,)) -> None:
        self.app = app
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        watch = _Watch(receive, send)
        task = asyncio.ensure_future(self.app(scope, watch.receive, watch.send))
        watch.task = task
        try:
            await task
        except asyncio.CancelledError:
            outer = asyncio.current_task()
            if watch.client_gone and (outer is None or not outer.cancelling()):
                return  # we cancelled it: nobody is listening for an answer
            raise
        finally:
            watch.close()


class _Watch:
    """The request's receive/send channel, listening for a disconnect after the body."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self.task: asyncio.Future[None] | None = None
        self._listener: asyncio.Task[Message] | None = None
        self.response_started = False
        self.client_gone = False

    async def receive(self) -> Message:
        if self._listener is not None:  # the body is complete: share the listener's outcome
            return await asyncio.shield(self._listener)
        message = await self._receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            self._listener = asyncio.ensure_future(self._listen())
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.response_started = True
        await self._send(message)

    async def _listen(self) -> Message:
        message = await self._receive()  # returns when the client disconnects (or we answered)
        if message["type"] == "http.disconnect" and not self.response_started:
            task = self.task
            if task is not None and not task.done():
                self.client_gone = True
                task.cancel()
        return message

    def close(self) -> None:
        listener = self._listener
        if listener is not None and not listener.done():
            listener.cancel()
