"""Seed -> mask vector expansion with a cryptographic PRG (ChaCha20 keystream).

Why not numpy's RNG: masks must be unpredictable to anyone without the seed, and PCG64/MT are
not cryptographic (their state is recoverable from outputs). Numpy's streams are also not
guaranteed stable across numpy versions, while both ends of a pairwise mask must expand the
*same* seed to the *same* vector on different machines.

Construction: key = HKDF-SHA256(seed, info = domain label || caller label); keystream =
ChaCha20(key, nonce = 0) over 8*n zero bytes, read as little-endian uint64 and reduced mod 2^b.
Because 2^b divides 2^64, taking the low b bits of a uniform 64-bit word is exactly uniform.

The zero nonce is safe only because each HKDF-derived key is used for one stream; the flip side
is that the same (seed, label) ALWAYS gives the same vector. Never reuse a seed for two
different masked inputs: put the round id into ``label`` or use fresh seeds every round.
"""

from __future__ import annotations

import sys

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fl_common.secagg.field import MAX_MODULUS_BITS

__all__ = ["SEED_LEN", "MAX_MODULUS_BITS", "expand_seed", "derive_prg_key"]

SEED_LEN = 32
_DOMAIN = b"fl-hub/v1/secagg/prg|"
_ZERO_NONCE = bytes(16)  # cryptography's ChaCha20 nonce = 4-byte counter || 12-byte nonce


def derive_prg_key(seed: bytes, label: bytes) -> bytes:
    """Domain-separated 32-byte ChaCha20 key: different labels give independent streams."""
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_LEN:
        raise ValueError(f"seed must be exactly {SEED_LEN} bytes")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_DOMAIN + bytes(label)).derive(bytes(seed))


def expand_seed(seed: bytes, n: int, modulus_bits: int, *, label: bytes) -> np.ndarray:
    """``n`` uniform elements of Z_{2^modulus_bits} as a fresh uint64 array.

    The keystream is written in place into the output buffer (no intermediate copy), which is
    what makes millions of elements per call cheap.
    """
    if not 1 <= modulus_bits <= MAX_MODULUS_BITS:
        raise ValueError(f"modulus_bits must be in [1, {MAX_MODULUS_BITS}]")
    if n < 0:
        raise ValueError("n must be non-negative")
    out = np.zeros(n, dtype=np.uint64)
    if n == 0:
        return out
    encryptor = Cipher(algorithms.ChaCha20(derive_prg_key(seed, label), _ZERO_NONCE), mode=None).encryptor()
    view = out.data.cast("B")
    encryptor.update_into(view, view)  # keystream XOR zeros == keystream
    if sys.byteorder == "big":  # pragma: no cover - the stream is defined as little-endian words
        out.byteswap(inplace=True)
    np.bitwise_and(out, np.uint64((1 << modulus_bits) - 1), out=out)
    return out
