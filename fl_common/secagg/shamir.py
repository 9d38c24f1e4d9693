"""Shamir t-of-n secret sharing of short secrets (32-byte seeds and X25519 private keys).

Field: integers mod the Mersenne prime p = 2^521 - 1. Why this prime: any secret of up to 64
bytes (< 2^512) is a single field element, so a 32-byte secret is one polynomial (no chunking),
and a Mersenne prime's primality is textbook fact rather than a magic constant to trust.
A share is (x, y) with x = the holder's secagg id (1..2^32-1) and y = f(x) mod p; it
serialises to 4 + 66 bytes.

Security: any t-1 shares are independent of the secret (perfect secrecy); t shares determine
it. Shamir gives NO integrity: shares are malleable (adding d/lambda_i to y_i shifts the
secret by d), so a tampered share reconstructs a wrong secret without any error. Integrity must
come from authentication: shares travel inside authenticated encryption between the two
clients (SecAgg's c_uv keys + ``Envelope``), and if more than t shares are available,
``reconstruct`` checks the extra ones for consistency.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["PRIME", "MAX_SECRET_LEN", "ShareError", "Share", "split_secret", "reconstruct"]

PRIME = 2**521 - 1
MAX_SECRET_LEN = 64
_Y_LEN = (PRIME.bit_length() + 7) // 8  # 66
_X_LEN = 4
SHARE_LEN = _X_LEN + _Y_LEN


class ShareError(ValueError):
    """Too few, duplicate, malformed or inconsistent shares. Messages carry no share values."""


@dataclass(frozen=True, repr=False)
class Share:
    """One point (x, f(x)) of the sharing polynomial. ``y`` is secret material: redacted in repr."""

    x: int
    y: int

    def __post_init__(self) -> None:
        if not (isinstance(self.x, int) and isinstance(self.y, int)):
            raise ShareError("share coordinates must be integers")
        if not 1 <= self.x < 2 ** (8 * _X_LEN):
            raise ShareError("share x must be in [1, 2^32)")
        if not 0 <= self.y < PRIME:
            raise ShareError("share y out of field range")

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(_X_LEN, "big") + self.y.to_bytes(_Y_LEN, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) != SHARE_LEN:
            raise ShareError("share has the wrong length")
        return cls(int.from_bytes(data[:_X_LEN], "big"), int.from_bytes(data[_X_LEN:], "big"))

    def __repr__(self) -> str:
        return f"Share(x={self.x}, y=<redacted>)"


def split_secret(secret: bytes, threshold: int, share_ids: Sequence[int]) -> dict[int, Share]:
    """Share ``secret`` so that any ``threshold`` of the holders in ``share_ids`` can rebuild it.

    Coefficients come from ``secrets`` (the OS CSPRNG); there is deliberately no RNG argument.
    Returns ``{holder_id: Share}``; each share must go to its holder only, encrypted.
    """
    if not isinstance(secret, (bytes, bytearray)) or not 1 <= len(secret) <= MAX_SECRET_LEN:
        raise ValueError(f"secret must be 1..{MAX_SECRET_LEN} bytes")
    ids = list(share_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("share ids must be distinct")
    if not 2 <= threshold <= len(ids):
        raise ValueError("need 2 <= threshold <= number of holders")
    for i in ids:
        if not isinstance(i, int) or not 1 <= i < 2 ** (8 * _X_LEN):
            raise ValueError("share ids must be integers in [1, 2^32)")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out: dict[int, Share] = {}
    for x in ids:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % PRIME
        out[x] = Share(x, acc)
    return out


def _interpolate(points: Sequence[Share], at: int) -> int:
    """Lagrange interpolation of the polynomial through ``points``, evaluated at ``at``."""
    total = 0
    for i, pi in enumerate(points):
        num, den = 1, 1
        for j, pj in enumerate(points):
            if i != j:
                num = num * (at - pj.x) % PRIME
                den = den * (pi.x - pj.x) % PRIME
        total = (total + pi.y * num * pow(den, -1, PRIME)) % PRIME
    return total


def reconstruct(shares: Iterable[Share], threshold: int, secret_len: int = 32) -> bytes:
    """Rebuild the secret from at least ``threshold`` shares (Lagrange at 0).

    Raises ``ShareError`` on fewer than ``threshold`` shares, duplicate x, shares that are not
    ``Share`` objects, extra shares that do not lie on the same polynomial, or a result that
    does not fit in ``secret_len`` bytes. A silent wrong answer remains possible with exactly
    ``threshold`` tampered shares: see the module docstring.
    """
    pts = list(shares)
    if not all(isinstance(s, Share) for s in pts):
        raise ShareError("malformed share")
    if len({s.x for s in pts}) != len(pts):
        raise ShareError("duplicate share x coordinates")
    if threshold < 2 or len(pts) < threshold:
        raise ShareError("not enough shares to reconstruct")
    if not 1 <= secret_len <= MAX_SECRET_LEN:
        raise ValueError(f"secret_len must be 1..{MAX_SECRET_LEN}")
    pts.sort(key=lambda s: s.x)
    base, extra = pts[:threshold], pts[threshold:]
    for s in extra:
        if _interpolate(base, s.x) != s.y:
            raise ShareError("inconsistent shares")
    value = _interpolate(base, 0)
    if value >= 1 << (8 * secret_len):
        raise ShareError("reconstructed value does not fit the secret length")
    return value.to_bytes(secret_len, "big")
