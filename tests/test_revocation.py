"""The revocation check (auth/blocklist.py) and the guarded Redis client it shares with the rate
limit (auth/redis_store.py), directly, without an app: a real password-protected redis-server,
stopped and hung (SIGSTOP) ones, the deadline, the fail-fast window, the rate-limited warning,
fail-open and the start-up choice. Fast: the mutation run (scripts/mutation.sh) uses these
tests for both modules.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest

from rottenbot_inference.auth import blocklist as blocklist_module
from rottenbot_inference.auth import redis_store
from rottenbot_inference.auth.blocklist import (
    REVOCATION_TTL_S,
    BlocklistUnavailable,
    FailOpenBlocklist,
    InMemoryBlocklist,
    RedisBlocklist,
    start_blocklist,
)
from rottenbot_inference.auth.redis_store import (
    GuardedRedis,
    RateLimitedLog,
    RedisUnreachable,
    reason,
    redis_client,
)
from rottenbot_inference.settings import Settings
from tests.helpers import free_port
from tests.servers import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (registers the `redis_server` fixture)
)

T = TypeVar("T")
STORE_LOG = "rottenbot_inference.auth.redis_store"
BLOCKLIST_LOG = "rottenbot_inference.auth.blocklist"


def run(coroutine: Awaitable[T]) -> T:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


class Clock:
    """Stands in for time.monotonic in redis_store and blocklist only (moved by hand; the
    event loop keeps the real clock)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    for module in (redis_store, blocklist_module):
        monkeypatch.setattr(module, "time", SimpleNamespace(monotonic=fake))
    return fake


def blocklist_for(server: RedisServer, **kwargs: Any) -> RedisBlocklist:
    return RedisBlocklist(server.host, server.port, server.password, **kwargs)


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


@pytest.fixture
def unreachable_port() -> Iterator[int]:
    yield free_port()  # nothing listens there: connection refused


# --- in-process blocklist ----------------------------------------------------------------------


def test_in_memory_blocklist_revokes_until_the_ttl() -> None:
    async def scenario() -> None:
        blocklist = InMemoryBlocklist()
        assert not await blocklist.is_revoked("a")
        await blocklist.revoke("a")
        assert await blocklist.is_revoked("a")
        assert not await blocklist.is_revoked("b")
        await blocklist.revoke("old", ttl_s=-1)  # already expired
        assert not await blocklist.is_revoked("old")
        assert "old" not in blocklist._expiry  # forgotten once seen expired
        assert await blocklist.close() is None
        assert blocklist.describe() == "in-process blocklist"

    run(scenario())


def test_in_memory_revocation_ends_exactly_at_its_ttl(clock: Clock) -> None:
    async def scenario() -> None:
        blocklist = InMemoryBlocklist(max_entries=2)
        await blocklist.revoke("a", ttl_s=10)
        clock.now += 9.5
        assert await blocklist.is_revoked("a")
        clock.now += 0.5  # exactly the TTL: over
        assert not await blocklist.is_revoked("a")
        await blocklist.revoke("b", ttl_s=5)
        await blocklist.revoke("c", ttl_s=100)
        clock.now += 5  # b's TTL is over now: dropped when the next entry finds the map full
        await blocklist.revoke("d")
        assert sorted(blocklist._expiry) == ["c", "d"]

    run(scenario())


def test_in_memory_blocklist_drops_expired_entries_when_full() -> None:
    async def scenario() -> None:
        assert InMemoryBlocklist()._max_entries == 100_000
        blocklist = InMemoryBlocklist(max_entries=2)
        await blocklist.revoke("expired", ttl_s=-1)
        await blocklist.revoke("live")
        await blocklist.revoke("new")  # full: the expired entry goes, the live ones stay
        assert sorted(blocklist._expiry) == ["live", "new"]
        assert await blocklist.is_revoked("live") and await blocklist.is_revoked("new")
        await blocklist.revoke("third")  # full of live entries: none is dropped
        assert sorted(blocklist._expiry) == ["live", "new", "third"]

    run(scenario())


def test_in_memory_ttl_is_the_auth_services() -> None:
    async def scenario() -> None:
        blocklist = InMemoryBlocklist()
        await blocklist.revoke("a")
        remaining = blocklist._expiry["a"] - time.monotonic()
        assert REVOCATION_TTL_S == 3600
        assert REVOCATION_TTL_S - 5 < remaining <= REVOCATION_TTL_S

    run(scenario())


# --- the Redis blocklist against a real server ----------------------------------------------


def test_redis_blocklist_reads_the_auth_services_revocations(redis_server: RedisServer) -> None:
    jti, other = str(uuid.uuid4()), str(uuid.uuid4())

    async def scenario() -> None:
        blocklist = blocklist_for(redis_server)
        try:
            assert blocklist.describe() == f"Redis at 127.0.0.1:{redis_server.port} db 0"
            assert await blocklist.ping() is True
            assert await blocklist.is_revoked(jti) is False
            redis_server.revoke(jti)  # SET <jti> "" EX 3600, as the auth service does
            assert await blocklist.is_revoked(jti) is True
            assert await blocklist.is_revoked(other) is False
            await blocklist.revoke(other, ttl_s=120)
            assert await blocklist.is_revoked(other) is True
        finally:
            await blocklist.close()

    run(scenario())
    with redis_server.client() as admin:
        assert admin.get(other) == b""
        assert 100 < admin.ttl(other) <= 120
        assert 3500 < admin.ttl(jti) <= 3600


def test_redis_blocklist_revoke_uses_the_auth_services_ttl(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        blocklist = blocklist_for(redis_server)
        try:
            await blocklist.revoke("jti-default")
        finally:
            await blocklist.close()

    run(scenario())
    with redis_server.client() as admin:
        assert REVOCATION_TTL_S - 100 < admin.ttl("jti-default") <= REVOCATION_TTL_S


def test_redis_blocklist_defaults_and_settings() -> None:
    blocklist = RedisBlocklist("127.0.0.1")
    guarded = blocklist._redis
    assert (guarded.port, guarded.timeout_s) == (6379, 0.5)
    assert guarded.client.connection_pool.max_connections == 64
    assert guarded.client.connection_pool.connection_kwargs["password"] is None
    run(blocklist.close())
    sized = RedisBlocklist("127.0.0.1", 6390, "pw", timeout_s=0.3, max_connections=5)
    pool = sized._redis.client.connection_pool
    assert pool.max_connections == 5
    assert (pool.connection_kwargs["password"], pool.connection_kwargs["socket_timeout"]) == (
        "pw", 0.3,
    )
    run(sized.close())


def test_unreachable_redis_fails_closed(
    unreachable_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        blocklist = RedisBlocklist("127.0.0.1", unreachable_port, None, timeout_s=0.2)
        try:
            unreachable = r"^the revocation store is unreachable$"
            with pytest.raises(BlocklistUnavailable, match=unreachable):
                await blocklist.is_revoked("a")
            with pytest.raises(BlocklistUnavailable, match=r"^cannot revoke: ConnectionError"):
                await blocklist.revoke("a")
            assert await blocklist.ping() is False
        finally:
            await blocklist.close()

    with caplog.at_level(logging.WARNING):
        run(scenario())
    logged = [r.getMessage() for r in caplog.records]
    where = f"Redis at 127.0.0.1:{unreachable_port} db 0"
    assert logged[0].startswith(f"revocation check failed: {where}: ConnectionError: ")
    assert re.fullmatch(rf"{re.escape(where)} is unreachable: ConnectionError: .+", logged[-1])


def test_revoke_and_ping_give_up_at_the_deadline(caplog: pytest.LogCaptureFixture) -> None:
    """Calls that neither answer nor fail (below the socket timeouts' reach) still end."""
    blocklist = RedisBlocklist("127.0.0.1", 6390, None, timeout_s=0.05)

    async def hang(*args: object, **kwargs: object) -> None:
        await asyncio.sleep(3600)

    blocklist._redis.client.set = hang  # type: ignore[method-assign]
    blocklist._redis.client.ping = hang  # type: ignore[method-assign]
    bound = 100 * blocklist._redis.deadline_s  # generous: only a hang reaches it

    async def scenario() -> None:
        with pytest.raises(BlocklistUnavailable, match=r"^cannot revoke: timed out$"):
            await asyncio.wait_for(blocklist.revoke("a"), bound)
        assert await asyncio.wait_for(blocklist.ping(), bound) is False

    with caplog.at_level(logging.WARNING, BLOCKLIST_LOG):
        run(scenario())
    assert [r.getMessage() for r in caplog.records] == [
        "Redis at 127.0.0.1:6390 db 0 is unreachable: timed out"
    ]
    run(blocklist.close())


def test_hung_redis_gives_up_at_its_deadline(redis_server: RedisServer) -> None:
    """SIGSTOP: connections are accepted, nothing answers. Every call ends (bounded here by a
    generous multiple of the deadline; only a hang reaches it) with the 'unavailable' error."""
    timeout_s = 0.2

    async def scenario() -> None:
        blocklist = blocklist_for(redis_server, timeout_s=timeout_s)
        bound = 20 * blocklist._redis.deadline_s
        try:
            assert await blocklist.is_revoked("a") is False  # a pooled connection
            redis_server.pause()
            try:
                with pytest.raises(BlocklistUnavailable):
                    await asyncio.wait_for(blocklist.is_revoked("a"), bound)
                with pytest.raises(BlocklistUnavailable, match=r"^cannot revoke: "):
                    await asyncio.wait_for(blocklist.revoke("a"), bound)
                assert await asyncio.wait_for(blocklist.ping(), bound) is False
            finally:
                redis_server.resume()
            await asyncio.sleep(timeout_s)  # past the fail-fast window
            assert await blocklist.is_revoked("a") is False  # recovered
        finally:
            await blocklist.close()

    run(scenario())


# --- fail-open ------------------------------------------------------------------------------


class DownBlocklist(InMemoryBlocklist):
    """An in-process blocklist whose store 'is unreachable' while `down`."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.closed = False

    async def is_revoked(self, jti: str) -> bool:
        if self.down:
            raise BlocklistUnavailable("down")
        return await super().is_revoked(jti)

    async def close(self) -> None:
        self.closed = True


def test_fail_open_passes_answers_through_and_lets_tokens_in_while_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inner = DownBlocklist()
    blocklist = FailOpenBlocklist(inner)

    async def scenario() -> None:
        await blocklist.revoke("a", ttl_s=60)
        assert inner._expiry["a"] - time.monotonic() <= 60  # the TTL is passed on
        assert await blocklist.is_revoked("a") is True  # up: revocations count
        assert await blocklist.is_revoked("b") is False
        inner.down = True
        for _ in range(3):
            assert await blocklist.is_revoked("a") is False  # down: accepted, unchecked
        await blocklist.close()

    with caplog.at_level(logging.WARNING, BLOCKLIST_LOG):
        run(scenario())
    assert inner._expiry["a"] > 0 and inner.closed
    warnings = [r for r in caplog.records if "WITHOUT checking" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert warnings[0].getMessage() == (
        "AUTH_FAIL_OPEN: the revocation store is unreachable; accepting a token WITHOUT "
        "checking whether it was revoked"
    )


# --- the start-up choice --------------------------------------------------------------------


def test_without_redis_host_the_in_process_blocklist_is_used(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, BLOCKLIST_LOG):
        plain = run(start_blocklist(settings()))
        assert isinstance(plain, InMemoryBlocklist)
        assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.WARNING, (
            "REDIS_HOST is not set: using an in-process token blocklist; revocations made by "
            "the auth service (logout) are NOT seen, so logged-out tokens stay valid until exp"
        ))]
        caplog.clear()
        opened = run(start_blocklist(settings(auth_fail_open=True)))
    assert isinstance(opened, InMemoryBlocklist)  # fail-open means nothing without Redis
    assert [(r.levelno, r.getMessage()) for r in caplog.records][1:] == [
        (logging.INFO, "AUTH_FAIL_OPEN has no effect without REDIS_HOST")
    ]


def test_with_redis_host_the_redis_blocklist_is_used(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        blocklist = await start_blocklist(settings(**redis_server.settings, redis_timeout_s=0.3))
        try:
            assert isinstance(blocklist, RedisBlocklist)
            assert blocklist._redis.timeout_s == 0.3
            redis_server.revoke("gone")
            assert await blocklist.is_revoked("gone") is True  # the password was passed
        finally:
            await blocklist.close()

    with caplog.at_level(logging.INFO, BLOCKLIST_LOG):
        run(scenario())
    assert [r.getMessage() for r in caplog.records] == [
        f"token revocation: Redis at 127.0.0.1:{redis_server.port} db 0"
    ]


def test_start_with_redis_down_warns_and_fails_closed_or_open(
    unreachable_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    down = {"redis_host": "127.0.0.1", "redis_port": unreachable_port, "redis_timeout_s": 0.2}
    with caplog.at_level(logging.INFO, BLOCKLIST_LOG):
        closed = run(start_blocklist(settings(**down)))
    assert isinstance(closed, RedisBlocklist)
    startup = [r for r in caplog.records if "unreachable at startup" in r.getMessage()]
    where = f"Redis at 127.0.0.1:{unreachable_port} db 0"
    assert len(startup) == 1 and startup[0].levelno == logging.WARNING
    assert startup[0].getMessage() == (
        f"token revocation: {where} is unreachable at startup; authenticated requests get 503 "
        "until it answers"
    )
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    caplog.clear()

    with caplog.at_level(logging.INFO, BLOCKLIST_LOG):
        opened = run(start_blocklist(settings(**down, auth_fail_open=True)))
    assert isinstance(opened, FailOpenBlocklist) and isinstance(opened.inner, RedisBlocklist)
    startup = [r for r in caplog.records if "unreachable at startup" in r.getMessage()]
    assert "authenticated requests get through UNCHECKED until it answers" in (
        startup[0].getMessage()
    )
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].getMessage() == (
        f"AUTH_FAIL_OPEN=true: whenever {where} is unreachable, tokens are accepted WITHOUT a "
        "revocation check (logged-out tokens keep working); use only if availability matters "
        "more than logout"
    )
    assert run(opened.is_revoked("a")) is False  # down: accepted


# --- redis_store: the guarded client ----------------------------------------------------------


def test_client_configuration() -> None:
    client = redis_client("127.0.0.1", 6390, "pw", 0.25, 7)
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == (
        "127.0.0.1", 6390, 0, "pw",
    )
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.25
    assert kwargs["health_check_interval"] == 30
    retry = kwargs["retry"]
    assert retry._retries == 1  # one retry on a stale pooled connection
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    assert isinstance(retry._backoff, NoBackoff)
    assert set(kwargs["retry_on_error"]) >= {RedisConnectionError, RedisTimeoutError, OSError}
    assert pool.max_connections == 7
    assert pool.timeout == 0.25  # waiting for a free pooled connection
    run(client.aclose(close_connection_pool=True))


def test_guarded_redis_defaults_and_deadline() -> None:
    guarded = GuardedRedis("127.0.0.1")
    assert (guarded.host, guarded.port, guarded.timeout_s) == ("127.0.0.1", 6379, 0.5)
    assert guarded.deadline_s == 1.5  # connect + one retry + reply
    assert guarded.client.connection_pool.max_connections == 64
    assert guarded.describe() == "Redis at 127.0.0.1:6379 db 0"
    run(guarded.close())
    sized = GuardedRedis("127.0.0.2", 6390, "pw", timeout_s=0.3, max_connections=5)
    kwargs = sized.client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["password"], kwargs["socket_timeout"]) == (
        "127.0.0.2", 6390, "pw", 0.3,
    )
    assert sized.client.connection_pool.max_connections == 5
    assert sized.deadline_s == pytest.approx(0.9)
    run(sized.close())


def test_guarded_call_returns_the_answer_and_fails_fast_after_a_failure(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    guarded = GuardedRedis("127.0.0.1", 6390, timeout_s=0.5)
    calls: list[str] = []

    def operation(outcome: str) -> Callable[[Any], Awaitable[str]]:
        async def call(client: Any) -> str:
            assert client is guarded.client
            calls.append(outcome)
            if outcome == "fail":
                raise ConnectionError("refused")
            return outcome

        return call

    async def scenario() -> None:
        assert await guarded.call("check", operation("ok")) == "ok"
        with pytest.raises(RedisUnreachable, match=r"^check$"):
            await guarded.call("check", operation("fail"))
        failed_at = clock.now
        clock.now = failed_at + 0.49  # within REDIS_TIMEOUT_S of the failure: fails fast, no call
        with pytest.raises(RedisUnreachable, match=r"^check$"):
            await guarded.call("check", operation("skipped"))
        clock.now = failed_at + 0.5  # exactly REDIS_TIMEOUT_S after it: Redis is asked again
        assert await guarded.call("check", operation("ok")) == "ok"

    with caplog.at_level(logging.WARNING, STORE_LOG):
        run(scenario())
    assert calls == ["ok", "fail", "ok"]
    assert [r.getMessage() for r in caplog.records] == [
        "check failed: Redis at 127.0.0.1:6390 db 0: ConnectionError: refused"
    ]
    run(guarded.close())


def test_guarded_call_gives_up_at_the_deadline() -> None:
    guarded = GuardedRedis("127.0.0.1", 6390, timeout_s=0.05)

    async def hang(client: Any) -> None:
        await asyncio.sleep(3600)

    async def scenario() -> None:
        with pytest.raises(RedisUnreachable):
            # A generous bound: only a call that ignores its deadline (0.15 s) reaches it.
            await asyncio.wait_for(guarded.call("check", hang), 100 * guarded.deadline_s)

    run(scenario())
    run(guarded.close())


def test_close_closes_the_pooled_connections(redis_server: RedisServer) -> None:
    def connections() -> int:
        with redis_server.client() as admin:
            return sum(1 for c in admin.client_list() if c.get("cmd") not in ("client|list",))

    before = connections()

    async def scenario() -> None:
        guarded = GuardedRedis(redis_server.host, redis_server.port, redis_server.password)
        assert await guarded.call("ping", lambda r: r.ping()) is True
        assert connections() == before + 1
        await guarded.close()

    run(scenario())
    assert connections() == before


def test_reason_names_the_failure_without_credentials() -> None:
    assert reason(TimeoutError()) == "timed out"
    assert reason(TimeoutError("x")) == "timed out"
    assert reason(ConnectionError("refused")) == "ConnectionError: refused"
    assert reason(OSError()) == "OSError"


def test_rate_limited_log_holds_back_repeats_and_counts_them(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("tests.ratelimited")
    warn = RateLimitedLog(logger, logging.WARNING)
    error = RateLimitedLog(logger, logging.ERROR, interval_s=1.0)
    with caplog.at_level(logging.INFO, "tests.ratelimited"):
        warn("first %s", 1)
        clock.now += 9.99
        warn("held back")
        warn("held back")
        clock.now += 0.01  # 10 s after the first: logged, with the count
        warn("again %s", 2)
        warn("held back")
        error("e")
        clock.now += 1.0
        error("e2")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "first 1"),
        (logging.WARNING, "again 2 (2 similar messages suppressed)"),
        (logging.ERROR, "e"),
        (logging.ERROR, "e2"),
    ]
