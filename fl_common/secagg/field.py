"""Fixed-point encoding of float vectors into Z_{2^b}, and decoding of their sum.

SecAgg adds integers mod 2^b, so each client maps its (clipped) float vector to integers:
``q = stochastic_round(x * 2^scale_bits)`` and stores ``q mod 2^b`` in uint64. The server's
unmasked sum is ``sum(q) mod 2^b``; if ``b`` is large enough that the true sum lies in
[-2^(b-1), 2^(b-1)), centring (two's-complement style) recovers it exactly, and dividing by the
scale gives the float sum. ``required_modulus_bits`` picks that ``b``.

Why stochastic rounding: E[q] = x * scale exactly, so quantisation adds zero-mean noise and
the aggregate stays unbiased however many clients are summed; round-to-nearest would add a
systematic bias. Its randomness is not security relevant (it is not the mask), so a seeded
``numpy.random.Generator`` is passed explicitly, making encodings reproducible in tests.

Why the scale is a power of two: ``x * 2^s`` is exact in float64, so the only error is the
rounding step itself (< 1 unit = 2^-s per coordinate).

A ring, not a field: Z_{2^b} (the integers mod 2^b) is a ring - 2 has no inverse, so nothing here
ever divides mod 2^b (the division by the scale happens on the centred integer sum, in floats).
The masking needs only addition: (Z_{2^b}, +) is a group, and for any fixed input x the map
m -> x + m mod 2^b is a bijection of it, so a mask m uniform on Z_{2^b} makes x + m uniform on
Z_{2^b} whatever x is (the one-time pad over that group). The masks are uniform because the PRG
takes the low b bits of uniform 64-bit words and 2^b divides 2^64 (prg.py). Only Shamir sharing
needs a field (Lagrange interpolation divides): it works mod the prime 2^521 - 1 (shamir.py).
The names ``FieldOverflowError`` and "field width" are historical: read "ring Z_{2^b}".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MAX_MODULUS_BITS",
    "FieldOverflowError",
    "FixedPointSpec",
    "PreEncode",
    "max_level",
    "required_modulus_bits",
    "encode",
    "decode_sum",
    "add_mod",
    "sub_mod",
    "neg_mod",
]

MAX_MODULUS_BITS = 62
_MAX_EXACT = 2**52  # |x * scale| must stay where float64 floor() is exact


class FieldOverflowError(ValueError):
    """A value does not fit the field: input beyond the clip range, or a decoded sum beyond
    what ``num_clients`` honest inputs can produce (a strong hint that a mask was not removed)."""


def _mask(modulus_bits: int) -> np.uint64:
    if not 1 <= modulus_bits <= MAX_MODULUS_BITS:
        raise ValueError(f"modulus_bits must be in [1, {MAX_MODULUS_BITS}]")
    mask: np.uint64 = np.uint64((1 << modulus_bits) - 1)
    return mask


def max_level(clip: float, scale_bits: int) -> int:
    """Largest |q| one client can produce: ``ceil(clip * 2^scale_bits)`` (stochastic rounding may round up)."""
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError("clip must be a positive finite number")
    if not 0 <= scale_bits <= 52:
        raise ValueError("scale_bits must be in [0, 52]")
    levels = math.ceil(clip * 2.0**scale_bits)
    if levels > _MAX_EXACT:
        raise FieldOverflowError("clip * 2^scale_bits is too large for exact float64 rounding")
    return levels


def required_modulus_bits(clip: float, scale_bits: int, num_clients: int) -> int:
    """Smallest ``b`` such that the sum of ``num_clients`` encodings never wraps.

    The sum lies in [-n*L, n*L] with L = ``max_level``; centring recovers it iff
    n*L < 2^(b-1), i.e. b = bit_length(n*L) + 1. Raises if that exceeds 62 bits.
    """
    if num_clients < 1:
        raise ValueError("num_clients must be >= 1")
    bits = (num_clients * max_level(clip, scale_bits)).bit_length() + 1
    if bits > MAX_MODULUS_BITS:
        raise FieldOverflowError(f"sum needs {bits} bits (> {MAX_MODULUS_BITS}); lower scale_bits or clip")
    return bits


@dataclass(frozen=True)
class PreEncode:
    """Elementwise steps applied to the input before it is encoded, in this order: ``x * rescale`` (an L2 clip's
    shrink), clamp to [-clamp, clamp], ``* factor`` (the n_k / W weighting). The same float64 operations as on
    whole vectors, bit for bit, done chunk by chunk inside :func:`encode` so no temporary vector is made."""

    rescale: float | None = None
    clamp: float | None = None
    factor: float = 1.0


#: values encoded per step: every temporary of a step stays in the L2 cache and is reused (a cnn-sized vector
#: would otherwise allocate, page-fault and stream five 13 MB temporaries through memory)
_ENCODE_CHUNK = 1 << 15


def encode(
    vec: np.ndarray,
    clip: float,
    scale_bits: int,
    modulus_bits: int,
    rng: np.random.Generator,
    *,
    out: np.ndarray | None = None,
    pre: PreEncode | None = None,
) -> np.ndarray:
    """Float vector (numpy or CPU torch tensor) -> uint64 elements of Z_{2^modulus_bits}.

    Values must already be clipped to [-clip, clip] (e.g. by DP clipping); anything outside, or
    non-finite, raises ``FieldOverflowError`` instead of silently breaking the no-wrap bound.
    ``out``: a uint64 vector of the same length to write into (and return), e.g. a slice of a larger one; for a
    modulus of at most 32 bits it may be uint32 (the masking's word: the same values, half the memory traffic).
    ``pre``: steps applied to ``vec`` first (the range check is on their result).

    The rounding draws are ``rng.random(n, dtype=np.float32)`` in order, taken chunk by chunk (a Generator's
    stream does not depend on how the draws are split), so the result is that of the one-shot textbook expression
    ``floor(y) + (u < y - floor(y))``, y = x * 2^s, bit for bit. Why float32 draws: they cost half of float64
    ones (3.8 against 8.4 ms for a cnn's 1.66 M values, half of all the encoding took), and ``u`` on a grid of
    2^-24 moves the probability of rounding up by less than 2^-24: a bias below 2^-24 of one step 2^-s, i.e.
    2^-40 of a unit at s = 16, where the rounding itself adds noise of up to half a step.
    """
    mask = _mask(modulus_bits)
    level = max_level(clip, scale_bits)
    if 2 * level >= (1 << modulus_bits):
        raise FieldOverflowError("modulus too small for even one client's values")
    x = np.asarray(vec).ravel()
    if x.dtype != np.float64 and x.dtype != np.float32:
        x = x.astype(np.float64)
    n = x.size
    if out is None:
        out = np.empty(n, dtype=np.uint64)
    elif out.shape != (n,) or not (out.dtype == np.uint64 or (out.dtype == np.uint32 and modulus_bits <= 32)):
        raise ValueError(f"out must be a uint64 vector of {n} values (or uint32, for a modulus of 32 bits or less)")
    if n == 0:
        return out
    if pre is None:
        _check_range(x, clip)  # before any rounding draw
    scale = float(2**scale_bits)
    step = min(n, _ENCODE_CHUNK)
    y, lo, draws = np.empty(step), np.empty(step), np.empty(step, dtype=np.float32)
    up = np.empty(step, dtype=bool)
    q = np.empty(step, dtype=np.int64)
    for at in range(0, n, step):
        m = min(step, n - at)
        ym, lom, dm, upm, qm = y[:m], lo[:m], draws[:m], up[:m], q[:m]
        ym[...] = x[at:at + m]  # float64 (float32 input widens exactly)
        if pre is not None:
            if pre.rescale is not None:
                np.multiply(ym, pre.rescale, out=ym)
            if pre.clamp is not None:
                np.clip(ym, -pre.clamp, pre.clamp, out=ym)
            if pre.factor != 1.0:
                np.multiply(ym, pre.factor, out=ym)
            _check_range(ym, clip)
        np.multiply(ym, scale, out=ym)  # exact: a power of two
        np.floor(ym, out=lom)
        np.subtract(ym, lom, out=ym)
        rng.random(out=dm, dtype=np.float32)
        np.less(dm, ym, out=upm)
        np.add(lom, upm, out=lom)
        qm[...] = lom  # |q| <= 2^52: exact
        # int64 -> uint64 view is two's complement mod 2^64; masking reduces it mod 2^b.
        np.bitwise_and(qm.view(np.uint64), mask, out=out[at:at + m])
    return out


def _check_range(x: np.ndarray, clip: float) -> None:
    # both checks from the extremes (no temporary): NaN propagates through min and max, an infinity is its own extreme
    peak = max(-float(np.min(x)), float(np.max(x)))
    if not math.isfinite(peak):
        raise FieldOverflowError("input contains NaN or infinity")
    if peak > clip:
        raise FieldOverflowError("input exceeds the clip range")


def decode_sum(
    sum_vec: np.ndarray,
    num_clients: int,
    clip: float,
    scale_bits: int,
    modulus_bits: int,
) -> np.ndarray:
    """Unmasked sum of ``num_clients`` encodings -> float64 sum of their inputs (not the mean).

    Raises ``FieldOverflowError`` if the field cannot hold ``num_clients`` inputs, or if any
    centred value exceeds what that many clipped inputs can add up to. The latter usually means
    a mask was left in; it is a sanity check, not an integrity guarantee.
    """
    mask = _mask(modulus_bits)
    if required_modulus_bits(clip, scale_bits, num_clients) > modulus_bits:
        raise FieldOverflowError("modulus too small for this many clients: the sum may have wrapped")
    # centring without a comparison mask or fancy indexing: ((v + 2^(b-1)) mod 2^b) - 2^(b-1) is v for v below
    # half the ring and v - 2^b above it, i.e. the two's-complement reading of the b-bit value
    half = 1 << (modulus_bits - 1)
    vec = np.asarray(sum_vec)
    signed: np.ndarray
    if vec.dtype == np.uint32 and modulus_bits < 32:  # the server's word-sized sum: the same arithmetic in 32 bits
        centred32: np.ndarray = np.add(vec, np.uint32(half))
        np.bitwise_and(centred32, np.uint32(mask), out=centred32)
        signed = centred32.view(np.int32)  # < 2^b <= 2^31: non-negative as int32
        np.subtract(signed, np.int32(half), out=signed)
    else:
        centred: np.ndarray = np.add(np.asarray(vec, dtype=np.uint64), np.uint64(half))
        np.bitwise_and(centred, mask, out=centred)
        signed = centred.view(np.int64)
        np.subtract(signed, np.int64(half), out=signed)
    bound = num_clients * max_level(clip, scale_bits)
    if signed.size and max(-int(np.min(signed)), int(np.max(signed))) > bound:
        raise FieldOverflowError("decoded sum outside the possible range; were all masks removed?")
    out: np.ndarray = signed.astype(np.float64)
    np.divide(out, float(2**scale_bits), out=out)
    return out


def add_mod(a: np.ndarray, b: np.ndarray, modulus_bits: int) -> np.ndarray:
    """(a + b) mod 2^b; uint64 wraps mod 2^64, which 2^b divides, so no overflow handling is needed."""
    return (np.asarray(a, dtype=np.uint64) + np.asarray(b, dtype=np.uint64)) & _mask(modulus_bits)


def sub_mod(a: np.ndarray, b: np.ndarray, modulus_bits: int) -> np.ndarray:
    """(a - b) mod 2^b."""
    return (np.asarray(a, dtype=np.uint64) - np.asarray(b, dtype=np.uint64)) & _mask(modulus_bits)


def neg_mod(a: np.ndarray, modulus_bits: int) -> np.ndarray:
    """(-a) mod 2^b."""
    negated: np.ndarray = (np.uint64(0) - np.asarray(a, dtype=np.uint64)) & _mask(modulus_bits)
    return negated


@dataclass(frozen=True)
class FixedPointSpec:
    """The public encoding parameters of one SecAgg round, in one object the protocol can ship."""

    clip: float
    scale_bits: int
    modulus_bits: int

    @classmethod
    def for_clients(cls, clip: float, scale_bits: int, num_clients: int) -> FixedPointSpec:
        """The smallest field that fits ``num_clients`` (pass the number *selected*, not survivors)."""
        return cls(clip, scale_bits, required_modulus_bits(clip, scale_bits, num_clients))

    def __post_init__(self) -> None:
        _mask(self.modulus_bits)
        max_level(self.clip, self.scale_bits)

    def encode(self, vec: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return encode(vec, self.clip, self.scale_bits, self.modulus_bits, rng)

    def decode_sum(self, sum_vec: np.ndarray, num_clients: int) -> np.ndarray:
        return decode_sum(sum_vec, num_clients, self.clip, self.scale_bits, self.modulus_bits)
