"""Authentication through the API, in-process, against a real password-protected redis-server.

Every token failure must be a 401 with `WWW-Authenticate: Bearer` whose body never echoes the
token; revocation (the auth service's `SET <jti> "" EX 3600`) applies on the next request; an
unreachable Redis is a 503 with Retry-After (fail closed) unless AUTH_FAIL_OPEN.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import jwt
import pytest
from fastapi.testclient import TestClient

from rottenbot_inference.api.deps import UNAVAILABLE_REVOCATION
from rottenbot_inference.auth.blocklist import (
    FailOpenBlocklist,
    InMemoryBlocklist,
    RedisBlocklist,
)
from tests.helpers import TEST_SECRET, jpeg_bytes, random_photo, token
from tests.servers import (
    RedisServer,
    redis_server_fixture,  # noqa: F401  (registers the `redis_server` fixture)
)

PREDICT = "/api/v1/inference/predict"
MODEL = "/api/v1/inference/model"  # authenticated, cheap: used where the endpoint is immaterial


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(header: dict, payload: object, secret: str | bytes = TEST_SECRET,
           digest=hashlib.sha256) -> str:
    """A JWT assembled by hand (any header, any payload), HMAC-signed with `secret`."""
    key = secret.encode() if isinstance(secret, str) else secret
    head = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    return head + "." + b64(hmac.new(key, head.encode(), digest).digest())


def auth_service_token(
    user_uid: uuid.UUID | None = None,
    secret: str = TEST_SECRET,
    expiry: timedelta | None = None,
    refresh: bool = False,
) -> tuple[str, str]:
    """(token, jti) minted the way the RottenBot auth service does it: PyJWT, a naive
    `datetime.now()`-based `exp` (PyJWT reads naive datetimes as UTC), a uuid4 `jti`."""
    jti = str(uuid.uuid4())
    payload = {
        "user": {"email": "ada@example.com", "user_uid": str(user_uid or uuid.uuid4())},
        "exp": datetime.now() + (expiry if expiry is not None else timedelta(seconds=3600)),
        "jti": jti,
        "refresh": refresh,
    }
    return jwt.encode(payload=payload, key=secret, algorithm="HS256"), jti


def claims(**changes: object) -> dict:
    """Valid access-token claims with some changed (a value of ... removes the claim)."""
    payload: dict = {
        "user": {"user_uid": str(uuid.uuid4())},
        "exp": int(time.time()) + 3600,
        "jti": str(uuid.uuid4()),
        "refresh": False,
    }
    for name, value in changes.items():
        if value is ...:
            payload.pop(name, None)
        else:
            payload[name] = value
    return payload


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def assert_401(response, token_text: str | None = None) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    detail = response.json()["detail"]
    assert isinstance(detail, str) and 0 < len(detail) < 100
    if token_text:
        assert token_text not in response.text
        for part in token_text.split("."):
            if len(part) >= 8:
                assert part not in response.text


def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Poll until `condition()` (a wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise TimeoutError("condition not met in time")


@pytest.fixture
def utc_clock() -> Iterator[None]:
    """The auth service's naive `datetime.now()` is only right if its clock is UTC (as in its
    containers): pin TZ so this test means the same on any machine."""
    previous = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if previous is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = previous
    time.tzset()


@pytest.fixture
def redis_client(make_client, redis_server: RedisServer) -> TestClient:
    return make_client(**redis_server.settings)


@pytest.fixture(scope="module")
def photo() -> bytes:
    return jpeg_bytes(random_photo(240, 320))


# --- every failure is a 401 -----------------------------------------------------------------

BAD_TOKENS: dict[str, Callable[[], dict[str, str]]] = {
    "missing-header": lambda: {},
    "empty-header": lambda: {"Authorization": ""},
    "basic-scheme": lambda: {"Authorization": "Basic dXNlcjpwYXNz"},
    "token-without-scheme": lambda: {"Authorization": token()},
    "empty-bearer": lambda: {"Authorization": "Bearer "},
    "malformed": lambda: bearer("not-a-jwt"),
    "two-segments": lambda: bearer(".".join(token().split(".")[:2])),
    "garbage-segments": lambda: bearer("a.b.c"),
    "oversized": lambda: bearer(token() + "A" * 10_000),
    "wrong-secret": lambda: bearer(token(secret="another-secret-" + "y" * 32)),
    "tampered-payload": lambda: bearer(
        signed({"alg": "HS256", "typ": "JWT"}, claims()).rsplit(".", 1)[0]
        + "."
        + token().rsplit(".", 1)[1]
    ),
    "alg-none": lambda: bearer(
        b64(b'{"alg":"none","typ":"JWT"}') + "." + b64(json.dumps(claims()).encode()) + "."
    ),
    "alg-hs512-right-secret": lambda: bearer(
        signed({"alg": "HS512", "typ": "JWT"}, claims(), digest=hashlib.sha512)
    ),
    "expired": lambda: bearer(token(ttl_s=-600)),
    "expired-beyond-leeway": lambda: bearer(
        signed({"alg": "HS256"}, claims(exp=int(time.time()) - 60))
    ),
    "not-yet-valid": lambda: bearer(signed({"alg": "HS256"}, claims(nbf=int(time.time()) + 600))),
    "exp-not-a-number": lambda: bearer(signed({"alg": "HS256"}, claims(exp="tomorrow"))),
    "missing-exp": lambda: bearer(signed({"alg": "HS256"}, claims(exp=...))),
    "missing-jti": lambda: bearer(signed({"alg": "HS256"}, claims(jti=...))),
    "jti-not-a-string": lambda: bearer(signed({"alg": "HS256"}, claims(jti=12345))),
    "missing-user": lambda: bearer(signed({"alg": "HS256"}, claims(user=...))),
    "user-not-an-object": lambda: bearer(signed({"alg": "HS256"}, claims(user="ada"))),
    "user-uid-not-a-uuid": lambda: bearer(
        signed({"alg": "HS256"}, claims(user={"user_uid": "42"}))
    ),
    "refresh-token": lambda: bearer(token(refresh=True)),
    "refresh-not-false": lambda: bearer(signed({"alg": "HS256"}, claims(refresh="no"))),
    "payload-not-an-object": lambda: bearer(signed({"alg": "HS256"}, ["not", "an", "object"])),
}


def test_every_failure_is_a_401_that_does_not_echo_the_token(
    redis_client: TestClient, photo: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sent: list[str] = []
    for name, make_headers in BAD_TOKENS.items():
        headers = make_headers()
        credential = headers.get("Authorization", "").removeprefix("Bearer ").strip()
        sent.append(credential)
        for response in (
            redis_client.get(MODEL, headers=headers),
            redis_client.post(
                PREDICT, files={"file": ("a.jpg", photo, "image/jpeg")}, headers=headers
            ),
        ):
            try:
                assert_401(response, credential)
            except AssertionError as exc:
                raise AssertionError(f"{name}: {exc}") from exc
    logged = caplog.text
    for credential in sent:
        for part in credential.split("."):
            if len(part) >= 8:
                assert part not in logged, "a token appeared in the logs"


def test_messages_name_the_problem(client: TestClient) -> None:
    def detail(headers: dict[str, str]) -> str:
        response = client.get(MODEL, headers=headers)
        assert_401(response)
        return response.json()["detail"]

    assert detail({}) == "Not authenticated"
    assert "Bearer" in detail({"Authorization": "Basic dXNlcjpwYXNz"})
    assert "expired" in detail(bearer(token(ttl_s=-600)))
    assert "signature" in detail(bearer(token(secret="x" * 40)))
    assert "'jti'" in detail(bearer(signed({"alg": "HS256"}, claims(jti=...))))
    assert "'exp'" in detail(bearer(signed({"alg": "HS256"}, claims(exp=...))))
    assert "Refresh" in detail(bearer(token(refresh=True)))
    assert "user" in detail(bearer(signed({"alg": "HS256"}, claims(user=...))))


def test_bad_token_with_someone_elses_user_uid_is_401_not_403(
    client: TestClient, photo: bytes
) -> None:
    response = client.post(
        f"{PREDICT}?user_uid={uuid.uuid4()}",
        files={"file": ("a.jpg", photo, "image/jpeg")},
        headers=bearer(token(ttl_s=-600)),
    )
    assert_401(response)


def test_scheme_is_case_insensitive(client: TestClient) -> None:
    assert client.get(MODEL, headers={"Authorization": f"bearer {token()}"}).status_code == 200


# --- tokens as the auth service mints them ----------------------------------------------------


def test_auth_service_tokens_are_accepted(
    redis_client: TestClient, photo: bytes, utc_clock: None
) -> None:
    user = uuid.uuid4()
    access, _ = auth_service_token(user)
    response = redis_client.post(
        f"{PREDICT}?save_prediction=False&user_uid={user}",
        files={"file": ("a.jpg", photo, "image/jpeg")},
        headers=bearer(access),
    )
    assert response.status_code == 200, response.text
    refresh, _ = auth_service_token(user, refresh=True, expiry=timedelta(days=2))
    assert_401(redis_client.get(MODEL, headers=bearer(refresh)), refresh)
    expired, _ = auth_service_token(user, expiry=timedelta(minutes=-5))
    assert_401(redis_client.get(MODEL, headers=bearer(expired)), expired)


def test_leeway_setting(make_client) -> None:
    client = make_client(jwt_leeway_s=120)
    recent = signed({"alg": "HS256"}, claims(exp=int(time.time()) - 60))
    assert client.get(MODEL, headers=bearer(recent)).status_code == 200
    old = signed({"alg": "HS256"}, claims(exp=int(time.time()) - 600))
    assert_401(client.get(MODEL, headers=bearer(old)))


# --- revocation -----------------------------------------------------------------------------


def test_revocation_takes_effect_on_the_next_request(
    redis_client: TestClient, redis_server: RedisServer, photo: bytes, utc_clock: None
) -> None:
    user = uuid.uuid4()
    access, jti = auth_service_token(user)
    other, _ = auth_service_token(user)
    assert isinstance(redis_client.app.state.rottenbot.blocklist, RedisBlocklist)
    assert redis_client.get(MODEL, headers=bearer(access)).status_code == 200

    redis_server.revoke(jti)  # the auth service's logout: SET <jti> "" EX 3600

    response = redis_client.post(
        PREDICT, files={"file": ("a.jpg", photo, "image/jpeg")}, headers=bearer(access)
    )
    assert_401(response, access)
    assert response.json()["detail"] == "Token has been revoked"
    assert redis_client.get(MODEL, headers=bearer(other)).status_code == 200


def test_redis_outage_fails_closed_and_recovers(
    redis_client: TestClient, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    access, jti = auth_service_token()
    assert redis_client.get(MODEL, headers=bearer(access)).status_code == 200

    redis_server.stop()
    for _ in range(3):
        response = redis_client.get(MODEL, headers=bearer(access))
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert response.json() == {"detail": UNAVAILABLE_REVOCATION}
    # A bad token is still a 401: signatures are checked before the revocation store.
    assert_401(redis_client.get(MODEL, headers=bearer(token(ttl_s=-600))))
    assert "revocation check failed" in caplog.text

    redis_server.start()  # same port, same password, empty (no persistence)
    wait_for(lambda: redis_client.get(MODEL, headers=bearer(access)).status_code == 200)
    redis_server.revoke(jti)
    assert_401(redis_client.get(MODEL, headers=bearer(access)))


def test_hung_redis_is_a_503_within_its_deadline_and_recovers(
    make_client, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis accepts connections and never answers (SIGSTOP): the revocation check gives up at
    its deadline (3 x REDIS_TIMEOUT_S: connect, one retry, reply) and the request is a 503 with
    Retry-After, never a hang; after SIGCONT revocation is enforced again."""
    timeout_s = 0.5
    client = make_client(**redis_server.settings, redis_timeout_s=timeout_s, retry_after_s=2)
    # A generous bound, not a timing assertion: only a request that hangs would exceed it.
    bound_s = 20 * 3 * timeout_s
    access, jti = auth_service_token()
    assert client.get(MODEL, headers=bearer(access)).status_code == 200  # a pooled connection

    def get(credential: str):
        return client.get(MODEL, headers=bearer(credential))

    redis_server.pause()
    try:
        with ThreadPoolExecutor(1) as pool:

            def refused() -> None:
                response = pool.submit(get, access).result(timeout=bound_s)
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"] == "2"
                assert response.json() == {"detail": UNAVAILABLE_REVOCATION}

            refused()  # asks the hung Redis and gives up
            refused()  # fails fast for REDIS_TIMEOUT_S after a failure
            time.sleep(timeout_s)  # past that window: the next one asks Redis again
            refused()
            # Signatures are still checked first: no Redis call, no wait.
            assert_401(pool.submit(get, token(ttl_s=-600)).result(timeout=bound_s))
    finally:
        redis_server.resume()
    failed = [r.getMessage() for r in caplog.records if "revocation check failed" in r.getMessage()]
    assert failed and re.search(r"time(d )?out", failed[0], re.IGNORECASE), failed

    wait_for(lambda: get(access).status_code == 200)
    redis_server.revoke(jti)
    assert_401(get(access))  # enforced again: the check did not fail open


def test_wrong_redis_password_fails_closed(make_client, redis_server: RedisServer) -> None:
    client = make_client(**{**redis_server.settings, "redis_password": "not-the-password"})
    response = client.get(MODEL, headers=bearer(token()))
    assert response.status_code == 503
    assert "retry-after" in response.headers


def test_fail_open_lets_requests_through_and_says_so(
    make_client, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    client = make_client(**redis_server.settings, auth_fail_open=True)
    assert isinstance(client.app.state.rottenbot.blocklist, FailOpenBlocklist)
    startup = [r for r in caplog.records if "AUTH_FAIL_OPEN" in r.getMessage()]
    assert any(r.levelno == logging.ERROR for r in startup)

    access, jti = auth_service_token()
    redis_server.revoke(jti)
    assert_401(client.get(MODEL, headers=bearer(access)))  # Redis up: revocation enforced

    redis_server.stop()
    fresh, _ = auth_service_token()
    for _ in range(5):
        assert client.get(MODEL, headers=bearer(fresh)).status_code == 200
    warnings = [
        r for r in caplog.records
        if r.levelno == logging.WARNING and "WITHOUT checking" in r.getMessage()
    ]
    assert len(warnings) == 1  # rate-limited, not one per request
    assert_401(client.get(MODEL, headers=bearer(token(ttl_s=-600))))  # signatures still count


def test_without_redis_an_in_process_blocklist_is_used(
    make_client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    client = make_client()
    blocklist = client.app.state.rottenbot.blocklist
    assert isinstance(blocklist, InMemoryBlocklist)
    assert any(
        r.levelno == logging.WARNING and "revocations made by the auth service" in r.getMessage()
        for r in caplog.records
    )
    access, jti = auth_service_token()
    assert client.get(MODEL, headers=bearer(access)).status_code == 200
    client.portal.call(blocklist.revoke, jti)
    assert_401(client.get(MODEL, headers=bearer(access)))


def test_redis_client_is_closed_at_shutdown(make_settings, redis_server: RedisServer) -> None:
    from rottenbot_inference.app import create_app

    def connections() -> int:
        with redis_server.client() as admin:
            return sum(
                1 for c in admin.client_list() if c.get("cmd") not in ("client|list", "client")
            )

    before = connections()
    with TestClient(create_app(make_settings(**redis_server.settings))) as client:
        wait_for(lambda: client.get("/health/ready").status_code == 200)
        assert client.get(MODEL, headers=bearer(token())).status_code == 200
        assert connections() > before
    wait_for(lambda: connections() == before)
