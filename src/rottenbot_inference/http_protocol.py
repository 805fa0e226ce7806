"""uvicorn's httptools protocol plus the one timeout it lacks: slow request headers.

uvicorn times out idle kept-alive connections (`timeout_keep_alive`) but nothing else: a
client may open a connection and send nothing, or send its request line and headers a byte
at a time, and hold the connection (and, with `limit_concurrency`, a slot) for as long as it
likes - the classic slow-loris attack. Request *bodies* are timed in the ASGI layer
(api/limits.py); headers are read before the app is called, so they are timed here:

- a new connection that sends nothing is closed after `timeout_keep_alive`, as an idle
  kept-alive connection is;
- once a request's first byte has arrived, its headers must be complete within
  `header_timeout_s`, or the server answers `408 Request Timeout` and closes the connection.

The subclass only adds a timer around httptools' parser callbacks; parsing is unchanged.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_TIMEOUT_BODY = b"The request headers came too slowly.\n"
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\n"
    b"connection: close\r\n"
    b"\r\n%s"
) % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with a deadline on receiving each request's headers."""

    def __init__(self, *args: Any, header_timeout_s: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.timeout_keep_alive)  # nothing sent yet: idle, as between requests

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(self.header_timeout_s)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, delay: float) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(delay, self._headers_too_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        idle = self.cycle is None or self.cycle.response_complete
        if idle:  # never write into a response still being sent (pipelining)
            self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()
