"""Refuse request bodies over the limit while they stream in, not after buffering them."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rottenbot_inference.api.errors import PayloadTooLarge

# Room for the multipart boundary, part headers and small form fields around the file.
MULTIPART_OVERHEAD = 64 * 1024


class BodySizeLimitMiddleware:
    """413 from the Content-Length header at once, or as soon as a streamed body exceeds it."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

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
                    await _send_413(send, limit)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"The request body exceeds {limit} bytes.")
            return message

        await self.app(scope, limited_receive, send)


async def _send_413(send: Send, limit: int) -> None:
    body = b'{"detail":"The request body exceeds %d bytes."}' % limit
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
