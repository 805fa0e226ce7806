"""Access tokens of the RottenBot auth service: verification, and minting for development.

Format: `{"user": {"user_uid": "<uuid>"}, "exp": <unix s>, "jti": "<uuid>", "refresh": false}`,
signed with the shared `JWT_SECRET` using `JWT_ALGORITHM` (HS256 by default).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt


class AuthError(Exception):
    """The token is not acceptable; the message is safe to show (never contains the token)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, from a verified access token."""

    user_uid: uuid.UUID
    jti: str
    expires_at: int


class TokenVerifier:
    """Verifies access tokens with one pinned algorithm and key."""

    def __init__(
        self,
        key: Any,
        algorithm: str,
        leeway_s: float = 10.0,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> None:
        if algorithm.lower() == "none":
            raise ValueError("JWT_ALGORITHM 'none' is not allowed")
        self._key = key
        self._algorithm = algorithm
        self._leeway = leeway_s
        self._audience = audience
        self._issuer = issuer

    def verify(self, token: str) -> Principal:
        required = ["exp", "jti"] + (["aud"] if self._audience else [])
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self._algorithm],
                leeway=self._leeway,
                audience=self._audience,
                issuer=self._issuer,
                options={"require": required},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("Token has expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"Token is missing the '{exc.claim}' claim") from None
        except jwt.InvalidSignatureError:
            raise AuthError("Token signature is invalid") from None
        except jwt.PyJWTError:
            raise AuthError("Token is invalid") from None
        return _principal(claims)


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
