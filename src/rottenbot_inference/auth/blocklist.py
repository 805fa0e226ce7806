"""Token revocation: a token whose `jti` is in the blocklist is refused.

The RottenBot auth service revokes a token at logout with `SET <jti> "" EX 3600` in Redis db 0;
`RedisBlocklist` reads exactly that (`EXISTS <jti>`). Without `REDIS_HOST` an in-process
blocklist stands in (and cannot see the auth service's revocations). When Redis cannot be
asked, `is_revoked` raises BlocklistUnavailable: the API answers 503 (fail closed) unless
`AUTH_FAIL_OPEN` wraps the blocklist in `FailOpenBlocklist`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from rottenbot_inference.settings import Settings

log = logging.getLogger(__name__)

REVOCATION_TTL_S = 3600  # what the auth service uses; a revoked access token expires by then


class BlocklistUnavailable(Exception):
    """The revocation store cannot be asked right now (outage or timeout)."""


@runtime_checkable
class Blocklist(Protocol):
    async def is_revoked(self, jti: str) -> bool:
        """True if the token with this `jti` was revoked; may raise BlocklistUnavailable."""
        ...

    async def revoke(self, jti: str, ttl_s: int = REVOCATION_TTL_S) -> None: ...

    async def close(self) -> None: ...


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


class InMemoryBlocklist:
    """Revocations made in this process only (development and tests)."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._expiry: dict[str, float] = {}
        self._max_entries = max_entries

    async def is_revoked(self, jti: str) -> bool:
        expiry = self._expiry.get(jti)
        if expiry is None:
            return False
        if expiry <= time.monotonic():
            self._expiry.pop(jti, None)
            return False
        return True

    async def revoke(self, jti: str, ttl_s: int = REVOCATION_TTL_S) -> None:
        now = time.monotonic()
        if len(self._expiry) >= self._max_entries:
            self._expiry = {key: exp for key, exp in self._expiry.items() if exp > now}
        self._expiry[jti] = now + ttl_s

    async def close(self) -> None:
        return None

    def describe(self) -> str:
        return "in-process blocklist"


def redis_client(
    host: str, port: int, password: str | None, timeout_s: float, max_connections: int
) -> Redis:
    """An async client on db 0 with one bounded pool and short timeouts: a connection problem
    is retried once at once (a pooled connection may be stale after a Redis restart), never
    waited out. Shared by the revocation check and the rate limiter."""
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


class RedisBlocklist:
    """`EXISTS <jti>` in Redis db 0, through one pooled client with short timeouts.

    Connection problems are retried once at once (a pooled connection may be stale after a
    Redis restart); then the check fails with BlocklistUnavailable, and for `timeout_s` after a
    failure further checks fail fast instead of each waiting on a dead server.
    """

    def __init__(
        self,
        host: str,
        port: int = 6379,
        password: str | None = None,
        timeout_s: float = 0.5,
        max_connections: int = 64,
    ) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._client = redis_client(host, port, password, timeout_s, max_connections)
        self._deadline_s = 3 * timeout_s  # connect + one retry + reply, whatever happens
        self._failing_until = float("-inf")
        self._warn = RateLimitedLog(log, logging.WARNING)

    def describe(self) -> str:
        return f"Redis at {self.host}:{self.port} db 0"

    async def is_revoked(self, jti: str) -> bool:
        if time.monotonic() < self._failing_until:
            raise BlocklistUnavailable("the revocation store is unreachable")
        try:
            async with asyncio.timeout(self._deadline_s):
                return bool(await self._client.exists(jti))
        except Exception as exc:  # RedisError, OSError, TimeoutError, ...
            self._failing_until = time.monotonic() + self.timeout_s
            self._warn("revocation check failed: %s: %s", self.describe(), _reason(exc))
            raise BlocklistUnavailable("the revocation store is unreachable") from None

    async def revoke(self, jti: str, ttl_s: int = REVOCATION_TTL_S) -> None:
        """As the auth service does at logout."""
        try:
            async with asyncio.timeout(self._deadline_s):
                await self._client.set(jti, "", ex=ttl_s)
        except Exception as exc:
            raise BlocklistUnavailable(f"cannot revoke: {_reason(exc)}") from None

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self._deadline_s):
                return bool(await self._client.ping())
        except Exception as exc:
            log.warning("%s is unreachable: %s", self.describe(), _reason(exc))
            return False

    async def close(self) -> None:
        """Close the client and every pooled connection (shutdown)."""
        await self._client.aclose(close_connection_pool=True)


class FailOpenBlocklist:
    """AUTH_FAIL_OPEN: while the store is unreachable, tokens count as not revoked (logged)."""

    def __init__(self, inner: Blocklist) -> None:
        self.inner = inner
        self._warn = RateLimitedLog(log, logging.WARNING)

    async def is_revoked(self, jti: str) -> bool:
        try:
            return await self.inner.is_revoked(jti)
        except BlocklistUnavailable:
            self._warn(
                "AUTH_FAIL_OPEN: the revocation store is unreachable; accepting a token "
                "WITHOUT checking whether it was revoked"
            )
            return False

    async def revoke(self, jti: str, ttl_s: int = REVOCATION_TTL_S) -> None:
        await self.inner.revoke(jti, ttl_s)

    async def close(self) -> None:
        await self.inner.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def start_blocklist(settings: Settings) -> Blocklist:
    """The blocklist the settings describe, checked once and its choice logged."""
    if not settings.redis_host:
        log.warning(
            "REDIS_HOST is not set: using an in-process token blocklist; revocations made by "
            "the auth service (logout) are NOT seen, so logged-out tokens stay valid until exp"
        )
        if settings.auth_fail_open:
            log.info("AUTH_FAIL_OPEN has no effect without REDIS_HOST")
        return InMemoryBlocklist()
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    redis = RedisBlocklist(
        settings.redis_host, settings.redis_port, password, settings.redis_timeout_s
    )
    if await redis.ping():
        log.info("token revocation: %s", redis.describe())
    else:
        log.warning(
            "token revocation: %s is unreachable at startup; authenticated requests get %s "
            "until it answers",
            redis.describe(),
            "through UNCHECKED" if settings.auth_fail_open else "503",
        )
    if settings.auth_fail_open:
        log.error(
            "AUTH_FAIL_OPEN=true: whenever %s is unreachable, tokens are accepted WITHOUT a "
            "revocation check (logged-out tokens keep working); use only if availability "
            "matters more than logout",
            redis.describe(),
        )
        return FailOpenBlocklist(redis)
    return redis
