"""Envelopes: round trip, tampering, wrong key, TTL, for Fernet tokens and AES-256-GCM bulk tokens."""

from __future__ import annotations

import base64

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fl_common.crypto import Envelope, EnvelopeError, decrypt, encrypt
from fl_common.crypto.envelope import BULK_MAGIC, BULK_THRESHOLD

KEY = Fernet.generate_key()


def test_round_trip() -> None:
    payload = bytes(range(256)) * 10
    assert decrypt(KEY, encrypt(KEY, payload)) == payload
    assert decrypt(KEY, encrypt(KEY, b"")) == b""


def test_tampered_token_rejected() -> None:
    raw = base64.urlsafe_b64decode(encrypt(KEY, b"weights"))
    # version byte, timestamp, IV, ciphertext, MAC: a flipped bit anywhere is refused
    for pos in (0, 3, 12, 30, len(raw) - 1):
        bad = bytearray(raw)
        bad[pos] ^= 0x01
        with pytest.raises(EnvelopeError) as exc:
            decrypt(KEY, base64.urlsafe_b64encode(bytes(bad)))
        assert exc.value.reason == "invalid"
    with pytest.raises(EnvelopeError):
        decrypt(KEY, base64.urlsafe_b64encode(raw[:-10]))
    with pytest.raises(EnvelopeError):
        decrypt(KEY, b"garbage")


def test_wrong_key_rejected() -> None:
    with pytest.raises(EnvelopeError) as exc:
        decrypt(Fernet.generate_key(), encrypt(KEY, b"weights"))
    assert exc.value.reason == "invalid"


def test_ttl_expiry_with_injected_clock() -> None:
    now = [1_000_000.0]
    env = Envelope(KEY, clock=lambda: now[0])
    token = env.seal(b"x")
    now[0] += 30
    assert env.open(token, ttl=60) == b"x"
    now[0] += 31
    with pytest.raises(EnvelopeError) as exc:
        env.open(token, ttl=60)
    assert exc.value.reason == "expired"
    assert env.open(token) == b"x"  # no TTL requested -> age not checked


def test_repr_and_errors_hide_key() -> None:
    env = Envelope(KEY)
    assert KEY.decode() not in repr(env)
    with pytest.raises(EnvelopeError) as exc:
        env.open(b"garbage")
    assert KEY.decode() not in str(exc.value)
    with pytest.raises(EnvelopeError):
        Envelope(b"not-a-fernet-key")


# --- bulk bodies: AES-256-GCM from BULK_THRESHOLD bytes on ---------------------------------------------


BIG = bytes(range(256)) * (BULK_THRESHOLD // 256)  # exactly the threshold: the first size sealed as bulk


def test_the_threshold_picks_the_form() -> None:
    small, big = encrypt(KEY, BIG[:-1]), encrypt(KEY, BIG)
    assert small.startswith(b"gAAAAA") and Fernet(KEY).decrypt(small) == BIG[:-1]
    assert big.startswith(BULK_MAGIC) and len(big) == len(BIG) + 4 + 8 + 12 + 16  # binary: no base64 growth
    assert decrypt(KEY, big) == BIG and decrypt(KEY, bytearray(big)) == BIG and decrypt(KEY, memoryview(big)) == BIG


def test_bulk_tokens_use_a_fresh_nonce_and_a_derived_key() -> None:
    a, b = encrypt(KEY, BIG), encrypt(KEY, BIG)
    assert a[12:24] != b[12:24] and a[24:] != b[24:]
    raw_fernet_key = base64.urlsafe_b64decode(KEY)
    with pytest.raises(InvalidTag):  # the Fernet key itself never encrypts bulk bodies
        AESGCM(raw_fernet_key).decrypt(a[12:24], a[24:], a[:12])


def test_tampered_bulk_token_rejected() -> None:
    token = encrypt(KEY, BIG)
    # magic is the format switch (a flip there makes it an invalid Fernet token); timestamp, nonce,
    # ciphertext and tag are authenticated
    for pos in (0, 3, 4, 11, 12, 23, 24, len(token) // 2, len(token) - 1):
        bad = bytearray(token)
        bad[pos] ^= 0x01
        with pytest.raises(EnvelopeError) as exc:
            decrypt(KEY, bytes(bad))
        assert exc.value.reason == "invalid"
    for cut in (token[:-1], token[:40], token[:4]):
        with pytest.raises(EnvelopeError) as exc:
            decrypt(KEY, cut)
        assert exc.value.reason == "invalid"
    with pytest.raises(EnvelopeError):
        decrypt(Fernet.generate_key(), token)


def test_bulk_ttl_and_clock_skew_like_fernet() -> None:
    now = [1_000_000.0]
    env = Envelope(KEY, clock=lambda: now[0])
    token = env.seal(BIG)
    now[0] += 60
    assert env.open(token, ttl=60) == BIG
    now[0] += 1
    with pytest.raises(EnvelopeError) as exc:
        env.open(token, ttl=60)
    assert exc.value.reason == "expired"
    assert env.open(token) == BIG
    future = Envelope(KEY, clock=lambda: now[0] + 61).seal(BIG)  # stamped beyond Fernet's 60 s skew
    with pytest.raises(EnvelopeError) as exc:
        env.open(future, ttl=3600)
    assert exc.value.reason == "expired"
