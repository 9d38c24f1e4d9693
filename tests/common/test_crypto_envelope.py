"""Fernet envelopes: round trip, tampering, wrong key, TTL."""

from __future__ import annotations

import base64

import pytest
from cryptography.fernet import Fernet

from fl_common.crypto import Envelope, EnvelopeError, decrypt, encrypt

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
