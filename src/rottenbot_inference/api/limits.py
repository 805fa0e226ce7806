"""Limits on request bodies, enforced while they stream in: size (413) and pace (408).

Neither waits for the whole body: an oversized one is refused from its Content-Length or as
soon as the bytes received pass the limit, a slow one as soon as a piece is late.
"""

from __future__ import annotations

import asyncio

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rottenbot_inference.api.errors import PayloadTooLarge, RequestTimeout

# Room for the multipart boundary, part headers and small form fields around the file.
MULTIPART_OVERHEAD = 64 * 1024
_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB")


def format_size(size: int) -> str:
    """`10485760` -> "10 MiB"; a size that is not round keeps its exact byte count too."""
    value, unit = float(size), 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    if unit == 0:
        return f"{size:,} byte{'' if size == 1 else 's'}"
    text = f"{value:.1f}".removesuffix(".0") + " " + _UNITS[unit]
    return text if value == round(value, 1) else f"{text} ({size:,} bytes)"


def upload_too_large(max_upload_bytes: int) -> str:
    """The 413 detail for a file over MAX_UPLOAD_BYTES, in the client's terms."""
    return (
        f"The upload exceeds the size limit: files of up to {format_size(max_upload_bytes)} "
        "are accepted (the multipart form around the file may add "
        f"{format_size(MULTIPART_OVERHEAD)})."
    )


class BodySizeLimitMiddleware:
    """413 from the Content-Length header at once, or as soon as a streamed body exceeds it.

    The body may be the file's limit plus MULTIPART_OVERHEAD (boundaries, part headers).
    """

    def __init__(self, app: ASGIApp, max_upload_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_upload_bytes + MULTIPART_OVERHEAD
        self.detail = upload_too_large(max_upload_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > limit:
                    await _send_413(send, self.detail)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(self.detail)
            return message

        await self.app(scope, limited_receive, send)


async def _send_413(send: Send, detail: str) -> None:
    body = orjson.dumps({"detail": detail})
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyReadTimeoutMiddleware:
    """408 + `Connection: close` for bodies that trickle in (slow-loris uploads).

    Each piece of the body must arrive within `idle_timeout_s` of the previous one (or of the
    app's first read), and the whole body within `total_timeout_s` of the request's start.
    Once the body is complete, reads (the app waiting for a disconnect) are not limited.
    uvicorn itself has no such timeout: it waits for a body as long as the client keeps the
    connection open.
    """

    def __init__(self, app: ASGIApp, idle_timeout_s: float, total_timeout_s: float) -> None:
        self.app = app
        self.idle_timeout_s = idle_timeout_s
        self.total_timeout_s = total_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total_timeout_s
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            remaining = deadline - loop.time()
            timeout = min(self.idle_timeout_s, remaining)
            try:
                if timeout <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), timeout)
            except TimeoutError:
                which = "whole request body" if timeout >= remaining else "next part of the body"
                raise RequestTimeout(
                    f"The {which} did not arrive in time; the connection is closed."
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed_receive, send)
