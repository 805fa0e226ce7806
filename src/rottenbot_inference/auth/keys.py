"""Verification keys: the shared HMAC secret, a PEM public key, or a JWKS (file or URL).

The algorithm is pinned by configuration (`JWT_ALGORITHM`); a key is only ever used with that
algorithm, and a key set never contributes symmetric (`oct`) keys, so an attacker cannot make
the service verify an HMAC signature with a public key (HS/RS confusion).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from pathlib import Path
from typing import Any, Protocol

import jwt
from jwt.algorithms import get_default_algorithms

log = logging.getLogger(__name__)

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
# JWK key type each asymmetric algorithm family needs.
_KEY_TYPES = {
    **{alg: "RSA" for alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    **{alg: "EC" for alg in ("ES256", "ES256K", "ES384", "ES512", "ES521")},
    "EdDSA": "OKP",
}
ASYMMETRIC_ALGORITHMS = frozenset(_KEY_TYPES)


class UnknownKey(Exception):
    """No configured key matches the token's `kid` (the token is refused: 401)."""


class KeysUnavailable(Exception):
    """The key set could not be fetched and none is cached (a dependency outage: 503)."""


def check_algorithm(algorithm: str) -> None:
    """Refuse `none` and anything PyJWT (with `cryptography`) cannot verify."""
    if algorithm.lower() == "none":
        raise ValueError("JWT_ALGORITHM 'none' is not allowed")
    if algorithm not in HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS:
        raise ValueError(f"JWT_ALGORITHM {algorithm!r} is not supported")
    if algorithm not in get_default_algorithms():
        raise ValueError(f"JWT_ALGORITHM {algorithm} needs the 'cryptography' package")


def load_public_key(pem: bytes, algorithm: str) -> Any:
    """A PEM public key (or certificate) parsed for `algorithm`; private keys are reduced."""
    if algorithm in HMAC_ALGORITHMS:
        raise ValueError(f"a public key file needs an asymmetric JWT_ALGORITHM, not {algorithm}")
    try:
        key = get_default_algorithms()[algorithm].prepare_key(pem)
    except (jwt.InvalidKeyError, ValueError, TypeError) as exc:
        raise ValueError(f"JWT_PUBLIC_KEY_FILE is not a valid {algorithm} key: {exc}") from None
    if hasattr(key, "public_key") and not hasattr(key, "verify"):
        log.warning("JWT_PUBLIC_KEY_FILE holds a private key; only its public half is used")
        key = key.public_key()
    return key


class KeySource(Protocol):
    """Finds the key that verifies a token, by the token header's `kid`."""

    def cached_key(self, kid: str | None) -> Any:
        """Without I/O; raises UnknownKey or KeysUnavailable."""
        ...

    async def key(self, kid: str | None) -> Any:
        """May fetch (off the event loop); raises UnknownKey or KeysUnavailable."""
        ...

    async def start(self) -> None: ...


class StaticKey:
    """One key for every token: the HMAC secret or a PEM public key."""

    def __init__(self, key: Any) -> None:
        self._key = key

    def cached_key(self, kid: str | None) -> Any:
        return self._key

    async def key(self, kid: str | None) -> Any:
        return self._key

    async def start(self) -> None:
        return None


def _is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


class JwksKeys:
    """Keys of a JWKS document (a file, or a URL fetched in a worker thread and cached).

    The set is refetched when older than `cache_s` (a failed fetch is retried after `retry_s`)
    and when a token names an unknown `kid` (key rotation), but then not more often than every
    `min_refetch_s`, so that tokens with random `kid`s cannot make the service hammer the
    identity provider. When a refetch fails the previous keys stay in use; with none at all,
    requests get KeysUnavailable (503).
    """

    def __init__(
        self,
        location: str,
        algorithm: str,
        cache_s: float = 300.0,
        timeout_s: float = 5.0,
        min_refetch_s: float = 30.0,
        retry_s: float = 5.0,
    ) -> None:
        check_algorithm(algorithm)
        if algorithm in HMAC_ALGORITHMS:
            raise ValueError(f"JWT_JWKS_URL needs an asymmetric JWT_ALGORITHM, not {algorithm}")
        self.location = location
        self._algorithm = algorithm
        self._cache_s = cache_s
        self._timeout_s = timeout_s
        self._min_refetch_s = min_refetch_s
        self._retry_s = retry_s
        self._keys: dict[str | None, Any] | None = None
        self._fetched_at = float("-inf")
        self._attempted_at = float("-inf")
        self._lock: asyncio.Lock | None = None
        self.fetches = 0

    # --- loading --------------------------------------------------------------------------
    def _read(self) -> bytes:
        if _is_url(self.location):
            request = urllib.request.Request(
                self.location, headers={"Accept": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                return response.read(1_000_001)
        path = Path(self.location.removeprefix("file://"))
        return path.read_bytes()

    def _parse(self, raw: bytes) -> dict[str | None, Any]:
        document = json.loads(raw)
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ValueError("not a JWK set (no 'keys' list)")
        wanted_type = _KEY_TYPES[self._algorithm]
        keys: dict[str | None, Any] = {}
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("kty") != wanted_type:
                continue  # never an 'oct' (HMAC) key, never another family
            if entry.get("use", "sig") != "sig" or entry.get("alg", self._algorithm) != (
                self._algorithm
            ):
                continue
            try:
                jwk = jwt.PyJWK.from_dict(entry, algorithm=self._algorithm)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
                log.warning("JWKS %s: skipping a key that cannot be parsed", self.location)
                continue
            keys[jwk.key_id] = jwk.key
        if not keys:
            raise ValueError(f"no {self._algorithm} signing key in the JWK set")
        return keys

    def load(self) -> dict[str | None, Any]:
        """Read and parse the set (blocking; call in a worker thread)."""
        return self._parse(self._read())

    async def refresh(self) -> bool:
        """Fetch the set again, once even if many requests ask at the same time."""
        self._lock = self._lock or asyncio.Lock()
        started = time.monotonic()
        async with self._lock:
            if self._attempted_at >= started:
                return self._keys is not None  # another request just did it
            self._attempted_at = time.monotonic()
            self.fetches += 1
            try:
                keys = await asyncio.to_thread(self.load)
            except Exception as exc:
                log.error("JWKS %s could not be loaded: %s", self.location, exc)
                return False
            self._keys, self._fetched_at = keys, time.monotonic()
            log.info("JWKS %s: %d %s key(s) loaded", self.location, len(keys), self._algorithm)
            return True

    async def start(self) -> None:
        """Load the set at startup: a broken file is a configuration error, a URL may be down."""
        if not await self.refresh() and not _is_url(self.location):
            raise ValueError(f"JWT_JWKS_URL file {self.location} holds no usable key set")

    # --- lookup ---------------------------------------------------------------------------
    def cached_key(self, kid: str | None) -> Any:
        if self._keys is None:
            raise KeysUnavailable("the signing key set has not been loaded")
        if kid in self._keys:
            return self._keys[kid]
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        raise UnknownKey("unknown key id" if kid is not None else "no key id")

    async def key(self, kid: str | None) -> Any:
        now = time.monotonic()
        since_attempt = now - self._attempted_at
        outdated = self._keys is None or now - self._fetched_at > self._cache_s
        if outdated and since_attempt > self._retry_s:
            await self.refresh()
        try:
            return self.cached_key(kid)
        except UnknownKey:
            if kid is None or since_attempt <= self._min_refetch_s:
                raise
        await self.refresh()  # perhaps the keys were rotated
        return self.cached_key(kid)
