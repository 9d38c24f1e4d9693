"""Authenticated encryption of request/response payloads with Fernet.

Why Fernet: it is AES-128-CBC + HMAC-SHA256 in encrypt-then-MAC form with a timestamp, from a
maintained library, with no nonce for us to get wrong. The timestamp gives a free freshness
check (``ttl``) so a captured ciphertext cannot be replayed forever, independent of the
request-level nonce check in ``signing.py``.

Every failure surfaces as ``EnvelopeError`` with a coarse ``reason`` ("invalid" or
"expired"); we never tell a caller *which* byte or MAC check failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cryptography.fernet import Fernet, InvalidToken

from fl_common.crypto.keys import SessionKeys

__all__ = ["EnvelopeError", "Envelope", "encrypt", "decrypt"]


class EnvelopeError(Exception):
    """A ciphertext could not be opened.

    ``reason`` is "invalid" (tampered, truncated, wrong key, not a Fernet token) or "expired"
    (authentic, but older than the TTL or too far in the future).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"envelope rejected: {reason}")
        self.reason = reason


class Envelope:
    """Seal/open bytes under one Fernet key; ``clock`` is injectable so TTL tests need no sleep."""

    __slots__ = ("_fernet", "_clock")

    def __init__(self, fernet_key: bytes | SessionKeys, *, clock: Callable[[], float] = time.time) -> None:
        key = fernet_key.fernet_key if isinstance(fernet_key, SessionKeys) else fernet_key
        try:
            self._fernet = Fernet(key)
        except (ValueError, TypeError):
            raise EnvelopeError("invalid_key") from None
        self._clock = clock

    def seal(self, payload: bytes) -> bytes:
        """Encrypt and authenticate ``payload``; the result is urlsafe-base64 ASCII bytes."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError("payload must be bytes")
        return self._fernet.encrypt_at_time(bytes(payload), int(self._clock()))

    def open(self, token: bytes | str, *, ttl: int | None = None) -> bytes:
        """Verify and decrypt; with ``ttl`` (seconds) also refuse tokens older than that."""
        if isinstance(token, str):
            token = token.encode("ascii", errors="replace")
        try:
            if ttl is None:
                return self._fernet.decrypt(token)
            return self._fernet.decrypt_at_time(token, ttl=int(ttl), current_time=int(self._clock()))
        except InvalidToken:
            pass
        # Fernet reports expiry and tampering alike. ``extract_timestamp`` verifies the MAC
        # first, so succeeding here proves the token is authentic and only its age was wrong.
        if ttl is not None:
            try:
                self._fernet.extract_timestamp(token)
            except InvalidToken:
                pass
            else:
                raise EnvelopeError("expired")
        raise EnvelopeError("invalid")

    def __repr__(self) -> str:
        return "Envelope(key=<redacted>)"


def encrypt(fernet_key: bytes | SessionKeys, payload: bytes) -> bytes:
    """One-shot ``Envelope(key).seal(payload)``."""
    return Envelope(fernet_key).seal(payload)


def decrypt(fernet_key: bytes | SessionKeys, token: bytes | str, *, ttl: int | None = None) -> bytes:
    """One-shot ``Envelope(key).open(token, ttl=ttl)``."""
    return Envelope(fernet_key).open(token, ttl=ttl)
