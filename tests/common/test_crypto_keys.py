"""X25519 + HKDF session keys: agreement, binding, validation, redaction."""

from __future__ import annotations

import base64

import pytest

from fl_common.crypto import KeyAgreementError, KeyPair, SessionKeys, decode_public_key, derive_session_keys

SALT = b"\x01" * 16


def _pair(seed: int) -> KeyPair:
    return KeyPair.from_private_bytes(bytes([seed]) * 32)


def test_both_sides_derive_identical_keys() -> None:
    client, server = _pair(1), _pair(2)
    c = derive_session_keys(client, server.public_b64, client_id="c-1", salt=SALT, role="client")
    s = derive_session_keys(server, client.public_b64, client_id="c-1", salt=SALT, role="server")
    assert c.fernet_key == s.fernet_key and c.hmac_key == s.hmac_key
    assert len(base64.urlsafe_b64decode(c.fernet_key)) == 32 and len(c.hmac_key) == 32
    assert base64.urlsafe_b64decode(c.fernet_key) != c.hmac_key  # independent keys


def test_keys_bound_to_client_id_salt_keys_and_roles() -> None:
    server = _pair(2)
    base = derive_session_keys(_pair(1), server.public_b64, client_id="c-1", salt=SALT, role="client")
    others = [
        derive_session_keys(_pair(1), server.public_b64, client_id="c-2", salt=SALT, role="client"),
        derive_session_keys(_pair(3), server.public_b64, client_id="c-1", salt=SALT, role="client"),
        derive_session_keys(_pair(1), server.public_b64, client_id="c-1", salt=b"\x02" * 16, role="client"),
        # same shared secret, swapped roles -> different transcript -> different keys
        derive_session_keys(_pair(1), server.public_b64, client_id="c-1", salt=SALT, role="server"),
    ]
    for o in others:
        assert o.fernet_key != base.fernet_key and o.hmac_key != base.hmac_key


def test_public_key_roundtrip_and_validation() -> None:
    kp = _pair(5)
    assert decode_public_key(kp.public_b64).public_bytes_raw() == kp.public_bytes
    with pytest.raises(KeyAgreementError):
        decode_public_key(base64.urlsafe_b64encode(b"\x09" * 31).decode())
    with pytest.raises(KeyAgreementError):
        decode_public_key("not base64 !!")
    zero = base64.urlsafe_b64encode(bytes(32)).decode()  # low-order point -> all-zero secret
    with pytest.raises(KeyAgreementError) as exc:
        derive_session_keys(kp, zero, client_id="c", salt=SALT, role="client")
    assert kp.public_b64 not in str(exc.value)
    with pytest.raises(ValueError):
        derive_session_keys(kp, _pair(6).public_b64, client_id="c", salt=b"short", role="client")


def test_generated_keypairs_differ_and_persist() -> None:
    a, b = KeyPair.generate(), KeyPair.generate()
    assert a.public_bytes != b.public_bytes
    assert KeyPair.from_private_bytes(a.private_bytes()).public_bytes == a.public_bytes


def test_reprs_redact_secrets() -> None:
    kp = _pair(7)
    keys = derive_session_keys(kp, _pair(8).public_b64, client_id="c", salt=SALT, role="client")
    text = repr(keys) + str(keys) + repr(kp)
    assert keys.fernet_key.decode() not in text and keys.hmac_key.hex() not in text
    assert repr(keys.hmac_key)[2:-1] not in text
    assert kp.private_bytes().hex() not in text
    assert isinstance(keys, SessionKeys) and "redacted" in repr(keys)
