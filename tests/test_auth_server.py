"""Authentication end to end: `rottenbot-inference serve` on loopback with a real redis-server."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx

from tests.helpers import jpeg_bytes, process_env, random_photo, running_server, token
from tests.servers import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (registers the `redis_server` fixture)
)
from tests.test_auth import assert_401, auth_service_token, bearer, utc_clock, wait_for

PREDICT = "/api/v1/inference/predict"
__all__ = ["utc_clock"]  # a fixture, used by name


def test_served_api_with_redis_revocation_and_outage(
    redis_server: RedisServer,
    tiny_model: Path,
    shared_cache: Path,
    tmp_path: Path,
    utc_clock: None,
) -> None:
    env = {
        **process_env(tiny_model, shared_cache, tmp_path / "data"),
        "MAX_BATCH_SIZE": "4",
        "LOG_LEVEL": "debug",
        **redis_server.env,
    }
    user = uuid.uuid4()
    access, jti = auth_service_token(user)
    other, _ = auth_service_token(user)
    refused = [token(ttl_s=-600), token(refresh=True), token(secret="z" * 40)]
    photo = jpeg_bytes(random_photo(240, 320))
    log_path = tmp_path / "server.log"

    def predict(client: httpx.Client, credential: str) -> httpx.Response:
        return client.post(
            f"{PREDICT}?save_prediction=False&user_uid={user}",
            files={"file": ("photo.jpg", photo, "image/jpeg")},
            headers=bearer(credential),
        )

    with running_server(env, log_path) as base_url, httpx.Client(
        base_url=base_url, timeout=30
    ) as client:
        assert predict(client, access).status_code == 200
        for credential in refused:
            assert_401(predict(client, credential), credential)
        assert_401(client.post(PREDICT, files={"file": ("a.jpg", photo, "image/jpeg")}))

        redis_server.revoke(jti)  # logout at the auth service
        assert_401(predict(client, access), access)
        assert predict(client, other).status_code == 200

        redis_server.stop()
        response = predict(client, other)
        assert response.status_code == 503, response.text
        assert int(response.headers["retry-after"]) >= 1
        assert "revocation" in response.json()["detail"]

        redis_server.start()  # same port; the server's pooled client reconnects
        wait_for(lambda: predict(client, other).status_code == 200)

        # Hung, not stopped (SIGSTOP): connections are accepted, nothing answers. The client's
        # 30 s timeout is the generous bound (60x REDIS_TIMEOUT_S, 0.5 s by default).
        redis_server.pause()
        try:
            response = predict(client, other)
        finally:
            redis_server.resume()
        assert response.status_code == 503, response.text
        assert int(response.headers["retry-after"]) >= 1
        assert "revocation" in response.json()["detail"]
        wait_for(lambda: predict(client, other).status_code == 200)
        redis_server.revoke(jti)  # still enforced after the hang
        assert_401(predict(client, access), access)

    logged = log_path.read_text(errors="replace")
    assert "revocation check failed" in logged
    for credential in [access, other, *refused]:
        for part in credential.split("."):
            assert part not in logged, "a token appeared in the server log"
