"""Authenticated encryption of request/response payloads: Fernet, and AES-256-GCM for bulk bodies.

Why Fernet: it is AES-128-CBC + HMAC-SHA256 in encrypt-then-MAC form with a timestamp, from a
maintained library, with no nonce for us to get wrong. The timestamp gives a free freshness
check (``ttl``) so a captured ciphertext cannot be replayed forever, independent of the
request-level nonce check in ``signing.py``.

Why not Fernet for everything: a Fernet token is base64 text (+33 % on the wire) made by a serial
CBC pass and a separate HMAC pass. On a 5 MB body (a masked update; the cnn's 6.6 MB model) that is
~45 ms to seal and ~41 ms to open on this project's reference machine, against ~1.4 ms each for
AES-256-GCM (AES-NI + CLMUL, one pass, binary). A plain round moves one model to every client and
one update back; the secure round's masked update is 3x the int8 one; on two cores those passes
were a visible part of the round (benchmarks/results/fast_rounds/README.md). So payloads of
``BULK_THRESHOLD`` bytes or more are sealed as a *bulk token*:

    b"FLB1" | timestamp (8 bytes, big-endian seconds) | nonce (12 random bytes) | GCM(ciphertext + 16-byte tag)

with the magic and timestamp as associated data (so the age is authenticated exactly like Fernet's)
and the AES-256 key derived by HKDF-SHA256 from the Fernet key with its own label (key separation:
the bulk key is a PRF output, never the Fernet key itself). Random 96-bit nonces are safe far past
any number of messages one session or one model version seals (NIST SP 800-38D's 2^32 bound).
``open`` tells the two forms apart by their first bytes (a Fernet token starts with ``gAAAAA``,
base64 of its 0x80 version byte), so callers do not change and small control messages stay Fernet.

Every failure surfaces as ``EnvelopeError`` with a coarse ``reason`` ("invalid" or
"expired"); we never tell a caller *which* byte or MAC check failed.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fl_common.crypto.keys import SessionKeys

__all__ = ["BULK_MAGIC", "BULK_THRESHOLD", "EnvelopeError", "Envelope", "encrypt", "decrypt"]

#: Payloads of this many bytes or more are sealed with AES-256-GCM (see the module docstring); below
#: it Fernet's cost is under a millisecond and control messages keep the familiar token form.
BULK_THRESHOLD = 64 * 1024
#: First bytes of a bulk token; never the start of a Fernet token (base64 text beginning ``gAAAAA``).
BULK_MAGIC = b"FLB1"
_BULK_KEY_LABEL = b"fl-hub/envelope/bulk/aes-256-gcm/v1"
_NONCE_LEN = 12
_TAG_LEN = 16
_HEADER_LEN = len(BULK_MAGIC) + 8 + _NONCE_LEN
#: Fernet's own tolerance for tokens stamped in the future, applied to bulk tokens alike.
_MAX_CLOCK_SKEW = 60


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

    __slots__ = ("_fernet", "_key", "_bulk", "_clock")

    def __init__(self, fernet_key: bytes | SessionKeys, *, clock: Callable[[], float] = time.time) -> None:
        key = fernet_key.fernet_key if isinstance(fernet_key, SessionKeys) else fernet_key
        try:
            self._fernet = Fernet(key)
            self._key = base64.urlsafe_b64decode(key)
        except (ValueError, TypeError, binascii.Error):
            raise EnvelopeError("invalid_key") from None
        self._bulk: AESGCM | None = None  # derived on first bulk use: most envelopes seal one small message
        self._clock = clock

    def _bulk_cipher(self) -> AESGCM:
        if self._bulk is None:
            okm = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_BULK_KEY_LABEL).derive(self._key)
            self._bulk = AESGCM(okm)
        return self._bulk

    def seal(self, payload: bytes | bytearray | memoryview) -> bytes:
        """Encrypt and authenticate ``payload``: a Fernet token (ASCII) below ``BULK_THRESHOLD``, a binary bulk token from it on."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError("payload must be bytes")
        now = int(self._clock())
        if len(payload) < BULK_THRESHOLD:
            return self._fernet.encrypt_at_time(bytes(payload), now)
        header = BULK_MAGIC + now.to_bytes(8, "big")
        nonce = os.urandom(_NONCE_LEN)
        return header + nonce + self._bulk_cipher().encrypt(nonce, payload, header)

    def open(self, token: bytes | bytearray | memoryview | str, *, ttl: int | None = None) -> bytes:
        """Verify and decrypt; with ``ttl`` (seconds) also refuse tokens older than that."""
        if isinstance(token, str):
            token = token.encode("ascii", errors="replace")
        if bytes(token[:len(BULK_MAGIC)]) == BULK_MAGIC:
            return self._open_bulk(token, ttl)
        token = bytes(token)
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

    def _open_bulk(self, token: bytes | bytearray | memoryview, ttl: int | None) -> bytes:
        if len(token) < _HEADER_LEN + _TAG_LEN:
            raise EnvelopeError("invalid")
        view = memoryview(token)
        header, nonce = bytes(view[:len(BULK_MAGIC) + 8]), bytes(view[len(BULK_MAGIC) + 8:_HEADER_LEN])
        try:
            payload = self._bulk_cipher().decrypt(nonce, view[_HEADER_LEN:], header)
        except InvalidTag:
            raise EnvelopeError("invalid") from None
        if ttl is not None:  # the timestamp is authenticated: checked only after the tag, like Fernet's
            stamped, now = int.from_bytes(header[len(BULK_MAGIC):], "big"), int(self._clock())
            if stamped + int(ttl) < now or now + _MAX_CLOCK_SKEW < stamped:
                raise EnvelopeError("expired")
        return payload

    def __repr__(self) -> str:
        return "Envelope(key=<redacted>)"


def encrypt(fernet_key: bytes | SessionKeys, payload: bytes) -> bytes:
    """One-shot ``Envelope(key).seal(payload)``."""
    return Envelope(fernet_key).seal(payload)


def decrypt(fernet_key: bytes | SessionKeys, token: bytes | str, *, ttl: int | None = None) -> bytes:
    """One-shot ``Envelope(key).open(token, ttl=ttl)``."""
    return Envelope(fernet_key).open(token, ttl=ttl)
