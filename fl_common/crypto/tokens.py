"""Bearer tokens: generation, storage as keyed hashes, constant-time checks, expiry.

Why a *fast* keyed hash (HMAC-SHA256 with a server-side pepper) and not bcrypt/scrypt/argon2:
slow KDFs exist because passwords are low-entropy, so an attacker holding the hash table can
guess them offline; slowness multiplies the cost of each guess. Our tokens are 256 bits from
``secrets``, so guessing is hopeless at any hash speed, and a slow KDF would only add latency
to every authenticated request. The pepper (kept outside the database, e.g. in the server's
secret config) means a leaked table alone cannot even be used to test candidate tokens.
Passwords, if ever added, must NOT use this module: they need a slow, salted KDF.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "TOKEN_BYTES",
    "MIN_PEPPER_LEN",
    "generate_token",
    "hash_token",
    "verify_token",
    "constant_time_equals",
    "SessionToken",
]

TOKEN_BYTES = 32
MIN_PEPPER_LEN = 16
_HASH_PREFIX = "hmac-sha256:"  # lets a future scheme coexist with stored hashes of this one


def generate_token(nbytes: int = TOKEN_BYTES) -> str:
    """A urlsafe token with ``nbytes`` of entropy (default 256 bits)."""
    if nbytes < 16:
        raise ValueError("tokens need at least 128 bits of entropy")
    return secrets.token_urlsafe(nbytes)


def _check_pepper(pepper: bytes) -> None:
    if not isinstance(pepper, bytes) or len(pepper) < MIN_PEPPER_LEN:
        raise ValueError(f"pepper must be at least {MIN_PEPPER_LEN} bytes")


def hash_token(token: str, pepper: bytes) -> str:
    """What to store instead of the token: ``"hmac-sha256:" + hex(HMAC(pepper, token))``."""
    _check_pepper(pepper)
    return _HASH_PREFIX + hmac.new(pepper, token.encode("utf-8"), hashlib.sha256).hexdigest()


def verify_token(token: str, stored_hash: str, pepper: bytes) -> bool:
    """Constant-time check of a presented token against a stored hash."""
    if not token or not stored_hash:
        return False
    return hmac.compare_digest(hash_token(token, pepper).encode("ascii"), stored_hash.encode("utf-8"))


def constant_time_equals(a: str | bytes, b: str | bytes) -> bool:
    """Compare two secrets (e.g. the enrollment token) without leaking where they differ.

    Both sides are SHA-256'd first so the comparison also hides the secret's length, and so
    non-ASCII ``str`` input (which ``hmac.compare_digest`` refuses) works.
    """
    ab = a.encode("utf-8") if isinstance(a, str) else bytes(a)
    bb = b.encode("utf-8") if isinstance(b, str) else bytes(b)
    return hmac.compare_digest(hashlib.sha256(ab).digest(), hashlib.sha256(bb).digest())


@dataclass(frozen=True, repr=False)
class SessionToken:
    """A freshly issued bearer token. Hand ``token`` to the client once; store ``hash_token``."""

    client_id: str
    token: str
    issued_at: float
    expires_at: float

    @classmethod
    def issue(cls, client_id: str, ttl_s: float, *, clock: Callable[[], float] = time.time) -> SessionToken:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        now = clock()
        return cls(client_id=client_id, token=generate_token(), issued_at=now, expires_at=now + ttl_s)

    def is_expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at

    def hashed(self, pepper: bytes) -> str:
        return hash_token(self.token, pepper)

    def __repr__(self) -> str:
        return (
            f"SessionToken(client_id={self.client_id!r}, token=<redacted>, "
            f"issued_at={self.issued_at}, expires_at={self.expires_at})"
        )
