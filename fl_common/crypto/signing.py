"""HMAC-SHA256 request signing and verification (authenticity, integrity, freshness, no replay).

Canonical string (UTF-8, fields joined by "\\n", none may contain "\\n")::

    FL-HMAC-SHA256-v1
    <METHOD upper-case>
    <path including "?query" exactly as sent; a bare trailing "?" is dropped>
    <timestamp: integer Unix seconds>
    <nonce>
    <hex sha256 of the raw body bytes>
    <client id>

Why each field: method+path stop a signed GET being replayed as a DELETE or against another
endpoint; the body hash binds the payload without putting it in the string; timestamp+nonce give
freshness and single use; the client id binds the request to the key that signed it. The version
line lets us change the format without ambiguity.

Server side (Flask): pass ``request.path`` plus ``"?" + request.query_string.decode()`` when a
query is present (``request.full_path`` also works: its trailing "?" is normalised away), and
``request.get_data()`` as the body. Client side (requests): sign ``PreparedRequest.path_url``
so the path is byte-identical to what goes on the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Mapping

from fl_common.crypto.nonce_cache import NonceCache

__all__ = [
    "SignatureError",
    "HEADER_CLIENT",
    "HEADER_TIMESTAMP",
    "HEADER_NONCE",
    "HEADER_SIGNATURE",
    "HEADER_CONTENT_SHA256",
    "DEFAULT_WINDOW_S",
    "canonical_string",
    "sign_request",
    "verify_request",
]

HEADER_CLIENT = "X-FL-Client"
HEADER_TIMESTAMP = "X-FL-Timestamp"
HEADER_NONCE = "X-FL-Nonce"
HEADER_SIGNATURE = "X-FL-Signature"
HEADER_CONTENT_SHA256 = "X-FL-Content-SHA256"
_REQUIRED = (HEADER_CLIENT, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE, HEADER_CONTENT_SHA256)

DEFAULT_WINDOW_S = 300
_VERSION = "FL-HMAC-SHA256-v1"
# Nonces are client-chosen and stored server-side, so bound their size and alphabet.
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")
_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")

KeyLookup = Callable[[str], "bytes | None"]


class SignatureError(Exception):
    """A request failed verification. ``reason`` is machine-readable and safe to return:

    "missing_header", "malformed_header", "body_hash_mismatch", "bad_signature",
    "stale_timestamp", "replayed_nonce". An unknown client id is reported as "bad_signature"
    so that verification does not reveal which client ids exist.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"request signature rejected: {reason}")
        self.reason = reason


def _normalise_path(path: str) -> str:
    return path[:-1] if path.endswith("?") else path


def canonical_string(method: str, path: str, timestamp: str, nonce: str, body_sha256_hex: str, client_id: str) -> str:
    """The exact text that is MACed; exposed so other-language clients can be tested against it."""
    fields = (_VERSION, method.upper(), _normalise_path(path), timestamp, nonce, body_sha256_hex, client_id)
    if any("\n" in f or "\r" in f for f in fields):
        raise ValueError("signed fields must not contain line breaks")
    return "\n".join(fields)


def _mac(key: bytes, canonical: str) -> str:
    return hmac.new(key, canonical.encode("utf-8"), hashlib.sha256).hexdigest()


def sign_request(
    method: str,
    path: str,
    body: bytes,
    *,
    client_id: str,
    hmac_key: bytes,
    timestamp: int | None = None,
    nonce: str | None = None,
    clock: Callable[[], float] = time.time,
) -> dict[str, str]:
    """Headers to add to a request. ``timestamp``/``nonce`` are injectable only for tests."""
    if not client_id:
        raise ValueError("client_id must be non-empty")
    ts = str(int(clock()) if timestamp is None else int(timestamp))
    nonce = secrets.token_urlsafe(16) if nonce is None else nonce
    if not _NONCE_RE.fullmatch(nonce):
        raise ValueError("nonce must be 16-64 urlsafe characters")
    body_hash = hashlib.sha256(body or b"").hexdigest()
    signature = _mac(hmac_key, canonical_string(method, path, ts, nonce, body_hash, client_id))
    return {
        HEADER_CLIENT: client_id,
        HEADER_TIMESTAMP: ts,
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: signature,
        HEADER_CONTENT_SHA256: body_hash,
    }


def verify_request(
    method: str,
    path: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    hmac_key: bytes | KeyLookup,
    nonce_cache: NonceCache,
    window_s: int = DEFAULT_WINDOW_S,
    clock: Callable[[], float] = time.time,
) -> str:
    """Verify a signed request and return its authenticated client id, or raise ``SignatureError``.

    ``hmac_key`` is either the key itself or a lookup ``client_id -> key | None`` (the server's
    session table). Check order matters: the nonce is recorded only after the MAC and timestamp
    pass, so unauthenticated traffic can neither fill the nonce cache nor burn a client's nonce.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    values = {}
    for name in _REQUIRED:
        value = lower.get(name.lower())
        if not value:
            raise SignatureError("missing_header")
        values[name] = value.strip()
    client_id = values[HEADER_CLIENT]
    ts_text, nonce = values[HEADER_TIMESTAMP], values[HEADER_NONCE]
    signature, claimed_hash = values[HEADER_SIGNATURE].lower(), values[HEADER_CONTENT_SHA256].lower()
    if not (_TIMESTAMP_RE.fullmatch(ts_text) and _NONCE_RE.fullmatch(nonce) and _HEX64_RE.fullmatch(claimed_hash)):
        raise SignatureError("malformed_header")

    actual_hash = hashlib.sha256(body or b"").hexdigest()
    if not hmac.compare_digest(actual_hash, claimed_hash):
        raise SignatureError("body_hash_mismatch")

    try:
        canonical = canonical_string(method, path, ts_text, nonce, actual_hash, client_id)
    except ValueError:
        raise SignatureError("malformed_header") from None
    key = hmac_key(client_id) if callable(hmac_key) else hmac_key
    # Compute a MAC even for unknown clients so timing does not reveal whether the id exists.
    expected = _mac(key or b"\x00" * 32, canonical)
    if not hmac.compare_digest(expected.encode("ascii"), signature.encode("ascii", errors="replace")) or not key:
        raise SignatureError("bad_signature")

    now = clock()
    ts = int(ts_text)
    if abs(now - ts) > window_s:
        raise SignatureError("stale_timestamp")
    # After ts + window the timestamp check refuses the request, so the nonce can be forgotten.
    if nonce_cache.seen_or_add(client_id, nonce, float(ts + window_s + 1)):
        raise SignatureError("replayed_nonce")
    return client_id
