"""Per-user rate limit: the Redis token bucket (a real redis-server), shared by two app
instances, its headers, the policy while Redis is down, and the in-process fallback."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rottenbot_inference.app import create_app
from rottenbot_inference.auth.ratelimit import (
    KEY_PREFIX,
    LocalRateLimiter,
    RateLimitUnavailable,
    RedisRateLimiter,
)
from rottenbot_inference.settings import Settings
from tests.helpers import TEST_SECRET, auth, free_port, jpeg_bytes, random_photo, wait_ready
from tests.servers import RedisServer, redis_server_fixture  # noqa: F401  (fixture)
from tests.servers_mlflow import metric_value
from tests.servers_storage import poll

PREDICT = "/api/v1/inference/predict"
IMAGE = jpeg_bytes(random_photo(120, 160))


def predict(client: TestClient, user: uuid.UUID):
    return client.post(
        f"{PREDICT}?save_prediction=False", headers=auth(user),
        files={"file": ("a.jpg", IMAGE, "image/jpeg")},
    )


@pytest.fixture
def app_client(tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """In-process apps on the bundled demo model (no conversion needed), stopped at the end."""
    clients: list[TestClient] = []

    def make(**overrides: object) -> TestClient:
        values: dict[str, object] = {
            "data_dir": tmp_path / f"data{len(clients)}",
            "jwt_secret": TEST_SECRET,
            "model_poll_interval_s": 0,
            **overrides,
        }
        settings = Settings(_env_file=None, **values)  # type: ignore[arg-type]
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        wait_ready("", client=client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def limiter_for(redis: RedisServer, per_minute: float, burst: int) -> RedisRateLimiter:
    return RedisRateLimiter(per_minute, burst, redis.host, redis.port, redis.password, 2.0)


# --- the Lua bucket against a real Redis -----------------------------------------------------


def test_redis_bucket_takes_refuses_and_refills(redis_server: RedisServer) -> None:
    # A token a minute: the test's own run time (seconds, even on a loaded machine) refills
    # next to nothing, so every count below holds with a margin of a whole token period.
    per_minute, burst = 1, 3
    period_s = 60 / per_minute

    async def scenario() -> None:
        limiter = limiter_for(redis_server, per_minute=per_minute, burst=burst)
        try:
            taken = [await limiter.acquire("alice") for _ in range(burst)]
            assert [d.allowed for d in taken] == [True, True, True]
            assert [d.remaining for d in taken] == [2, 1, 0]
            refused = await limiter.acquire("alice")
            assert not refused.allowed and refused.remaining == 0
            assert 1 <= refused.retry_after_s <= period_s
            assert refused.retry_after_s > period_s / 2  # a token is most of a period away
            assert refused.headers()["Retry-After"] == str(refused.retry_after_s)
            # Three tokens to refill at a period each (less what the test's run time refilled).
            assert (burst - 1) * period_s < refused.reset_s <= burst * period_s
            assert (await limiter.acquire("bob")).allowed  # buckets are per user

            # Refill without waiting: move the bucket's last update 2.5 periods into the past.
            with redis_server.client() as client:
                key = KEY_PREFIX + "alice"
                ts = int(client.hget(key, "ts"))
                client.hset(key, "ts", str(ts - int(2.5 * period_s * 1000)))
                # It expires once it would be full again (plus a second).
                assert 0 < client.pttl(key) <= (burst * period_s + 1) * 1000
            refilled = [await limiter.acquire("alice") for _ in range(3)]
            assert [d.allowed for d in refilled] == [True, True, False]  # 2.5 tokens back
        finally:
            await limiter.close()

    asyncio.run(scenario())


def test_redis_unreachable_raises_unavailable() -> None:
    async def scenario() -> None:
        limiter = RedisRateLimiter(60, 5, "127.0.0.1", free_port(), None, 0.2)
        try:
            with pytest.raises(RateLimitUnavailable):
                await limiter.acquire("alice")
            with pytest.raises(RateLimitUnavailable):  # and fails fast right after
                await limiter.acquire("alice")
        finally:
            await limiter.close()

    asyncio.run(scenario())


def test_local_bucket_without_redis() -> None:
    async def scenario() -> None:
        limiter = LocalRateLimiter(per_minute=60, burst=2)
        assert [(await limiter.acquire("a")).allowed for _ in range(3)] == [True, True, False]
        assert (await limiter.acquire("b")).allowed

    asyncio.run(scenario())


# --- through the API ---------------------------------------------------------------------------


def test_two_replicas_share_one_bucket_per_user(
    redis_server: RedisServer, app_client: Callable[..., TestClient]
) -> None:
    # A token every 10 minutes: five requests never see a refill, however slow the machine.
    per_minute = 0.1
    limits = {"rate_limit_per_minute": per_minute, "rate_limit_burst": 3, **redis_server.settings}
    first, second = app_client(**limits), app_client(**limits)
    user = uuid.uuid4()
    answers = [predict(client, user) for client in (first, second, first, second, first)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429, 429]
    assert [r.headers["RateLimit-Remaining"] for r in answers[:3]] == ["2", "1", "0"]
    assert all(r.headers["RateLimit-Limit"] == "3" for r in answers)
    refused = answers[3]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60 / per_minute
    assert refused.json()["detail"].startswith("Too many requests")
    assert predict(second, uuid.uuid4()).status_code == 200  # another user has its own bucket


def test_limit_is_off_by_default(app_client: Callable[..., TestClient]) -> None:
    client = app_client()
    response = predict(client, uuid.uuid4())
    assert response.status_code == 200
    assert "RateLimit-Limit" not in response.headers


def test_without_redis_each_process_limits_alone(
    app_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        client = app_client(rate_limit_per_minute=2)  # burst defaults to the minute's rate
    assert "each process keeps its own buckets" in caplog.text
    user = uuid.uuid4()
    assert [predict(client, user).status_code for _ in range(3)] == [200, 200, 429]


def test_redis_down_is_503_unless_auth_fails_open(
    redis_server: RedisServer, app_client: Callable[..., TestClient]
) -> None:
    limits = {"rate_limit_per_minute": 60, **redis_server.settings}
    closed = app_client(**limits)
    open_ = app_client(auth_fail_open=True, **limits)
    user = uuid.uuid4()
    assert predict(closed, user).status_code == 200
    redis_server.stop()
    try:
        refused = predict(closed, user)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        through = predict(open_, user)  # revocation and rate limit both fail open (logged)
        assert through.status_code == 200 and "RateLimit-Limit" not in through.headers
    finally:
        redis_server.start()
    # Recovers by itself (after the short fail-fast window that follows a failure).
    poll(lambda: predict(closed, user).status_code == 200, 30, "no recovery after Redis came back")


def test_rate_limit_store_down_alone_is_503_with_its_reason(
    app_client: Callable[..., TestClient],
) -> None:
    """The revocation store is in-process here, so the 503 is the rate limiter's own."""
    client = app_client(rate_limit_per_minute=60)
    state = client.app.state.rottenbot  # type: ignore[attr-defined]
    state.rate_limiter = RedisRateLimiter(60, 60, "127.0.0.1", free_port(), None, 0.2)
    before = metric_value(
        client.get("/metrics").text, "inference_rejected_requests_total",
        reason="rate_limit_unavailable",
    ) or 0
    response = predict(client, uuid.uuid4())
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert "rate limit" in response.json()["detail"]
    after = metric_value(
        client.get("/metrics").text, "inference_rejected_requests_total",
        reason="rate_limit_unavailable",
    )
    assert after == before + 1
