"""Per-user rate limit: a token bucket per user, in Redis so that every replica shares it.

A bucket holds at most `burst` tokens and refills at `per_minute / 60` tokens per second; a
request takes one token or is refused with the time until one is there. In Redis the whole
check-and-take is one Lua script (atomic, one round trip) on the hash
`rottenbot:ratelimit:<user_uid>`, timed by the Redis server's clock (replicas' clocks never
disagree) and expiring once the bucket would be full again. Without REDIS_HOST an in-process
bucket stands in: it holds per process only, which is logged at start.

When Redis cannot be asked, `acquire` raises RateLimitUnavailable; the API then follows the
revocation check's policy (AUTH_FAIL_OPEN: let the request through, logged; otherwise 503).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from rottenbot_inference.auth.redis_store import GuardedRedis, RedisUnreachable

if TYPE_CHECKING:
    from rottenbot_inference.settings import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "rottenbot:ratelimit:"

# KEYS[1]: the bucket (hash: tokens, ts in ms). ARGV: refill per ms, capacity, cost.
# Returns {allowed (0/1), tokens left (string: a float), ms until `cost` tokens, ms until full}.
TOKEN_BUCKET_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local saved = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(saved[1])
local ts = tonumber(saved[2])
if tokens == nil or ts == nil then
  tokens = capacity
  ts = now
end
if now > ts then
  tokens = math.min(capacity, tokens + (now - ts) * rate)
  ts = now
end
local allowed = 0
local wait_ms = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait_ms = math.ceil((cost - tokens) / rate)
end
local full_ms = math.ceil((capacity - tokens) / rate)
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
redis.call('PEXPIRE', KEYS[1], full_ms + 1000)
return {allowed, tostring(tokens), wait_ms, full_ms}
"""


class RateLimitUnavailable(Exception):
    """The shared bucket cannot be read right now (Redis outage or timeout)."""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int  # the bucket's size
    remaining: int  # whole tokens left after this request
    retry_after_s: int  # 0 when allowed; else seconds until a token is there (rounded up)
    reset_s: int  # seconds until the bucket is full again (rounded up)

    def headers(self) -> dict[str, str]:
        """RateLimit-* response headers (IETF httpapi draft), plus Retry-After when refused."""
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after_s)
        return headers


def _decision(allowed: bool, burst: int, tokens: float, wait_ms: float, full_ms: float) -> Decision:
    return Decision(
        allowed=allowed,
        limit=burst,
        remaining=max(0, math.floor(tokens + 1e-9)),
        retry_after_s=0 if allowed else max(1, math.ceil(wait_ms / 1000)),
        reset_s=max(0, math.ceil(full_ms / 1000)),
    )


class RateLimiter(Protocol):
    per_minute: float
    burst: int

    async def acquire(self, key: str) -> Decision:
        """Take one token from `key`'s bucket; may raise RateLimitUnavailable."""
        ...

    async def close(self) -> None: ...

    def describe(self) -> str: ...


class LocalRateLimiter:
    """Buckets in this process (no REDIS_HOST): each replica limits on its own."""

    def __init__(self, per_minute: float, burst: int, max_keys: int = 100_000) -> None:
        self.per_minute, self.burst = per_minute, burst
        self._rate_per_s = per_minute / 60
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, monotonic ts)
        self._max_keys = max_keys

    async def acquire(self, key: str) -> Decision:
        now = time.monotonic()
        tokens, ts = self._buckets.get(key, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - ts) * self._rate_per_s)
        allowed = tokens >= 1
        wait_s = 0.0
        if allowed:
            tokens -= 1
        else:
            wait_s = (1 - tokens) / self._rate_per_s
        if key not in self._buckets and len(self._buckets) >= self._max_keys:
            self._forget_full(now)
        self._buckets[key] = (tokens, now)
        full_s = (self.burst - tokens) / self._rate_per_s
        return _decision(allowed, self.burst, tokens, wait_s * 1000, full_s * 1000)

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled (they are the same as no bucket)."""
        rate, burst = self._rate_per_s, self.burst
        self._buckets = {
            key: (tokens, ts)
            for key, (tokens, ts) in self._buckets.items()
            if tokens + (now - ts) * rate < burst
        }

    async def close(self) -> None:
        return None

    def describe(self) -> str:
        return "in-process buckets (per replica)"


class RedisRateLimiter:
    """The token bucket as one Lua script in Redis db 0, through a GuardedRedis: like the
    revocation check, short timeouts, one immediate retry on a stale connection, then fail
    fast for `timeout_s` after a failure (RateLimitUnavailable)."""

    def __init__(
        self,
        per_minute: float,
        burst: int,
        host: str,
        port: int = 6379,
        password: str | None = None,
        timeout_s: float = 0.5,
        max_connections: int = 64,
    ) -> None:
        self.per_minute, self.burst = per_minute, burst
        self._redis = GuardedRedis(host, port, password, timeout_s, max_connections)
        self._script = self._redis.client.register_script(TOKEN_BUCKET_LUA)
        self._rate_per_ms = per_minute / 60_000

    def describe(self) -> str:
        return f"{self._redis.describe()} (shared by replicas)"

    async def acquire(self, key: str) -> Decision:
        args = [repr(self._rate_per_ms), self.burst, 1]
        try:
            reply = await self._redis.call(
                "rate limit check", lambda _: self._script(keys=[KEY_PREFIX + key], args=args)
            )
        except RedisUnreachable:
            raise RateLimitUnavailable("the rate limit store is unreachable") from None
        allowed, tokens, wait_ms, full_ms = reply
        return _decision(bool(int(allowed)), self.burst, float(tokens), float(wait_ms),
                         float(full_ms))

    async def close(self) -> None:
        await self._redis.close()


def build_rate_limiter(settings: Settings) -> RateLimiter | None:
    """The limiter RATE_LIMIT_PER_MINUTE asks for (None: no limit), its choice logged."""
    per_minute = settings.rate_limit_per_minute
    if per_minute is None:
        return None
    burst = settings.effective_rate_limit_burst
    limiter: RateLimiter
    if settings.redis_host:
        password = settings.redis_password.get_secret_value() if settings.redis_password else None
        limiter = RedisRateLimiter(
            per_minute, burst, settings.redis_host, settings.redis_port, password,
            settings.redis_timeout_s,
        )
    else:
        log.warning(
            "RATE_LIMIT_PER_MINUTE is set but REDIS_HOST is not: each process keeps its own "
            "buckets, so a user gets the limit once per replica"
        )
        limiter = LocalRateLimiter(per_minute, burst)
    log.info(
        "rate limit: %g requests/minute per user, bursts of %d, %s",
        per_minute, burst, limiter.describe(),
    )
    return limiter
