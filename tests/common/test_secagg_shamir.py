"""Shamir t-of-n: threshold behaviour, validation, serialisation, and (lack of) integrity."""

from __future__ import annotations

import contextlib
import hashlib
from itertools import combinations

import pytest

from fl_common.crypto import KeyPair
from fl_common.secagg import PRIME, Share, ShareError, reconstruct, split_secret

SECRET = hashlib.sha256(b"seed").digest()
IDS = [1, 2, 3, 4, 5, 6]


def test_prime_is_prime() -> None:
    """Miller-Rabin with 24 fixed bases; error probability < 4^-24 for a composite."""
    p, d, r = PRIME, PRIME - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89]:
        x = pow(a, d, p)
        if x in (1, p - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, p)
            if x == p - 1:
                break
        else:
            pytest.fail("PRIME is composite")
    assert p > 2**512


def test_any_t_shares_reconstruct() -> None:
    shares = split_secret(SECRET, 4, IDS)
    for subset in combinations(IDS, 4):
        assert reconstruct([shares[i] for i in subset], 4) == SECRET
    assert reconstruct(shares.values(), 4) == SECRET  # more than t: extras checked, still fine


def test_fewer_than_t_shares_raise() -> None:
    shares = split_secret(SECRET, 4, IDS)
    for subset in combinations(IDS, 3):
        with pytest.raises(ShareError):
            reconstruct([shares[i] for i in subset], 4)


def test_duplicate_and_malformed_shares_raise() -> None:
    shares = split_secret(SECRET, 3, IDS)
    with pytest.raises(ShareError):
        reconstruct([shares[1], shares[1], shares[2]], 3)
    with pytest.raises(ShareError):
        reconstruct([shares[1], Share(1, 5), shares[2]], 3)  # same x, different y
    with pytest.raises(ShareError):
        reconstruct([shares[1], shares[2], (3, 4)], 3)  # type: ignore[list-item]
    with pytest.raises(ShareError):
        Share(0, 1)
    with pytest.raises(ShareError):
        Share(1, PRIME)
    with pytest.raises(ShareError):
        Share.from_bytes(shares[1].to_bytes()[:-1])
    with pytest.raises(ValueError):
        split_secret(SECRET, 1, IDS)
    with pytest.raises(ValueError):
        split_secret(SECRET, 7, IDS)
    with pytest.raises(ValueError):
        split_secret(SECRET, 3, [1, 2, 2, 3])


def test_serialisation_round_trip_and_redaction() -> None:
    shares = split_secret(SECRET, 3, IDS)
    decoded = [Share.from_bytes(shares[i].to_bytes()) for i in (2, 4, 6)]
    assert reconstruct(decoded, 3) == SECRET
    assert str(shares[2].y) not in repr(shares[2]) and "redacted" in repr(shares[2])


def test_x25519_private_key_and_leading_zero_secrets() -> None:
    kp = KeyPair.generate()
    shares = split_secret(kp.private_bytes(), 4, IDS)
    assert KeyPair.from_private_bytes(reconstruct([shares[i] for i in (6, 1, 3, 5)], 4)).public_bytes == kp.public_bytes
    small = b"\x00" * 31 + b"\x07"
    assert reconstruct(list(split_secret(small, 2, [10, 20]).values()), 2) == small


def test_tampered_share_gives_wrong_secret_silently() -> None:
    """Shamir has no integrity: exactly t shares with one modified reconstruct a *different*
    secret without error. Integrity must come from authenticating shares (AEAD between clients)."""
    shares = split_secret(SECRET, 4, IDS)
    subset = [shares[i] for i in (1, 2, 3, 4)]
    # Lagrange weight of x=1 at 0 for xs {1,2,3,4} is 4, so y1 + 1 shifts the secret by 4.
    tampered = [Share(subset[0].x, (subset[0].y + 1) % PRIME), *subset[1:]]
    wrong = reconstruct(tampered, 4)
    assert wrong != SECRET
    assert int.from_bytes(wrong, "big") == int.from_bytes(SECRET, "big") + 4
    # a targeted attacker can shift the secret by any chosen delta: y_i += delta / lambda_i
    delta, lam_inv = 12345, pow(4, -1, PRIME)
    forged = [Share(subset[0].x, (subset[0].y + delta * lam_inv) % PRIME), *subset[1:]]
    assert int.from_bytes(reconstruct(forged, 4), "big") == int.from_bytes(SECRET, "big") + delta
    # with a spare share the inconsistency is detected
    with pytest.raises(ShareError):
        reconstruct([*tampered, shares[5]], 4)


def test_fewer_than_t_shares_are_consistent_with_every_secret() -> None:
    """Perfect secrecy, checked on the shares split_secret really makes (not on the algebra alone): for t - 1
    shares of one secret and ANY candidate secret there is exactly one degree t - 1 polynomial through both,
    and it hands out t - 1 shares indistinguishable from the real ones. So the real shares must look like
    fresh field elements: never the secret itself, never repeating across splits, and the same distribution
    for two very different secrets (a sharing whose higher coefficients were 0 gives y = secret everywhere)."""
    t, ids, splits = 3, [1, 2, 3, 4, 5], 64
    zero, ones = bytes(32), b"\xff" * 32
    top_bits = {}
    for secret in (zero, ones):
        value = int.from_bytes(secret, "big")
        shares = [split_secret(secret, t, ids) for _ in range(splits)]
        for x in ids:
            ys = [s[x].y for s in shares]
            assert value not in ys and len(set(ys)) == splits  # uniform over 2^521: a repeat has probability ~2^-509
        top_bits[secret] = sum(s[1].y >> 520 for s in shares)  # the highest bit of a uniform element of Z_p: p ~ 2^521
    for count in top_bits.values():  # Bin(64, 1/2): within 32 +- 20 with probability 1 - 4e-7
        assert 12 <= count <= 52
    # the polynomial really has degree t - 1: any t - 1 shares, read as a sharing of threshold t - 1, give a
    # value unrelated to the secret (a sharing one coefficient short would hand the secret to t - 1 holders)
    for t_ in (2, 3, 4):
        for _ in range(8):
            shares = split_secret(SECRET, t_ + 1, ids)
            for subset in combinations(ids, t_):
                with contextlib.suppress(ShareError):  # a value that does not even fit 64 bytes: certainly not it
                    assert reconstruct([shares[x] for x in subset], t_, secret_len=64) != SECRET.rjust(64, b"\0")
    # every candidate secret is consistent with two of the shares: the line through (0, s') and (1, y1) meets (2, y2)
    # for exactly one s' per polynomial of degree 2 - so t - 1 = 2 shares plus any s' rebuild a valid sharing of s'
    real = split_secret(SECRET, t, ids)
    for candidate in (bytes(32), b"\x01" * 32, hashlib.sha256(b"other").digest()):
        c = int.from_bytes(candidate, "big")
        # the degree-2 polynomial f with f(0) = c, f(1) = y1, f(2) = y2; its third share is f(3)
        y1, y2 = real[1].y, real[2].y
        a2 = (y2 - 2 * y1 + c) * pow(2, -1, PRIME) % PRIME
        a1 = (y1 - c - a2) % PRIME
        fake3 = Share(3, (c + 3 * a1 + 9 * a2) % PRIME)
        assert reconstruct([real[1], real[2], fake3], t) == candidate


def test_split_secret_refuses_out_of_range_input_exactly_at_the_boundaries() -> None:
    """Each bound is checked where it lies (one byte, 64 bytes, ids 1 and 2^32 - 1 are fine; one past is refused
    with the reason), not left to a later, vaguer error."""
    for secret in (b"\x01", b"\xff" * 64):
        shares = split_secret(secret, 2, [1, 2 ** 32 - 1])
        assert reconstruct(list(shares.values()), 2, secret_len=len(secret)) == secret
    for secret in (b"", b"\x00" * 65):
        with pytest.raises(ValueError, match="secret must be 1..64 bytes"):
            split_secret(secret, 2, [1, 2])
    for ids in ([0, 1], [1, 2 ** 32], [1, "2"]):
        with pytest.raises(ValueError, match="share ids must be integers"):
            split_secret(SECRET, 2, ids)  # type: ignore[arg-type]
    for threshold, ids in ((1, [1, 2]), (3, [1, 2])):
        with pytest.raises(ValueError, match="need 2 <= threshold"):
            split_secret(SECRET, threshold, ids)
    assert len(split_secret(SECRET, 2, [1, 2])) == 2


def test_a_rebuilt_value_one_past_the_secret_length_is_refused() -> None:
    """2^(8 L) itself does not fit L bytes: the check is >=, with a ShareError (not an OverflowError later)."""
    value, slope = 1 << 256, 12345
    shares = [Share(x, (value + slope * x) % PRIME) for x in (1, 2)]
    with pytest.raises(ShareError, match="does not fit"):
        reconstruct(shares, 2, secret_len=32)
    below = [Share(x, (value - 1 + slope * x) % PRIME) for x in (1, 2)]
    assert reconstruct(below, 2, secret_len=32) == b"\xff" * 32


def test_share_and_reconstruct_arguments_are_checked_at_their_bounds() -> None:
    """A share is (x, y) with x in [1, 2^32) and y in [0, p): both ends of each range are valid, one past is a
    ShareError at construction (never an OverflowError on the wire); reconstruct needs t >= 2 and 1..64 bytes."""
    for x, y in ((1, 0), (2 ** 32 - 1, PRIME - 1)):
        share = Share(x, y)
        assert Share.from_bytes(share.to_bytes()) == share
    for x, y in ((0, 1), (2 ** 32, 1), (1, PRIME), (1, -1), ("1", 1), (1, "1"), (1.0, 1)):
        with pytest.raises(ShareError):
            Share(x, y)  # type: ignore[arg-type]
    shares = list(split_secret(SECRET, 2, IDS).values())
    with pytest.raises(ShareError, match="not enough shares"):
        reconstruct(shares[:1], 1)
    with pytest.raises(ShareError, match="not enough shares"):
        reconstruct(shares[:1], 2)
    for length in (0, 65):
        with pytest.raises(ValueError, match="secret_len must be 1..64"):
            reconstruct(shares, 2, secret_len=length)
    assert reconstruct(shares, 2, secret_len=64) == SECRET.rjust(64, b"\0")
