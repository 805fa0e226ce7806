"""Asymmetric tokens (RS256/ES256) with a PEM key file or a JWKS (file or URL), audience and
issuer checks, algorithm confusion, and configuration errors."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.server
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.testclient import TestClient
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from rottenbot_inference.api.deps import UNAVAILABLE_KEYS
from rottenbot_inference.auth.keys import JwksKeys, UnknownKey
from rottenbot_inference.auth.tokens import AuthError, TokenVerifier, build_verifier
from rottenbot_inference.settings import Settings
from tests.helpers import free_port, token
from tests.test_auth import assert_401, b64, bearer, claims

MODEL = "/api/v1/inference/model"
AUDIENCE = "rottenbot-inference"
ISSUER = "https://auth.rottenbot.example"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk(key, kid: str | None, alg: str) -> dict:
    algorithm = RSAAlgorithm if alg.startswith(("RS", "PS")) else ECAlgorithm
    entry = algorithm.to_jwk(key.public_key(), as_dict=True)
    entry.update({"use": "sig", "alg": alg})
    if kid is not None:
        entry["kid"] = kid
    return entry


def sign(key, alg: str, kid: str | None = None, **changes: object) -> str:
    return jwt.encode(claims(**changes), key, algorithm=alg, headers={"kid": kid} if kid else None)


def hs256_with_public_key_as_secret(pem: bytes, header_alg: str = "HS256") -> str:
    """The classic confusion attack: an HMAC signature keyed with the (public) PEM text."""
    head = b64(json.dumps({"alg": header_alg, "typ": "JWT"}).encode()) + "." + b64(
        json.dumps(claims(aud=AUDIENCE, iss=ISSUER)).encode()
    )
    return head + "." + b64(hmac.new(pem, head.encode(), hashlib.sha256).digest())


# --- RS256 with a PEM public key file, audience and issuer --------------------------------------


@pytest.fixture
def rs256_client(make_client, tmp_path: Path, rsa_key) -> TestClient:
    key_file = tmp_path / "public.pem"
    key_file.write_bytes(public_pem(rsa_key))
    return make_client(
        jwt_algorithm="RS256",
        jwt_public_key_file=key_file,
        jwt_audience=AUDIENCE,
        jwt_issuer=ISSUER,
    )


def test_rs256_key_file_with_audience_and_issuer(
    rs256_client: TestClient, rsa_key, other_rsa_key
) -> None:
    good = sign(rsa_key, "RS256", aud=AUDIENCE, iss=ISSUER)
    assert rs256_client.get(MODEL, headers=bearer(good)).status_code == 200
    listed = sign(rsa_key, "RS256", aud=["other", AUDIENCE], iss=ISSUER)
    assert rs256_client.get(MODEL, headers=bearer(listed)).status_code == 200

    refused = {
        "other-key": sign(other_rsa_key, "RS256", aud=AUDIENCE, iss=ISSUER),
        "wrong-audience": sign(rsa_key, "RS256", aud="someone-else", iss=ISSUER),
        "missing-audience": sign(rsa_key, "RS256", iss=ISSUER),
        "wrong-issuer": sign(rsa_key, "RS256", aud=AUDIENCE, iss="https://evil.example"),
        "missing-issuer": sign(rsa_key, "RS256", aud=AUDIENCE),
        "expired": sign(rsa_key, "RS256", aud=AUDIENCE, iss=ISSUER, exp=int(time.time()) - 600),
        "refresh": sign(rsa_key, "RS256", aud=AUDIENCE, iss=ISSUER, refresh=True),
        "ps256-same-key": sign(rsa_key, "PS256", aud=AUDIENCE, iss=ISSUER),
        "hs256-shared-secret": token(),
    }
    for name, value in refused.items():
        response = rs256_client.get(MODEL, headers=bearer(value))
        try:
            assert_401(response, value)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
    detail = rs256_client.get(MODEL, headers=bearer(refused["wrong-audience"])).json()["detail"]
    assert "audience" in detail


def test_hs_rs_confusion_is_refused(rs256_client: TestClient, rsa_key) -> None:
    pem = public_pem(rsa_key)
    for header_alg in ("HS256", "RS256"):
        forged = hs256_with_public_key_as_secret(pem, header_alg)
        assert_401(rs256_client.get(MODEL, headers=bearer(forged)), forged)
    unsigned = b64(b'{"alg":"none"}') + "." + b64(json.dumps(claims()).encode()) + "."
    assert_401(rs256_client.get(MODEL, headers=bearer(unsigned)))


# --- JWKS: file and URL -----------------------------------------------------------------------


def test_es256_jwks_file(make_client, tmp_path: Path, ec_key, rsa_key) -> None:
    jwks = tmp_path / "jwks.json"
    oct_key = {"kty": "oct", "kid": "shared", "k": b64(b"attacker-known-secret" * 2)}
    keys = [jwk(ec_key, "ec-1", "ES256"), jwk(rsa_key, "rsa-1", "RS256"), oct_key]
    jwks.write_text(json.dumps({"keys": keys}))
    client = make_client(jwt_algorithm="ES256", jwt_jwks_url=str(jwks))
    assert client.get(MODEL, headers=bearer(sign(ec_key, "ES256", "ec-1"))).status_code == 200
    # Only one ES256 key in the set: a token without `kid` may use it.
    assert client.get(MODEL, headers=bearer(sign(ec_key, "ES256"))).status_code == 200

    unknown = sign(ec_key, "ES256", "ec-2")
    response = client.get(MODEL, headers=bearer(unknown))
    assert_401(response, unknown)
    assert response.json()["detail"] == "Token signing key is unknown"
    # The RSA key of the set is not an ES256 key; the `oct` key is never used (HMAC confusion).
    assert_401(client.get(MODEL, headers=bearer(sign(rsa_key, "RS256", "rsa-1"))))
    hs = jwt.encode(claims(), b"attacker-known-secret" * 2, "HS256", headers={"kid": "shared"})
    assert_401(client.get(MODEL, headers=bearer(hs)))
    weird_kid = jwt.encode(claims(), ec_key, "ES256", headers={"kid": "x" * 300})
    assert_401(client.get(MODEL, headers=bearer(weird_kid)))


class JwksServer:
    """Serves a JWKS document on loopback and counts fetches."""

    def __init__(self, document: dict) -> None:
        self.document = document
        self.fetches = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                body = json.dumps(outer.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> JwksServer:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks_server(rsa_key) -> Iterator[JwksServer]:
    with JwksServer({"keys": [jwk(rsa_key, "rsa-1", "RS256")]}) as server:
        yield server


def test_rs256_jwks_url_is_fetched_once_and_cached(
    make_client, jwks_server: JwksServer, rsa_key, other_rsa_key
) -> None:
    client = make_client(jwt_algorithm="RS256", jwt_jwks_url=jwks_server.url)
    for _ in range(5):
        assert client.get(MODEL, headers=bearer(sign(rsa_key, "RS256", "rsa-1"))).status_code == 200
    # Unknown `kid`s right after a fetch do not make the service refetch (no hammering).
    for index in range(5):
        assert_401(client.get(MODEL, headers=bearer(sign(other_rsa_key, "RS256", f"k{index}"))))
    assert jwks_server.fetches == 1


def test_unreachable_jwks_url_is_a_503(make_client) -> None:
    url = f"http://127.0.0.1:{free_port()}/jwks.json"  # nothing listens there
    client = make_client(jwt_algorithm="RS256", jwt_jwks_url=url)
    response = client.get(MODEL, headers=bearer(token()))
    assert response.status_code == 503
    assert response.json() == {"detail": UNAVAILABLE_KEYS}
    assert "retry-after" in response.headers


def test_jwks_rotation_and_outage_keep_working(rsa_key, other_rsa_key) -> None:
    """Unit level (no waiting on the real back-off intervals)."""

    async def scenario() -> None:
        with JwksServer({"keys": [jwk(rsa_key, "old", "RS256")]}) as server:
            keys = JwksKeys(server.url, "RS256", min_refetch_s=0, retry_s=0)
            verifier = TokenVerifier(None, "RS256", keys=keys)
            await verifier.start()
            await verifier.verify_async(sign(rsa_key, "RS256", "old"))
            server.document = {
                "keys": [jwk(rsa_key, "old", "RS256"), jwk(other_rsa_key, "new", "RS256")]
            }
            principal = await verifier.verify_async(sign(other_rsa_key, "RS256", "new"))
            assert principal.user_uid.version == 4
            assert server.fetches == 2
        # The URL is gone now: the cached keys stay in use, unknown kids stay refused.
        await verifier.verify_async(sign(other_rsa_key, "RS256", "new"))
        with pytest.raises(AuthError):
            await verifier.verify_async(sign(other_rsa_key, "RS256", "newer"))
        with pytest.raises(UnknownKey):
            keys.cached_key("newer")

    asyncio.run(scenario())


# --- configuration ----------------------------------------------------------------------------


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def test_configuration_errors_are_refused_at_startup(tmp_path: Path, rsa_key) -> None:
    key_file = tmp_path / "public.pem"
    key_file.write_bytes(public_pem(rsa_key))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    bad_jwks = tmp_path / "jwks.json"
    bad_jwks.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    for values in (
        {"jwt_algorithm": "none"},
        {"jwt_algorithm": "NONE"},
        {"jwt_algorithm": "HS1"},
        {"jwt_algorithm": "RS256"},  # no key
        {"jwt_algorithm": "HS256", "jwt_public_key_file": key_file},
        {"jwt_algorithm": "RS256", "jwt_public_key_file": key_file, "jwt_jwks_url": "x.json"},
        {"jwt_algorithm": "RS256", "jwt_public_key_file": garbage},
        {"jwt_algorithm": "ES256", "jwt_public_key_file": key_file},  # an RSA key
    ):
        with pytest.raises(ValueError):
            build_verifier(settings(**values))
    verifier = build_verifier(settings(jwt_algorithm="RS256", jwt_jwks_url=str(bad_jwks)))
    with pytest.raises(ValueError):
        asyncio.run(verifier.start())


def test_misconfigured_service_does_not_start(make_settings) -> None:
    from rottenbot_inference.app import create_app

    app = create_app(make_settings(jwt_algorithm="RS256"))
    with pytest.raises(ValueError), TestClient(app):
        pass


def test_private_key_file_is_reduced_to_its_public_half(tmp_path: Path, rsa_key) -> None:
    key_file = tmp_path / "private.pem"
    key_file.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    verifier = build_verifier(settings(jwt_algorithm="RS256", jwt_public_key_file=key_file))
    user = uuid.uuid4()
    principal = verifier.verify(sign(rsa_key, "RS256", user={"user_uid": str(user)}))
    assert principal.user_uid == user

