"""Every authentication tag is checked in full: truncated, extended and one-bit-flipped tags are refused.

Why a test of its own: a comparison on a prefix (``expected[:8] == tag[:8]``), or one that accepts a longer
tag that starts with the right one, passes every test that only ever sends the right tag or garbage. Each
case here is one small change to a tag that verifies, on every tag the project checks: the request
signature (hex HMAC-SHA256 in a header), the SecAgg HMAC message signature and the server's roster tag
(raw HMAC-SHA256), and the SecAgg Ed25519 signature.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fl_common.crypto.nonce_cache import InMemoryNonceCache
from fl_common.crypto.signing import HEADER_SIGNATURE, SignatureError, sign_request, verify_request
from fl_common.secagg.auth import SigningIdentity, Verifier, check_server_tag

KEY = b"k" * 32
NOW = 1_700_000_000


def _flip_hex(tag: str, at: int) -> str:
    """One bit flipped in the hex character at ``at`` (still valid hex)."""
    return tag[:at] + format(int(tag[at], 16) ^ 1, "x") + tag[at + 1:]


def _flip_raw(tag: bytes, at: int) -> bytes:
    return tag[:at] + bytes([tag[at] ^ 0x01]) + tag[at + 1:]


def _hex_variants(tag: str) -> dict[str, str]:
    return {"truncated to 8": tag[:8], "truncated by 1": tag[:-1], "extended by 1": tag + "0",
            "extended by itself": tag + tag, "first bit": _flip_hex(tag, 0), "middle bit": _flip_hex(tag, len(tag) // 2),
            "last bit": _flip_hex(tag, len(tag) - 1), "empty": ""}


def _raw_variants(tag: bytes) -> dict[str, bytes]:
    return {"truncated to 4": tag[:4], "truncated by 1": tag[:-1], "extended by 1": tag + b"\x00",
            "extended by itself": tag + tag, "first bit": _flip_raw(tag, 0), "middle bit": _flip_raw(tag, len(tag) // 2),
            "last bit": _flip_raw(tag, len(tag) - 1), "empty": b""}


def test_request_signature_verifies_only_in_full() -> None:
    headers = sign_request("POST", "/api/v1/rounds/1/update", b"body", client_id="c1", hmac_key=KEY, timestamp=NOW,
                           nonce="n" * 20)
    assert verify_request("POST", "/api/v1/rounds/1/update", b"body", headers, hmac_key=KEY,
                          nonce_cache=InMemoryNonceCache(), clock=lambda: NOW) == "c1"
    for name, tag in _hex_variants(headers[HEADER_SIGNATURE]).items():
        forged = {**headers, HEADER_SIGNATURE: tag}
        with pytest.raises(SignatureError) as err:  # a fresh cache: a refusal can only be the tag's
            verify_request("POST", "/api/v1/rounds/1/update", b"body", forged, hmac_key=KEY,
                           nonce_cache=InMemoryNonceCache(), clock=lambda: NOW)
        assert err.value.reason in ("bad_signature", "missing_header"), name


@pytest.mark.parametrize("identity", [SigningIdentity.hmac(KEY), SigningIdentity.generate_ed25519()],
                         ids=["hmac-sha256", "ed25519"])
def test_secagg_message_signatures_verify_only_in_full(identity: SigningIdentity) -> None:
    data = b"fl-hub/v1/secagg/advertise|some signed bytes"
    verifier = identity.verifier()
    tag = identity.sign(data)
    assert verifier.verify(data, tag)
    for name, bad in _raw_variants(tag).items():
        assert not verifier.verify(data, bad), name
    assert not verifier.verify(_flip_raw(data, 3), tag)


def test_the_server_roster_tag_verifies_only_in_full() -> None:
    identity = SigningIdentity.hmac(KEY)
    roster_digest = b"d" * 32
    tag = Verifier("hmac-sha256", KEY).tag(roster_digest)
    assert check_server_tag(identity, roster_digest, tag)
    check: Callable[[bytes], bool] = lambda t: check_server_tag(identity, roster_digest, t)
    for name, bad in _raw_variants(tag).items():
        assert not check(bad), name
    # the tag is the server's, never a client's message signature over the same bytes (domain separated)
    assert not check(identity.sign(roster_digest))


def test_a_nonce_is_remembered_for_as_long_as_its_timestamp_is_accepted() -> None:
    """Replay protection at the edge of the freshness window: a request is accepted while |now - ts| <= window, so its
    nonce must still be remembered at now = ts + window exactly (and may be forgotten after)."""
    from fl_common.crypto.signing import DEFAULT_WINDOW_S

    now = [float(NOW)]
    cache = InMemoryNonceCache(clock=lambda: now[0])
    headers = sign_request("GET", "/api/v1/round", b"", client_id="c1", hmac_key=KEY, timestamp=NOW, nonce="e" * 20)

    def verify() -> str:
        return verify_request("GET", "/api/v1/round", b"", headers, hmac_key=KEY, nonce_cache=cache, clock=lambda: now[0])

    assert verify() == "c1"
    for later in (1.0, DEFAULT_WINDOW_S - 1.0, float(DEFAULT_WINDOW_S)):
        now[0] = NOW + later
        with pytest.raises(SignatureError) as err:
            verify()
        assert err.value.reason == "replayed_nonce", later
    now[0] = NOW + DEFAULT_WINDOW_S + 1.0  # past the window: the timestamp refuses it, whatever the cache holds
    with pytest.raises(SignatureError) as err:
        verify()
    assert err.value.reason == "stale_timestamp"
