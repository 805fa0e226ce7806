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

from rottenbot_inference.auth.redis_store import (
    GuardedRedis,
    RateLimitedLog,
    RedisUnreachable,
    reason,
)

if TYPE_CHECKING:
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


class RedisBlocklist:
    """`EXISTS <jti>` in Redis db 0 through a GuardedRedis (short timeouts, one retry on a stale
    connection, then BlocklistUnavailable; failing fast for a moment after a failure)."""

    def __init__(
        self,
        host: str,
        port: int = 6379,
        password: str | None = None,
        timeout_s: float = 0.5,
        max_connections: int = 64,
    ) -> None:
        self._redis = GuardedRedis(host, port, password, timeout_s, max_connections)

    def describe(self) -> str:
        return self._redis.describe()

    async def is_revoked(self, jti: str) -> bool:
        try:
            return bool(await self._redis.call("revocation check", lambda r: r.exists(jti)))
        except RedisUnreachable:
            raise BlocklistUnavailable("the revocation store is unreachable") from None

    async def revoke(self, jti: str, ttl_s: int = REVOCATION_TTL_S) -> None:
        """As the auth service does at logout."""
        try:
            async with asyncio.timeout(self._redis.deadline_s):
                await self._redis.client.set(jti, "", ex=ttl_s)
        except Exception as exc:
            raise BlocklistUnavailable(f"cannot revoke: {reason(exc)}") from None

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self._redis.deadline_s):
                return bool(await self._redis.client.ping())
        except Exception as exc:
            log.warning("%s is unreachable: %s", self.describe(), reason(exc))
            return False

    async def close(self) -> None:
        """Close the client and every pooled connection (shutdown)."""
        await self._redis.close()


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
