"""Access tokens of the RottenBot auth service: verification, and minting for development.

Format: `{"user": {"user_uid": "<uuid>"}, "exp": <unix s>, "jti": "<uuid>", "refresh": false}`,
signed with the shared `JWT_SECRET` using `JWT_ALGORITHM` (HS256 by default). Behind an identity
provider, `JWT_ALGORITHM` may instead be asymmetric (RS256, ES256, ...) with the public key from
`JWT_PUBLIC_KEY_FILE` or a JWKS (`JWT_JWKS_URL`); `JWT_AUDIENCE`/`JWT_ISSUER` are then enforced
too. Only the configured algorithm is ever accepted.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt

from rottenbot_inference.auth.keys import (
    HMAC_ALGORITHMS,
    JwksKeys,
    KeySource,
    StaticKey,
    UnknownKey,
    check_algorithm,
    load_public_key,
)

if TYPE_CHECKING:
    from rottenbot_inference.settings import Settings

log = logging.getLogger(__name__)


class AuthError(Exception):
    """The token is not acceptable; the message is safe to show (never contains the token)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, from a verified access token."""

    user_uid: uuid.UUID
    jti: str
    expires_at: int


MAX_TOKEN_CHARS = 8192

_MESSAGES: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "Token has expired"),
    (jwt.ImmatureSignatureError, "Token is not yet valid"),
    (jwt.InvalidSignatureError, "Token signature is invalid"),
    (jwt.InvalidAlgorithmError, "Token algorithm is not accepted"),
    (jwt.InvalidAudienceError, "Token audience is not accepted"),
    (jwt.InvalidIssuerError, "Token issuer is not accepted"),
)


class TokenVerifier:
    """Verifies access tokens with one pinned algorithm and its key (or key set).

    `key` is the HMAC secret or a public key; pass `keys` (a KeySource, e.g. a JWKS) instead for
    keys chosen by the token's `kid`. Every refusal is an AuthError whose message is short and
    never contains the token.
    """

    def __init__(
        self,
        key: Any,
        algorithm: str,
        leeway_s: float = 10.0,
        audience: str | None = None,
        issuer: str | None = None,
        *,
        keys: KeySource | None = None,
    ) -> None:
        check_algorithm(algorithm)
        if keys is None:
            if algorithm in HMAC_ALGORITHMS:
                if not key:
                    raise ValueError("JWT_SECRET is empty")
            elif isinstance(key, str | bytes):
                key = load_public_key(key.encode() if isinstance(key, str) else key, algorithm)
            keys = StaticKey(key)
        self._keys = keys
        self._algorithm = algorithm
        self._leeway = leeway_s
        self._audience = audience
        self._issuer = issuer
        self._required = ["exp", "jti"] + (["aud"] if audience else []) + (
            ["iss"] if issuer else []
        )

    @property
    def algorithm(self) -> str:
        return self._algorithm

    async def start(self) -> None:
        """Load remote or file key sets (startup)."""
        await self._keys.start()

    def verify(self, token: str) -> Principal:
        """Verify with keys at hand (no I/O): static keys, or a key set already loaded."""
        kid = self._kid(token)
        try:
            key = self._keys.cached_key(kid)
        except UnknownKey:
            raise AuthError("Token signing key is unknown") from None
        return self._decode(token, key)

    async def verify_async(self, token: str) -> Principal:
        """Verify, fetching a key set first if needed (off the event loop).

        Raises AuthError (401), or KeysUnavailable (503) if no key set can be had.
        """
        kid = self._kid(token)
        try:
            key = await self._keys.key(kid)
        except UnknownKey:
            raise AuthError("Token signing key is unknown") from None
        return self._decode(token, key)

    def _kid(self, token: str) -> str | None:
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise AuthError("Token is invalid")
        if isinstance(self._keys, StaticKey):
            return None  # one key for all; the header is checked by decode
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except Exception:
            raise AuthError("Token is invalid") from None
        if kid is not None and not isinstance(kid, str):
            raise AuthError("Token is invalid")
        return kid

    def _decode(self, token: str, key: Any) -> Principal:
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[self._algorithm],
                leeway=self._leeway,
                audience=self._audience,
                issuer=self._issuer,
                options={"require": self._required},
            )
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"Token is missing the '{exc.claim}' claim") from None
        except Exception as exc:
            # PyJWTError for every refusal; anything else (a TypeError on an odd claim type
            # in some PyJWT version) is still a bad token, never a 500.
            for kind, message in _MESSAGES:
                if isinstance(exc, kind):
                    raise AuthError(message) from None
            raise AuthError("Token is invalid") from None
        return _principal(claims)


def build_verifier(settings: Settings) -> TokenVerifier:
    """The verifier the settings describe: HMAC secret, PEM public key file, or JWKS."""
    algorithm = settings.jwt_algorithm
    check_algorithm(algorithm)
    common: dict[str, Any] = {
        "leeway_s": settings.jwt_leeway_s,
        "audience": settings.jwt_audience,
        "issuer": settings.jwt_issuer,
    }
    key_file, jwks = settings.jwt_public_key_file, settings.jwt_jwks_url
    if algorithm in HMAC_ALGORITHMS:
        if key_file or jwks:
            raise ValueError(
                f"JWT_PUBLIC_KEY_FILE/JWT_JWKS_URL need an asymmetric JWT_ALGORITHM "
                f"(RS256, ES256, ...), not {algorithm}"
            )
        return TokenVerifier(settings.jwt_secret.get_secret_value(), algorithm, **common)
    if bool(key_file) == bool(jwks):
        raise ValueError(
            f"JWT_ALGORITHM={algorithm} needs exactly one of JWT_PUBLIC_KEY_FILE or JWT_JWKS_URL"
        )
    if key_file:
        key = load_public_key(Path(key_file).read_bytes(), algorithm)
        log.info("access tokens: %s with the public key in %s", algorithm, key_file)
        return TokenVerifier(key, algorithm, **common)
    assert jwks is not None
    keys = JwksKeys(jwks, algorithm, cache_s=settings.jwt_jwks_cache_s)
    log.info("access tokens: %s with keys from the JWKS at %s", algorithm, jwks)
    return TokenVerifier(None, algorithm, keys=keys, **common)


def _principal(claims: dict[str, Any]) -> Principal:
    if claims.get("refresh", False) is not False:
        raise AuthError("Refresh tokens are not accepted; use an access token")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti:
        raise AuthError("Token has an invalid 'jti' claim")
    user = claims.get("user")
    raw_uid = user.get("user_uid") if isinstance(user, dict) else None
    try:
        user_uid = uuid.UUID(str(raw_uid)) if isinstance(raw_uid, str) else None
    except ValueError:
        user_uid = None
    if user_uid is None:
        raise AuthError("Token has no valid user")
    exp = claims.get("exp")
    return Principal(user_uid=user_uid, jti=jti, expires_at=int(exp) if exp else 0)


def mint_token(
    secret: str,
    algorithm: str,
    user_uid: uuid.UUID,
    ttl_s: int = 3600,
    refresh: bool = False,
) -> str:
    """A token exactly like the auth service issues (for development and tests)."""
    payload = {
        "user": {"user_uid": str(user_uid)},
        "exp": int(time.time()) + ttl_s,
        "jti": str(uuid.uuid4()),
        "refresh": refresh,
    }
    return jwt.encode(payload, secret, algorithm=algorithm)
