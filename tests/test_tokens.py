"""Token verification (auth/tokens.py) directly, without an app: every refusal and its message,
the claims that are required, the key choices of `build_verifier`, and the token shape that
`mint_token` makes. Fast (no model, no server): the mutation run (scripts/mutation.sh) uses
these tests for auth/tokens.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from rottenbot_inference.auth.keys import JwksKeys, StaticKey
from rottenbot_inference.auth.tokens import (
    MAX_TOKEN_CHARS,
    AuthError,
    Principal,
    TokenVerifier,
    build_verifier,
    mint_token,
)
from rottenbot_inference.settings import Settings
from tests.helpers import TEST_SECRET
from tests.test_auth import b64, claims, signed

AUDIENCE = "rottenbot-inference"
ISSUER = "https://auth.rottenbot.example"


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwks_file(folder: Path, key: ec.EllipticCurvePrivateKey, kid: str) -> Path:
    entry = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    entry.update({"use": "sig", "alg": "ES256", "kid": kid})
    path = folder / "jwks.json"
    path.write_text(json.dumps({"keys": [entry]}))
    return path


def es256(key: ec.EllipticCurvePrivateKey, kid: str | None = None, **changes: object) -> str:
    return jwt.encode(claims(**changes), key, "ES256", headers={"kid": kid} if kid else None)


def hs256(**changes: object) -> str:
    return signed({"alg": "HS256", "typ": "JWT"}, claims(**changes))


def refusal(verify: Any, credential: Any) -> str:
    with pytest.raises(AuthError) as caught:
        verify(credential)
    return str(caught.value)


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


# --- a valid token --------------------------------------------------------------------------


def test_a_valid_token_gives_its_principal() -> None:
    user, jti, exp = uuid.uuid4(), str(uuid.uuid4()), int(time.time()) + 600
    verifier = TokenVerifier(TEST_SECRET, "HS256")
    principal = verifier.verify(hs256(user={"user_uid": str(user)}, jti=jti, exp=exp))
    assert principal == Principal(user_uid=user, jti=jti, expires_at=exp)
    assert verifier.algorithm == "HS256"
    assert asyncio.run(verifier.verify_async(hs256(jti=jti, exp=exp))).jti == jti


def test_refresh_claim_absent_or_false_is_an_access_token() -> None:
    verifier = TokenVerifier(TEST_SECRET, "HS256")
    assert verifier.verify(hs256(refresh=...)).jti
    assert verifier.verify(hs256(refresh=False)).jti


# --- every refusal names its reason and never the token --------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"exp": ...}, "Token is missing the 'exp' claim"),
        ({"jti": ...}, "Token is missing the 'jti' claim"),
        ({"exp": int(time.time()) - 3600}, "Token has expired"),
        ({"nbf": int(time.time()) + 3600}, "Token is not yet valid"),
        ({"refresh": True}, "Refresh tokens are not accepted; use an access token"),
        ({"refresh": "no"}, "Refresh tokens are not accepted; use an access token"),
        ({"refresh": None}, "Refresh tokens are not accepted; use an access token"),
        ({"jti": ""}, "Token has an invalid 'jti' claim"),
        ({"jti": 12345}, "Token is invalid"),  # PyJWT checks its type
        ({"user": ...}, "Token has no valid user"),
        ({"user": "ada"}, "Token has no valid user"),
        ({"user": {}}, "Token has no valid user"),
        ({"user": {"user_uid": 42}}, "Token has no valid user"),
        ({"user": {"user_uid": "not-a-uuid"}}, "Token has no valid user"),
        # Digits that would read as a UUID's hex: only a string is a user id.
        ({"user": {"user_uid": 12345678123456781234567812345678}}, "Token has no valid user"),
        ({"exp": "tomorrow"}, "Token is invalid"),
    ],
)
def test_claims_refusals(changes: dict[str, object], message: str) -> None:
    credential = hs256(**changes)
    text = refusal(TokenVerifier(TEST_SECRET, "HS256").verify, credential)
    assert text == message
    assert credential not in text


def test_signature_algorithm_and_shape_refusals() -> None:
    verify = TokenVerifier(TEST_SECRET, "HS256").verify
    other = jwt.encode(claims(), "another-secret-" + "y" * 32, "HS256")
    assert refusal(verify, other) == "Token signature is invalid"
    hs512 = jwt.encode(claims(), TEST_SECRET, "HS512")
    assert refusal(verify, hs512) == "Token algorithm is not accepted"
    none = b64(b'{"alg":"none"}') + "." + b64(json.dumps(claims()).encode()) + "."
    assert refusal(verify, none) == "Token algorithm is not accepted"
    for garbage in ("not-a-jwt", "a.b.c", "", None, 42):
        assert refusal(verify, garbage) == "Token is invalid"


def _token_of_length(length: int) -> str:
    """A valid HS256 token exactly `length` characters long (padded with a claim)."""
    for pad in range(length):
        credential = hs256(pad="x" * pad)
        if len(credential) == length:
            return credential
        if len(credential) > length:
            break
    raise AssertionError(f"no token of length {length}")


def test_token_length_limit_is_exact() -> None:
    verify = TokenVerifier(TEST_SECRET, "HS256").verify
    for length in (MAX_TOKEN_CHARS, MAX_TOKEN_CHARS - 1):
        assert verify(_token_of_length(length)).jti  # at the limit: verified
    assert MAX_TOKEN_CHARS == 8192
    too_long = _token_of_length(MAX_TOKEN_CHARS + 1)
    assert refusal(verify, too_long) == "Token is invalid"


def test_default_leeway_is_ten_seconds() -> None:
    verify = TokenVerifier(TEST_SECRET, "HS256").verify
    now = int(time.time())
    assert verify(hs256(exp=now - 9)).jti  # 9-10 s ago: within the leeway
    assert refusal(verify, hs256(exp=now - 10)) == "Token has expired"  # 10-11 s ago: not
    verify = TokenVerifier(TEST_SECRET, "HS256", leeway_s=120).verify
    assert verify(hs256(exp=now - 100)).jti


def test_audience_and_issuer_are_required_and_checked_when_configured() -> None:
    verify = TokenVerifier(TEST_SECRET, "HS256", audience=AUDIENCE, issuer=ISSUER).verify
    assert verify(hs256(aud=AUDIENCE, iss=ISSUER)).jti
    assert refusal(verify, hs256(iss=ISSUER)) == "Token is missing the 'aud' claim"
    assert refusal(verify, hs256(aud=AUDIENCE)) == "Token is missing the 'iss' claim"
    assert refusal(verify, hs256(aud="x", iss=ISSUER)) == "Token audience is not accepted"
    assert refusal(verify, hs256(aud=AUDIENCE, iss="x")) == "Token issuer is not accepted"
    # Without them configured, neither is required, and the issuer is not checked.
    assert TokenVerifier(TEST_SECRET, "HS256").verify(hs256(iss="y")).jti
    only_audience = TokenVerifier(TEST_SECRET, "HS256", audience=AUDIENCE).verify
    assert only_audience(hs256(aud=AUDIENCE)).jti


def test_hmac_secret_must_not_be_empty_and_none_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^JWT_SECRET is empty$"):
        TokenVerifier("", "HS256")
    with pytest.raises(ValueError, match="'none' is not allowed"):
        TokenVerifier(TEST_SECRET, "none")


# --- asymmetric keys: PEM text, key objects, key sets ----------------------------------------


def test_public_key_as_pem_text_bytes_or_object(ec_key: ec.EllipticCurvePrivateKey) -> None:
    credential = es256(ec_key)
    pem = public_pem(ec_key)
    for key in (pem, pem.decode(), ec_key.public_key()):
        verifier = TokenVerifier(key, "ES256")
        assert verifier.verify(credential).jti
        assert asyncio.run(verifier.verify_async(credential)).jti
    other = es256(ec.generate_private_key(ec.SECP256R1()))
    assert refusal(TokenVerifier(pem, "ES256").verify, other) == "Token signature is invalid"


def test_key_set_picks_the_key_by_kid(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    keys = JwksKeys(str(jwks_file(tmp_path, ec_key, "k1")), "ES256")
    verifier = TokenVerifier(None, "ES256", keys=keys)
    with pytest.raises(Exception, match="not been loaded"):
        verifier.verify(es256(ec_key, "k1"))  # nothing loaded before start()
    asyncio.run(verifier.start())
    assert verifier.verify(es256(ec_key, "k1")).jti
    assert asyncio.run(verifier.verify_async(es256(ec_key, "k1"))).jti
    assert verifier.verify(es256(ec_key)).jti  # no kid, one key: that one
    unknown = es256(ec_key, "k2")
    assert refusal(verifier.verify, unknown) == "Token signing key is unknown"

    async def verify_async(credential: str) -> Any:
        return await verifier.verify_async(credential)

    assert refusal(lambda c: asyncio.run(verify_async(c)), unknown) == (
        "Token signing key is unknown"
    )
    numeric_kid = ".".join(
        (b64(b'{"alg":"ES256","kid":7}'), b64(json.dumps(claims()).encode()), b64(b"sig"))
    )
    assert refusal(verifier.verify, numeric_kid) == "Token is invalid"
    assert refusal(verifier.verify, "garbage") == "Token is invalid"  # no readable header


def test_a_static_key_never_reads_the_header() -> None:
    class Keys(StaticKey):
        def cached_key(self, kid: str | None) -> Any:
            assert kid is None
            return super().cached_key(kid)

    verifier = TokenVerifier(None, "HS256", keys=Keys(TEST_SECRET))
    credential = jwt.encode(claims(), TEST_SECRET, "HS256", headers={"kid": "anything"})
    assert verifier.verify(credential).jti


# --- build_verifier: what the settings describe ----------------------------------------------


def test_build_verifier_with_the_hmac_secret_and_the_settings_checks() -> None:
    verifier = build_verifier(
        settings(jwt_secret=TEST_SECRET, jwt_leeway_s=120, jwt_audience=AUDIENCE,
                 jwt_issuer=ISSUER)
    )
    assert verifier.algorithm == "HS256"
    old = int(time.time()) - 100
    assert verifier.verify(hs256(aud=AUDIENCE, iss=ISSUER, exp=old)).jti  # leeway 120 s
    assert refusal(verifier.verify, hs256(aud=AUDIENCE, iss="x")) == (
        "Token issuer is not accepted"
    )
    assert refusal(verifier.verify, hs256(aud="x", iss=ISSUER)) == (
        "Token audience is not accepted"
    )


def test_build_verifier_refuses_inconsistent_settings(tmp_path: Path) -> None:
    pem = tmp_path / "key.pem"
    for wrong in ({"jwt_public_key_file": pem}, {"jwt_jwks_url": "https://idp/jwks"}):
        with pytest.raises(ValueError, match=r"need an asymmetric JWT_ALGORITHM .* not HS256"):
            build_verifier(settings(**wrong))
    for values in ({}, {"jwt_public_key_file": pem, "jwt_jwks_url": "https://idp/jwks"}):
        with pytest.raises(ValueError, match="ES256 needs exactly one of JWT_PUBLIC_KEY_FILE"):
            build_verifier(settings(jwt_algorithm="ES256", **values))
    with pytest.raises(ValueError, match="not supported"):
        build_verifier(settings(jwt_algorithm="XX999"))


def test_build_verifier_with_a_key_file_or_a_key_set(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "rottenbot_inference.auth.tokens")
    pem = tmp_path / "key.pem"
    pem.write_bytes(public_pem(ec_key))
    from_file = build_verifier(
        settings(jwt_algorithm="ES256", jwt_public_key_file=pem, jwt_leeway_s=120)
    )
    assert from_file.verify(es256(ec_key, exp=int(time.time()) - 100)).jti  # settings' leeway
    assert caplog.records[-1].getMessage() == f"access tokens: ES256 with the public key in {pem}"

    jwks = str(jwks_file(tmp_path, ec_key, "k1"))
    from_set = build_verifier(
        settings(jwt_algorithm="ES256", jwt_jwks_url=jwks, jwt_jwks_cache_s=42,
                 jwt_audience=AUDIENCE)
    )
    assert caplog.records[-1].getMessage() == (
        f"access tokens: ES256 with keys from the JWKS at {jwks}"
    )
    keys = from_set._keys
    assert isinstance(keys, JwksKeys) and keys.location == jwks and keys._cache_s == 42
    asyncio.run(from_set.start())
    assert from_set.verify(es256(ec_key, "k1", aud=AUDIENCE)).jti
    assert refusal(from_set.verify, es256(ec_key, "k1")) == "Token is missing the 'aud' claim"


# --- mint_token: the auth service's token shape -----------------------------------------------


def test_mint_token_makes_what_the_auth_service_issues() -> None:
    user = uuid.uuid4()
    before = int(time.time())
    credential = mint_token(TEST_SECRET, "HS256", user)
    payload = jwt.decode(credential, TEST_SECRET, algorithms=["HS256"])
    assert jwt.get_unverified_header(credential)["alg"] == "HS256"
    assert set(payload) == {"user", "exp", "jti", "refresh"}
    assert payload["user"] == {"user_uid": str(user)}
    assert payload["refresh"] is False
    assert uuid.UUID(payload["jti"]).version == 4
    assert before + 3600 <= payload["exp"] <= int(time.time()) + 3600  # ttl 1 h by default
    short = jwt.decode(mint_token(TEST_SECRET, "HS512", user, ttl_s=60, refresh=True),
                       TEST_SECRET, algorithms=["HS512"])
    assert short["refresh"] is True
    assert before + 60 <= short["exp"] <= int(time.time()) + 60
    assert mint_token(TEST_SECRET, "HS256", user) != mint_token(TEST_SECRET, "HS256", user)
