"""Transport-level security shared by the server and the client daemons.

One job per module: ``keys`` (X25519 + HKDF session keys), ``envelope`` (Fernet payload
encryption), ``signing`` (HMAC request signing, freshness, replay refusal), ``nonce_cache``
(the replay store), ``tokens`` (bearer tokens stored as keyed hashes). Nothing here knows
about HTTP libraries; the server and client adapt headers/bodies to these functions.
"""

from fl_common.crypto.envelope import Envelope, EnvelopeError, decrypt, encrypt
from fl_common.crypto.keys import (
    KeyAgreementError,
    KeyPair,
    SessionKeys,
    decode_public_key,
    derive_session_keys,
    encode_public_key,
    x25519_shared_secret,
)
from fl_common.crypto.nonce_cache import InMemoryNonceCache, NonceCache
from fl_common.crypto.signing import (
    DEFAULT_WINDOW_S,
    HEADER_CLIENT,
    HEADER_CONTENT_SHA256,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    SignatureError,
    canonical_string,
    sign_request,
    verify_request,
)
from fl_common.crypto.tokens import SessionToken, constant_time_equals, generate_token, hash_token, verify_token

__all__ = [
    "Envelope",
    "EnvelopeError",
    "encrypt",
    "decrypt",
    "KeyAgreementError",
    "KeyPair",
    "SessionKeys",
    "decode_public_key",
    "derive_session_keys",
    "encode_public_key",
    "x25519_shared_secret",
    "InMemoryNonceCache",
    "NonceCache",
    "DEFAULT_WINDOW_S",
    "HEADER_CLIENT",
    "HEADER_CONTENT_SHA256",
    "HEADER_NONCE",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "SignatureError",
    "canonical_string",
    "sign_request",
    "verify_request",
    "SessionToken",
    "constant_time_equals",
    "generate_token",
    "hash_token",
    "verify_token",
]
