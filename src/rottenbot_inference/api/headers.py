"""Security headers on every response (the API serves JSON and images, never active content).

- `X-Content-Type-Options: nosniff`: browsers take the declared type, never guess one (a
  saved "image" is never run as HTML or script).
- `Cache-Control: no-store` on answers to requests carrying credentials, unless the route set
  its own (the saved-image route says `private`): no shared cache keeps a user's data.
- `X-Frame-Options: DENY`, `Content-Security-Policy: default-src 'none'; frame-ancestors
  'none'` and `Referrer-Policy: no-referrer` on everything; the interactive docs pages (Swagger
  UI and ReDoc, scripts and styles served by this process) get a policy that lets them run
  their own scripts from this origin, and nothing from elsewhere (api/docs.py).

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
_CSP = b"content-security-policy"
_NO_STORE = (b"cache-control", b"no-store")
_CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-admin-key"})


class SecurityHeadersMiddleware:
    """Adds the headers above to `http.response.start` unless the route already set them."""

    def __init__(
        self, app: ASGIApp, docs_paths: frozenset[str] = frozenset(), docs_csp: str = ""
    ) -> None:
        self.app = app
        self.docs_paths = docs_paths
        self._docs = tuple(
            (name, docs_csp.encode()) if name == _CSP else (name, value)
            for name, value in _LOCKDOWN
            if name != _CSP or docs_csp
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = list(_ALWAYS)
        extra.extend(self._docs if scope["path"] in self.docs_paths else _LOCKDOWN)
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
