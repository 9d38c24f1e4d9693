"""X25519 key agreement turned into the two symmetric keys a client and the server share.

Why two keys from one agreement: Fernet already authenticates its ciphertexts, but request
signing (``signing.py``) needs an HMAC key too, and using one key for two purposes couples
their security. HKDF stretches the single X25519 shared secret into independent keys.

Why the HKDF ``info`` binds both public keys and the client id: a shared secret alone does not
say *who* agreed on it. Binding the transcript (client key, server key, client id) into the
derivation means that a key derived for one (client, server, id) triple is useless for any
other, which defeats unknown-key-share and key-substitution tricks at no cost.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass
from typing import Literal

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "KeyAgreementError",
    "KeyPair",
    "SessionKeys",
    "PUBLIC_KEY_LEN",
    "MIN_SALT_LEN",
    "encode_public_key",
    "decode_public_key",
    "x25519_shared_secret",
    "derive_session_keys",
]

PUBLIC_KEY_LEN = 32
MIN_SALT_LEN = 16
_SESSION_INFO_LABEL = b"fl-hub/v1/session-keys"
_ZERO_SECRET = bytes(32)


class KeyAgreementError(ValueError):
    """A peer public key was malformed or produced a degenerate shared secret.

    Messages never contain key material: they are safe to log and to return to a client.
    """


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii")


def _b64d(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise KeyAgreementError("public key is not valid urlsafe base64") from None


def encode_public_key(public_key: X25519PublicKey) -> str:
    """Raw 32 public-key bytes as urlsafe base64: compact, JSON- and header-safe."""
    return _b64e(public_key.public_bytes_raw())


def decode_public_key(encoded: str | bytes) -> X25519PublicKey:
    """Parse a peer public key (urlsafe base64 text, or the 32 raw bytes) and check its length.

    Length is checked here because ``from_public_bytes`` error text varies by backend and we
    want one stable, secret-free error type for the HTTP layer to map to a 400.
    """
    raw = encoded if isinstance(encoded, bytes) else _b64d(encoded)
    if len(raw) != PUBLIC_KEY_LEN:
        raise KeyAgreementError("public key must be exactly 32 bytes")
    try:
        return X25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise KeyAgreementError("public key rejected") from None


def x25519_shared_secret(private_key: X25519PrivateKey, peer_public: X25519PublicKey | str | bytes) -> bytes:
    """Raw X25519 shared secret, refusing low-order peer keys.

    A low-order point (e.g. all zeros) forces the shared secret to zero whatever our private key
    is, so an attacker would know the "secret". OpenSSL already refuses that; the explicit
    check keeps the guarantee if the backend ever changes. The result is NOT a key: always pass
    it through a KDF (``derive_session_keys`` or the SecAgg mask derivation).
    """
    peer = peer_public if isinstance(peer_public, X25519PublicKey) else decode_public_key(peer_public)
    try:
        secret = private_key.exchange(peer)
    except ValueError:
        raise KeyAgreementError("key agreement failed: peer public key is degenerate") from None
    if hmac.compare_digest(secret, _ZERO_SECRET):
        raise KeyAgreementError("key agreement failed: peer public key is degenerate")
    return secret


@dataclass(frozen=True, repr=False)
class KeyPair:
    """An X25519 key pair. The private half never appears in ``repr`` or logs."""

    private_key: X25519PrivateKey

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        """Restore a persisted key (32 raw bytes), e.g. from a daemon's 0600 key file."""
        if len(raw) != 32:
            raise KeyAgreementError("private key must be exactly 32 bytes")
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        """The 32 raw private bytes, for persistence or for Shamir sharing in SecAgg. Handle with care."""
        return self.private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @property
    def public_key(self) -> X25519PublicKey:
        return self.private_key.public_key()

    @property
    def public_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes_raw()

    @property
    def public_b64(self) -> str:
        return _b64e(self.public_bytes)

    def __repr__(self) -> str:
        return f"KeyPair(public={self.public_b64}, private=<redacted>)"


@dataclass(frozen=True, repr=False, eq=False)
class SessionKeys:
    """Per-session symmetric keys: ``fernet_key`` (payload encryption) and ``hmac_key`` (signing).

    ``fernet_key`` is already in Fernet's urlsafe-base64 form so it can be handed straight to
    ``Envelope``; ``hmac_key`` is 32 raw bytes. Both are secrets: ``repr`` redacts them, and
    ``==`` is disabled (identity only) so nobody compares keys with a non-constant-time check.
    """

    fernet_key: bytes
    hmac_key: bytes

    def __repr__(self) -> str:
        return "SessionKeys(fernet_key=<redacted>, hmac_key=<redacted>)"


def _len_prefixed(*parts: bytes) -> bytes:
    # Length prefixes make the encoding injective: ("ab", "c") and ("a", "bc") differ.
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def derive_session_keys(
    own: KeyPair,
    peer_public: X25519PublicKey | str | bytes,
    *,
    client_id: str,
    salt: bytes,
    role: Literal["client", "server"],
) -> SessionKeys:
    """Both sides call this and get identical ``SessionKeys``.

    ``role`` says which public key is the client's, so both sides build the same ``info``
    (client key first, then server key, then the client id). ``salt`` must be shared and at
    least 16 bytes; the server should pick it at random per handshake and send it with its
    public key, so two handshakes between the same key pairs still give unrelated keys.
    """
    if role not in ("client", "server"):
        raise ValueError("role must be 'client' or 'server'")
    if not isinstance(salt, bytes) or len(salt) < MIN_SALT_LEN:
        raise ValueError(f"salt must be at least {MIN_SALT_LEN} bytes")
    if not client_id:
        raise ValueError("client_id must be non-empty")
    peer = peer_public if isinstance(peer_public, X25519PublicKey) else decode_public_key(peer_public)
    shared = x25519_shared_secret(own.private_key, peer)
    own_pub, peer_pub = own.public_bytes, peer.public_bytes_raw()
    if hmac.compare_digest(own_pub, peer_pub):
        raise KeyAgreementError("peer public key equals our own")
    client_pub, server_pub = (own_pub, peer_pub) if role == "client" else (peer_pub, own_pub)
    info = _SESSION_INFO_LABEL + _len_prefixed(client_pub, server_pub, client_id.encode("utf-8"))
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=info).derive(shared)
    return SessionKeys(fernet_key=base64.urlsafe_b64encode(okm[:32]), hmac_key=okm[32:])
