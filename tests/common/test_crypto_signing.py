"""HMAC request signing: verification, each tampering's reason, freshness, replay, nonce cache."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from fl_common.crypto import (
    HEADER_CLIENT,
    HEADER_CONTENT_SHA256,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    InMemoryNonceCache,
    NonceCache,
    SignatureError,
    sign_request,
    verify_request,
)

KEY = b"k" * 32
NOW = 1_700_000_000.0
BODY = b'{"update": [1, 2, 3]}'
PATH = "/api/v1/rounds/3/update?compress=zstd"


def _sign(**over: Any):
    args: dict[str, Any] = dict(method="POST", path=PATH, body=BODY, client_id="client-7", hmac_key=KEY, clock=lambda: NOW)
    args.update(over)
    method, path, body = args.pop("method"), args.pop("path"), args.pop("body")
    return sign_request(method, path, body, **args)


def _verify(headers, *, method="POST", path=PATH, body=BODY, now=NOW, cache=None, key=KEY, window_s=300):
    cache = cache if cache is not None else InMemoryNonceCache(clock=lambda: now)
    return verify_request(method, path, body, headers, hmac_key=key, nonce_cache=cache, window_s=window_s,
                          clock=lambda: now)


def _reason(**kw) -> str:
    with pytest.raises(SignatureError) as exc:
        _verify(**kw)
    return exc.value.reason


def test_signature_verifies_and_headers_complete() -> None:
    h = _sign()
    assert set(h) == {HEADER_CLIENT, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE, HEADER_CONTENT_SHA256}
    assert _verify(h) == "client-7"
    # header names are case-insensitive, as in HTTP
    assert _verify({k.lower(): v for k, v in h.items()}) == "client-7"
    # key lookup callable (server session table)
    assert _verify(h, key=lambda cid: KEY if cid == "client-7" else None) == "client-7"


def test_flask_full_path_trailing_question_mark_is_normalised() -> None:
    h = _sign(path="/api/v1/status")
    assert _verify(h, path="/api/v1/status?") == "client-7"


@pytest.mark.parametrize(
    "tamper, reason",
    [
        (dict(method="PUT"), "bad_signature"),
        (dict(path="/api/v1/rounds/4/update?compress=zstd"), "bad_signature"),
        (dict(path="/api/v1/rounds/3/update?compress=none"), "bad_signature"),
        (dict(body=BODY + b" "), "body_hash_mismatch"),
    ],
)
def test_tampered_request_parts(tamper, reason) -> None:
    assert _reason(headers=_sign(), **tamper) == reason


@pytest.mark.parametrize(
    "header, value, reason",
    [
        (HEADER_TIMESTAMP, str(int(NOW) + 1), "bad_signature"),
        (HEADER_NONCE, "AAAAAAAAAAAAAAAAAAAAAA", "bad_signature"),
        (HEADER_CLIENT, "client-8", "bad_signature"),
        (HEADER_SIGNATURE, "0" * 64, "bad_signature"),
        (HEADER_CONTENT_SHA256, "0" * 64, "body_hash_mismatch"),
        (HEADER_TIMESTAMP, "yesterday", "malformed_header"),
        (HEADER_NONCE, "short", "malformed_header"),
    ],
)
def test_tampered_headers(header, value, reason) -> None:
    h = _sign()
    h[header] = value
    assert _reason(headers=h) == reason


def test_line_breaks_in_signed_fields_are_malformed() -> None:
    h = _sign()
    assert _reason(headers=h, path="/api/v1/x\nPOST") == "malformed_header"
    with pytest.raises(ValueError):
        _sign(client_id="a\nb")


def test_body_and_its_hash_swapped_together_still_fails() -> None:
    other = _sign(body=b"other")
    h = _sign()
    h[HEADER_CONTENT_SHA256] = other[HEADER_CONTENT_SHA256]
    assert _reason(headers=h, body=b"other") == "bad_signature"


@pytest.mark.parametrize(
    "header", [HEADER_CLIENT, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE, HEADER_CONTENT_SHA256]
)
def test_missing_header(header) -> None:
    h = _sign()
    del h[header]
    assert _reason(headers=h) == "missing_header"


def test_wrong_key_and_unknown_client() -> None:
    assert _reason(headers=_sign(), key=b"x" * 32) == "bad_signature"
    assert _reason(headers=_sign(), key=lambda cid: None) == "bad_signature"


def test_stale_timestamp_window() -> None:
    h = _sign()
    assert _verify(dict(h), now=NOW + 300) == "client-7"
    assert _reason(headers=dict(h), now=NOW + 301) == "stale_timestamp"
    assert _reason(headers=dict(h), now=NOW - 301) == "stale_timestamp"  # from the future
    assert _reason(headers=_sign(), now=NOW + 61, window_s=60) == "stale_timestamp"


def test_replayed_nonce_refused() -> None:
    now = [NOW]
    cache = InMemoryNonceCache(clock=lambda: now[0])
    h = _sign()
    assert _verify(h, cache=cache, now=now[0]) == "client-7"
    now[0] += 100
    assert _reason(headers=h, cache=cache, now=now[0]) == "replayed_nonce"
    # the same nonce from a different client is a different nonce
    other = _sign(client_id="client-9", nonce=h[HEADER_NONCE])
    assert _verify(other, cache=cache, now=now[0]) == "client-9"
    # once past the window the request is stale, not accepted
    now[0] = NOW + 301
    assert _reason(headers=h, cache=cache, now=now[0]) == "stale_timestamp"


def test_forged_request_does_not_burn_nonce() -> None:
    cache = InMemoryNonceCache(clock=lambda: NOW)
    h = _sign()
    forged = dict(h, **{HEADER_SIGNATURE: "f" * 64})
    assert _reason(headers=forged, cache=cache) == "bad_signature"
    assert _verify(h, cache=cache) == "client-7"


def test_nonce_cache_evicts_expired_and_is_bounded() -> None:
    now = [0.0]
    cache = InMemoryNonceCache(max_entries=100, clock=lambda: now[0])
    assert isinstance(cache, NonceCache)
    for i in range(100):
        assert cache.seen_or_add("c", f"n{i}", expires_at=10.0) is False
    assert len(cache) == 100
    assert cache.seen_or_add("c", "n0", expires_at=10.0) is True
    # full of live entries: fail closed rather than forget a live nonce
    assert cache.seen_or_add("c", "fresh", expires_at=10.0) is True
    now[0] = 10.0
    assert len(cache) == 0  # all expired and evicted
    for i in range(10_000):  # long run stays bounded as entries expire
        now[0] = 10.0 + i
        assert cache.seen_or_add("c", f"m{i}", expires_at=now[0] + 50) is False
        assert len(cache._live) <= 100 and len(cache._heap) <= 100
    assert cache.seen_or_add("c", "old", expires_at=now[0] - 1) is False  # already expired: not stored


def test_nonce_cache_thread_safe_single_winner() -> None:
    cache = InMemoryNonceCache(clock=lambda: 0.0)
    wins = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for i in range(500):
            if not cache.seen_or_add("c", f"n{i}", expires_at=100.0):
                wins.append(i)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == list(range(500))  # each nonce accepted exactly once


def test_errors_do_not_leak_key() -> None:
    with pytest.raises(SignatureError) as exc:
        _verify(_sign(), key=b"x" * 32)
    assert "x" * 32 not in str(exc.value) and KEY.decode() not in str(exc.value)
