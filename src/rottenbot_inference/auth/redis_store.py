"""The Redis connection the auth checks share: revocation (`blocklist.py`) and rate limit.

One pooled client with short timeouts. Every call is bounded by a deadline; a connection
problem is retried once at once (a pooled connection may be stale after a Redis restart), then
the call fails with `RedisUnreachable`, and for `timeout_s` after a failure further calls fail
fast instead of each waiting on a dead server. Failures are logged at most every 10 s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

T = TypeVar("T")


class RedisUnreachable(Exception):
    """Redis could not be asked right now (outage, timeout, or failing fast after one)."""


class RateLimitedLog:
    """Logs at most one message per `interval_s`, counting the ones it held back."""

    def __init__(self, logger: logging.Logger, level: int, interval_s: float = 10.0) -> None:
        self._logger, self._level, self._interval = logger, level, interval_s
        self._last = float("-inf")
        self._suppressed = 0

    def __call__(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            self._suppressed += 1
            return
        if self._suppressed:
            message += f" ({self._suppressed} similar messages suppressed)"
        self._last, self._suppressed = now, 0
        self._logger.log(self._level, message, *args)


def reason(exc: BaseException) -> str:
    """A short description of a failed Redis call for the logs (never a credential)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def redis_client(
    host: str, port: int, password: str | None, timeout_s: float, max_connections: int
) -> Redis:
    """An async client on db 0 with one bounded pool and short timeouts."""
    from redis.asyncio import BlockingConnectionPool, Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    pool = BlockingConnectionPool(
        host=host,
        port=port,
        db=0,
        password=password,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, OSError],
        max_connections=max_connections,
        timeout=timeout_s,  # waiting for a free pooled connection
        health_check_interval=30,
    )
    return Redis(connection_pool=pool)


class GuardedRedis:
    """A pooled client whose calls are bounded and fail fast after a failure (module doc)."""

    def __init__(
        self,
        host: str,
        port: int = 6379,
        password: str | None = None,
        timeout_s: float = 0.5,
        max_connections: int = 64,
    ) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.client = redis_client(host, port, password, timeout_s, max_connections)
        self.deadline_s = 3 * timeout_s  # connect + one retry + reply, whatever happens
        self._failing_until = float("-inf")
        self._warn = RateLimitedLog(log, logging.WARNING)

    def describe(self) -> str:
        return f"Redis at {self.host}:{self.port} db 0"

    async def call(self, what: str, operation: Callable[[Redis], Awaitable[T]]) -> T:
        """`operation(client)` within the deadline; RedisUnreachable if it cannot be done."""
        if time.monotonic() < self._failing_until:
            raise RedisUnreachable(what)
        try:
            async with asyncio.timeout(self.deadline_s):
                return await operation(self.client)
        except Exception as exc:  # RedisError, OSError, TimeoutError, ...
            self._failing_until = time.monotonic() + self.timeout_s
            self._warn("%s failed: %s: %s", what, self.describe(), reason(exc))
            raise RedisUnreachable(what) from None

    async def close(self) -> None:
        """Close the client and every pooled connection (shutdown)."""
        await self.client.aclose(close_connection_pool=True)
