"""Seed -> mask vector expansion with a cryptographic PRG (AES-256 in counter mode, v2).

Why not numpy's RNG: masks must be unpredictable to anyone without the seed, and PCG64/MT are
not cryptographic (their state is recoverable from outputs). Numpy's streams are also not
guaranteed stable across numpy versions, while both ends of a pairwise mask must expand the
*same* seed to the *same* vector on different machines.

Construction (v2): key = HKDF-SHA256(seed, info = "fl-hub/v2/secagg/prg|" || caller label), 32 bytes;
keystream = AES-256-CTR(key, initial counter block = 0) over ``w * n`` zero bytes, read as
little-endian words of ``w`` bytes, w = 4 when b <= 32 and 8 otherwise, each reduced mod 2^b.

Why it is sound (and why it changed from v1's ChaCha20 with 64-bit words):

- AES-CTR under a uniformly random key is a PRG: its output is indistinguishable from uniform bytes up
  to the PRP/PRF switching term q^2 / 2^129 for q blocks (a 1.7 M-value mask is q = 4.2e5 blocks:
  about 3e-28), plus the advantage of breaking AES-256 itself. The key comes from HKDF over a 32-byte
  secret seed, so it is as good as uniform; AES-256 rather than AES-128 keeps a 128-bit margin even
  against Grover-style key search, at under 10 % more time. ChaCha20 (v1) gives the same guarantee;
  AES is used because ``cryptography``'s AES-CTR runs on AES-NI, 2-3x ChaCha20's speed on the x86
  machines this runs on (benchmarks/results/fast_rounds/README.md has the measurement).
- A word of w bytes is uniform on [0, 2^(8w)); 2^b divides 2^(8w) whenever b <= 8w, so its low b bits
  are exactly uniform on Z_{2^b}: 32-bit words lose nothing for b <= 32 and halve the keystream, the
  memory traffic and every add pass of the masking.
- The zero counter block is safe only because each HKDF-derived key is used for one stream; the flip
  side is that the same (seed, label) ALWAYS gives the same vector. Never reuse a seed for two
  different masked inputs: put the round id into ``label`` or use fresh seeds every round.

The domain label says "v2": a peer still on v1 derives different masks, so a mixed round fails loudly
(the decoded count check in encoding.py), never silently.
"""

from __future__ import annotations

import sys

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fl_common.secagg.field import MAX_MODULUS_BITS

__all__ = ["SEED_LEN", "MAX_MODULUS_BITS", "expand_seed", "derive_prg_key", "word_dtype", "add_expansion"]

SEED_LEN = 32
_DOMAIN = b"fl-hub/v2/secagg/prg|"
_ZERO_COUNTER = bytes(16)  # the CTR mode's initial 128-bit counter block
#: keystream words produced per step of :func:`add_expansion`: small enough to stay in the L2 cache between
#: the cipher writing them and the add reading them, large enough that the per-step Python cost is noise
_CHUNK_BYTES = 1 << 17


def derive_prg_key(seed: bytes, label: bytes) -> bytes:
    """Domain-separated 32-byte AES-256 key: different labels give independent streams."""
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_LEN:
        raise ValueError(f"seed must be exactly {SEED_LEN} bytes")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_DOMAIN + bytes(label)).derive(bytes(seed))


def word_dtype(modulus_bits: int) -> np.dtype:
    """The unsigned word the stream (and any accumulator of masks) uses for ``modulus_bits``: uint32 up to
    32 bits, uint64 above. Arithmetic in it wraps mod 2^32 or 2^64, which 2^b divides, so a sum of masks
    reduced mod 2^b once at the end is the sum mod 2^b."""
    _check_bits(modulus_bits)
    return np.dtype(np.uint32 if modulus_bits <= 32 else np.uint64)


def _check_bits(modulus_bits: int) -> None:
    if not 1 <= modulus_bits <= MAX_MODULUS_BITS:
        raise ValueError(f"modulus_bits must be in [1, {MAX_MODULUS_BITS}]")


def _encryptor(seed: bytes, label: bytes) -> CipherContext:
    return Cipher(algorithms.AES(derive_prg_key(seed, label)), modes.CTR(_ZERO_COUNTER)).encryptor()


def expand_seed(seed: bytes, n: int, modulus_bits: int, *, label: bytes) -> np.ndarray:
    """``n`` uniform elements of Z_{2^modulus_bits} as a fresh uint64 array."""
    _check_bits(modulus_bits)
    if n < 0:
        raise ValueError("n must be non-negative")
    out = np.zeros(n, dtype=np.uint64)
    if n:
        add_expansion(out, seed, modulus_bits, label=label)
        np.bitwise_and(out, np.uint64((1 << modulus_bits) - 1), out=out)
    return out


def add_expansion(acc: np.ndarray, seed: bytes, modulus_bits: int, *, label: bytes, subtract: bool = False) -> None:
    """``acc += PRG(seed)`` (or ``-=``) in place, *not* reduced mod 2^b: the caller reduces once after the last
    stream. ``acc`` is a contiguous uint32 (b <= 32 only) or uint64 vector; its length is the stream's.

    Why in place and in chunks: the masking adds one stream per neighbour plus the self mask; expanding each
    into a fresh vector costs an allocation (page faults on millions of words) and a full pass to write it
    and another to read it back. Here the keystream is produced chunk by chunk into a cache-resident buffer
    and added at once: one pass over ``acc`` per stream."""
    _check_bits(modulus_bits)
    word = word_dtype(modulus_bits)
    if acc.ndim != 1 or not acc.flags.c_contiguous or acc.dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)):
        raise ValueError("acc must be a contiguous 1-D uint32 or uint64 vector")
    if acc.dtype.itemsize < word.itemsize:
        raise ValueError(f"a uint32 accumulator cannot hold {modulus_bits}-bit ring elements")
    n = acc.size
    if n == 0:
        return
    encryptor = _encryptor(seed, label)
    step = _CHUNK_BYTES // word.itemsize
    # update_into may ask for one block beyond the data (cryptography < 43 for any mode): room for it, unused
    raw = np.empty(min(step, n) * word.itemsize + 16, dtype=np.uint8)
    buf = raw[:-16].view(word)
    zeros = bytes(buf.nbytes)
    view = raw.data  # a writable byte buffer over raw
    op = np.subtract if subtract else np.add
    for start in range(0, n, step):
        m = min(step, n - start)
        if m == buf.size:
            encryptor.update_into(zeros, view)  # keystream XOR zeros == keystream
            words = buf
        else:  # the last, shorter chunk
            words = np.frombuffer(encryptor.update(bytes(m * word.itemsize)), dtype=word)
        if sys.byteorder == "big":  # pragma: no cover - the stream is defined as little-endian words
            words = words.byteswap()
        part = acc[start:start + m]
        op(part, words, out=part, casting="unsafe")
