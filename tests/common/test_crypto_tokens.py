"""Bearer tokens: entropy, keyed hashing, constant-time verification, expiry, redaction."""

from __future__ import annotations

import pytest

from fl_common.crypto import SessionToken, constant_time_equals, generate_token, hash_token, verify_token

PEPPER = b"p" * 32


def test_generate_token_entropy_and_uniqueness() -> None:
    tokens = {generate_token() for _ in range(200)}
    assert len(tokens) == 200
    assert all(len(t) >= 43 for t in tokens)  # 32 bytes -> 43 urlsafe chars
    with pytest.raises(ValueError):
        generate_token(8)


def test_hash_and_verify() -> None:
    token = generate_token()
    stored = hash_token(token, PEPPER)
    assert token not in stored
    assert verify_token(token, stored, PEPPER)
    assert not verify_token(generate_token(), stored, PEPPER)
    assert not verify_token(token, stored, b"q" * 32)  # different pepper
    assert not verify_token("", stored, PEPPER)
    assert not verify_token(token, "", PEPPER)
    assert hash_token(token, PEPPER) == stored  # deterministic: usable as a DB lookup key
    with pytest.raises(ValueError):
        hash_token(token, b"short")


def test_constant_time_equals() -> None:
    assert constant_time_equals("enroll-secret", "enroll-secret")
    assert constant_time_equals(b"abc", "abc")
    assert not constant_time_equals("enroll-secret", "enroll-secreT")
    assert not constant_time_equals("a", "ab")
    assert constant_time_equals("ünïcode", "ünïcode")


def test_session_token_expiry_and_repr() -> None:
    tok = SessionToken.issue("client-1", ttl_s=60, clock=lambda: 1000.0)
    assert tok.expires_at == 1060.0 and not tok.is_expired(1059.9) and tok.is_expired(1060.0)
    assert verify_token(tok.token, tok.hashed(PEPPER), PEPPER)
    assert tok.token not in repr(tok) and tok.token not in str(tok)
    assert "client-1" in repr(tok)
