"""Property tests: random and mutated tokens only ever get a 401 (never a 200, 403, 500)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rottenbot_inference.auth.tokens import AuthError, TokenVerifier
from tests.helpers import TEST_SECRET, token
from tests.test_auth import assert_401, b64, claims

MODEL = "/api/v1/inference/model"
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


def sign_raw(header: object, payload: bytes, secret: str = TEST_SECRET) -> str:
    """HMAC-SHA256 over any header and any payload bytes, with the right secret."""
    head = b64(json.dumps(header).encode()) + "." + b64(payload)
    return head + "." + b64(hmac.new(secret.encode(), head.encode(), hashlib.sha256).digest())


def _int_or_none(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return None


def _is_uuid(value: object) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


def _unexpired(value: object) -> bool:
    number = _int_or_none(value)
    return number is not None and number > time.time() - 3600


# Per claim, values that make an otherwise valid access token unacceptable.
BAD_CLAIMS = {
    "exp": st.just(...) | json_values.filter(lambda v: not _unexpired(v)),
    "jti": st.just(...) | st.just("") | json_values.filter(lambda v: not isinstance(v, str)),
    "user": st.just(...)
    | json_values.filter(lambda v: not isinstance(v, dict))
    | st.fixed_dictionaries(
        {"user_uid": json_values.filter(lambda v: not (isinstance(v, str) and _is_uuid(v)))}
    )
    | st.fixed_dictionaries({"uid": st.uuids().map(str)}),
    "refresh": json_values.filter(lambda v: v is not False),
    "iat": json_values.filter(lambda v: _int_or_none(v) is None or _int_or_none(v) > 2**40),
    "nbf": json_values.filter(lambda v: _int_or_none(v) is None or _int_or_none(v) > 2**40),
    "aud": json_values.filter(lambda v: v not in (None, "", [], {}, 0, False)),
}


@st.composite
def wrong_shape_claims(draw: st.DrawFn) -> dict:
    names = draw(st.lists(st.sampled_from(sorted(BAD_CLAIMS)), min_size=1, max_size=4, unique=True))
    return claims(**{name: draw(BAD_CLAIMS[name]) for name in names})


@st.composite
def signed_wrong_shapes(draw: st.DrawFn) -> str:
    """Signed with the right secret and algorithm; the claims have the wrong shape."""
    kind = draw(st.sampled_from(["claims", "random-object", "not-an-object", "bytes", "header"]))
    header = {"alg": "HS256", "typ": "JWT"}
    if kind == "claims":
        return sign_raw(header, json.dumps(draw(wrong_shape_claims())).encode())
    if kind == "random-object":
        payload = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=6))
        return sign_raw(header, json.dumps(payload).encode())
    if kind == "not-an-object":
        payload = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        return sign_raw(header, json.dumps(payload).encode())
    if kind == "bytes":
        return sign_raw(header, draw(st.binary(max_size=200)))
    # A valid payload under a header naming another (or no) algorithm, or not a JSON object.
    bad_header = draw(
        st.fixed_dictionaries(
            {"alg": json_values.filter(lambda v: v != "HS256")}, optional={"kid": json_values}
        )
        | json_values.filter(lambda v: not isinstance(v, dict))
    )
    return sign_raw(bad_header, json.dumps(claims()).encode())


def _decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


@st.composite
def mutated_tokens(draw: st.DrawFn) -> str:
    """A valid token with bits flipped in its header, payload or signature, or its text
    edited (characters replaced, inserted, deleted; segments dropped or swapped)."""
    parts = token(uuid.UUID(int=draw(st.integers(0, 2**128 - 1)))).split(".")
    how = draw(st.sampled_from(["bitflip", "text", "segments"]))
    if how == "bitflip":
        index = draw(st.integers(0, 2))
        raw = bytearray(_decode(parts[index]))
        flips = draw(st.lists(st.integers(0, len(raw) * 8 - 1), min_size=1, max_size=3,
                              unique=True))
        for bit in flips:
            raw[bit // 8] ^= 1 << (bit % 8)
        parts[index] = b64(bytes(raw))
        return ".".join(parts)
    text = ".".join(parts)
    if how == "text":
        position = draw(st.integers(0, len(text) - 1))
        replacement = draw(st.text(st.characters(min_codepoint=33, max_codepoint=126),
                                   max_size=3))
        removed = draw(st.integers(0, 3))
        mutated = text[:position] + replacement + text[position + removed:]
        if mutated == text:
            mutated = text[:-1]
        return mutated
    choice = draw(st.sampled_from(["drop", "swap", "extra", "empty-signature"]))
    if choice == "drop":
        del parts[draw(st.integers(0, 2))]
    elif choice == "swap":
        parts[0], parts[1] = parts[1], parts[0]
    elif choice == "extra":
        parts.append(parts[2])
    else:
        parts[2] = ""
    return ".".join(parts)


random_credentials = st.text(
    st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=300
).filter(lambda s: s.strip())


def check(client: TestClient, credential: str) -> None:
    response = client.get(MODEL, headers={"Authorization": f"Bearer {credential}"})
    assert_401(response, credential if len(credential) >= 20 else None)


@FUZZ
@given(credential=random_credentials)
def test_random_strings_get_401(client: TestClient, credential: str) -> None:
    check(client, credential)


@FUZZ
@given(credential=mutated_tokens())
def test_mutated_tokens_get_401(client: TestClient, credential: str) -> None:
    check(client, credential)


@FUZZ
@given(credential=signed_wrong_shapes())
def test_wrong_shapes_signed_with_the_right_secret_get_401(
    client: TestClient, credential: str
) -> None:
    check(client, credential)


@settings(max_examples=500, deadline=None)
@given(credential=st.one_of(random_credentials, mutated_tokens(), signed_wrong_shapes()))
def test_verifier_only_ever_raises_auth_error(credential: str) -> None:
    verifier = TokenVerifier(TEST_SECRET, "HS256")
    with pytest.raises(AuthError) as refused:
        verifier.verify(credential)
    message = str(refused.value)
    assert len(message) < 100 and (len(credential) < 20 or credential not in message)


def test_the_generators_are_not_vacuous() -> None:
    """The valid token the mutations start from is accepted, so refusals are earned."""
    assert TokenVerifier(TEST_SECRET, "HS256").verify(token()).user_uid
