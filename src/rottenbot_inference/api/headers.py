"""Security headers on every response (the API serves JSON and images, never active content).

- `X-Content-Type-Options: nosniff`: browsers take the declared type, never guess one (a
  saved "image" is never run as HTML or script).
- `Cache-Control: no-store` on answers to requests carrying credentials, unless the route set
  its own (the saved-image route says `private`): no shared cache keeps a user's data.
- `X-Frame-Options: DENY`, `Content-Security-Policy: default-src 'none'; frame-ancestors
  'none'` and `Referrer-Policy: no-referrer` on everything but the interactive docs (Swagger
  UI and ReDoc load their scripts and styles from a CDN).

HSTS is left to the TLS-terminating proxy: this process speaks plain HTTP.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_ALWAYS = ((b"x-content-type-options", b"nosniff"),)
_LOCKDOWN = (
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"referrer-policy", b"no-referrer"),
)
_NO_STORE = (b"cache-control", b"no-store")
_CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-admin-key"})


class SecurityHeadersMiddleware:
    """Adds the headers above to `http.response.start` unless the route already set them."""

    def __init__(self, app: ASGIApp, docs_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.docs_paths = docs_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = list(_ALWAYS)
        if scope["path"] not in self.docs_paths:
            extra.extend(_LOCKDOWN)
        if any(name in _CREDENTIAL_HEADERS for name, _ in scope["headers"]):
            extra.append(_NO_STORE)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers.extend(item for item in extra if item[0] not in present)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
