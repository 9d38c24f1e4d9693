"""Who said what in a SecAgg round: per-client signatures on protocol messages.

Why messages are signed at all: SecAgg's privacy rests on every client masking with the *real*
public keys of its neighbours. If whoever relays the keys (the server, or anyone on the path)
could substitute its own key for a neighbour's, it could compute that pairwise mask and, with
the self mask revealed at unmasking, remove all of a victim's masks. Signing the advertised
keys stops substitution by anyone who does not hold the signing key.

Two schemes, one interface:

* ``ed25519`` (the default): each client holds an Ed25519 signing key; its *verifying* key is
  registered with the server and shipped in the round's roster, so every client can check every
  neighbour's signature itself. Against a **malicious server** this helps only if the clients
  get each other's verifying keys from somewhere the server cannot alter (a PKI: certificates
  from the enrollment authority, or keys pinned out of band — pass them as
  ``trusted_verify_keys`` to the client). Keys that come from the server's own roster defend
  against network attackers and other clients, not against the server itself.
* ``hmac-sha256``: the per-client HMAC key a client shares with the server since registration.
  The server verifies each client, then vouches for the roster with a tag under each recipient's
  key. The server holds every key, so **the server itself could forge any advertisement**: this
  mode assumes an honest-but-curious server and protects only against third parties.

Both give a coarse, secret-free error: ``verify`` returns False, never says why.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["ED25519", "HMAC_SHA256", "AUTH_SCHEMES", "SigningIdentity", "Verifier"]

ED25519 = "ed25519"
HMAC_SHA256 = "hmac-sha256"
AUTH_SCHEMES = (ED25519, HMAC_SHA256)
_MIN_HMAC_KEY = 16


@dataclass(frozen=True, repr=False, eq=False)
class SigningIdentity:
    """A client's signing key for one scheme. Secret: never printed, compared only by identity."""

    scheme: str
    _ed25519: Ed25519PrivateKey | None = None
    _hmac_key: bytes | None = None

    @classmethod
    def generate_ed25519(cls) -> SigningIdentity:
        """A fresh long-term Ed25519 key (a daemon persists ``private_bytes()`` in its state dir)."""
        return cls(ED25519, _ed25519=Ed25519PrivateKey.generate())

    @classmethod
    def ed25519(cls, private_bytes: bytes) -> SigningIdentity:
        if not isinstance(private_bytes, (bytes, bytearray)) or len(private_bytes) != 32:
            raise ValueError("an Ed25519 private key is exactly 32 bytes")
        return cls(ED25519, _ed25519=Ed25519PrivateKey.from_private_bytes(bytes(private_bytes)))

    @classmethod
    def hmac(cls, auth_key: bytes) -> SigningIdentity:
        """The client's per-client HMAC key from registration (see the module docstring for what it cannot do)."""
        if not isinstance(auth_key, (bytes, bytearray)) or len(auth_key) < _MIN_HMAC_KEY:
            raise ValueError(f"auth_key must be at least {_MIN_HMAC_KEY} bytes")
        return cls(HMAC_SHA256, _hmac_key=bytes(auth_key))

    def sign(self, data: bytes) -> bytes:
        if self.scheme == ED25519:
            assert self._ed25519 is not None
            return self._ed25519.sign(data)
        assert self._hmac_key is not None
        return hmac.new(self._hmac_key, data, hashlib.sha256).digest()

    @property
    def verify_key(self) -> bytes:
        """What goes into the roster: the raw Ed25519 public key; empty for HMAC (nothing a peer could use)."""
        if self.scheme == ED25519:
            assert self._ed25519 is not None
            return self._ed25519.public_key().public_bytes_raw()
        return b""

    def verifier(self) -> Verifier:
        """What the server registers for this client."""
        if self.scheme == ED25519:
            return Verifier(ED25519, self.verify_key)
        assert self._hmac_key is not None
        return Verifier(HMAC_SHA256, self._hmac_key)

    def private_bytes(self) -> bytes:
        """The raw secret, for persistence by its owner only."""
        if self.scheme == ED25519:
            assert self._ed25519 is not None
            from cryptography.hazmat.primitives import serialization

            return self._ed25519.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                               serialization.NoEncryption())
        assert self._hmac_key is not None
        return self._hmac_key

    def __repr__(self) -> str:
        return f"SigningIdentity(scheme={self.scheme}, key=<redacted>)"


@dataclass(frozen=True, repr=False, eq=False)
class Verifier:
    """Checks one client's signatures: an Ed25519 public key, or (HMAC) the shared key itself."""

    scheme: str
    key: bytes

    def __post_init__(self) -> None:
        if self.scheme not in AUTH_SCHEMES:
            raise ValueError(f"unknown signature scheme {self.scheme!r}: allowed {', '.join(AUTH_SCHEMES)}")
        if self.scheme == ED25519 and len(self.key) != 32:
            raise ValueError("an Ed25519 verifying key is exactly 32 bytes")
        if self.scheme == HMAC_SHA256 and len(self.key) < _MIN_HMAC_KEY:
            raise ValueError(f"an HMAC key is at least {_MIN_HMAC_KEY} bytes")

    def verify(self, data: bytes, signature: bytes) -> bool:
        if not isinstance(signature, (bytes, bytearray)):
            return False
        if self.scheme == ED25519:
            try:
                Ed25519PublicKey.from_public_bytes(self.key).verify(bytes(signature), data)
            except (InvalidSignature, ValueError):
                return False
            return True
        expected = hmac.new(self.key, data, hashlib.sha256).digest()
        return hmac.compare_digest(expected, bytes(signature))

    def tag(self, data: bytes) -> bytes:
        """HMAC mode: the server's tag *to* this client (it vouches for the roster it forwards)."""
        if self.scheme != HMAC_SHA256:
            raise ValueError("only the HMAC scheme has server tags; Ed25519 rosters are checked peer to peer")
        return hmac.new(self.key, b"server-tag|" + data, hashlib.sha256).digest()

    def __repr__(self) -> str:
        shown = self.key.hex()[:16] + "..." if self.scheme == ED25519 else "<redacted>"
        return f"Verifier(scheme={self.scheme}, key={shown})"


def check_server_tag(auth_key_identity: SigningIdentity, data: bytes, tag: bytes) -> bool:
    """Client side of :meth:`Verifier.tag` (HMAC mode)."""
    if auth_key_identity.scheme != HMAC_SHA256 or not isinstance(tag, (bytes, bytearray)):
        return False
    assert auth_key_identity._hmac_key is not None
    expected = hmac.new(auth_key_identity._hmac_key, b"server-tag|" + data, hashlib.sha256).digest()
    return hmac.compare_digest(expected, bytes(tag))
