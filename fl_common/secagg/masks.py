"""Pairwise and self masks (Bonawitz et al. 2017, section 4) over Z_{2^b}.

Client u sends  y_u = x_u + PRG(b_u) + sum_{v in N(u)} s(u,v) * PRG(s_uv)   (mod 2^b)
with s(u,v) = +1 if u < v else -1. For every pair both ends derive the same seed s_uv from
their X25519 shared secret, with opposite signs, so over a set where every pair is present the
pairwise terms cancel and the server is left with sum x_u + sum PRG(b_u).

Dropouts: if v drops after u masked, u's term for v stays in the sum. The server reconstructs
v's mask *private key* from Shamir shares held by survivors, recomputes s_uv with each
surviving neighbour u's public key, and subtracts u's term (``pairwise_mask(s_uv, u, v)``).
For survivors it reconstructs b_u instead and subtracts PRG(b_u). An honest client must never
reveal both kinds of share for the same peer, or the server could unmask that peer's input.

Ids are small positive integers (the round's logical indices, also the Shamir x-coordinates),
which gives the total order the sign convention needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fl_common.secagg.field import neg_mod
from fl_common.secagg.prg import SEED_LEN, add_expansion, expand_seed, word_dtype

__all__ = [
    "pairwise_seed",
    "pairwise_mask",
    "self_mask",
    "mask_input",
    "unmask_sum",
    "add_pairwise_mask",
    "add_self_mask",
    "word_vector",
    "reduce_words",
    "mask_words",
]

_PAIR_INFO = b"fl-hub/v1/secagg/pairwise-seed|"
_PAIR_LABEL = b"pairwise|"
_SELF_LABEL = b"self|"


def _check_ids(u: int, v: int) -> None:
    if not (isinstance(u, int) and isinstance(v, int)) or u < 1 or v < 1:
        raise ValueError("secagg ids must be positive integers")
    if u == v:
        raise ValueError("a client has no pairwise mask with itself")


def pairwise_seed(shared_secret: bytes, u: int, v: int, *, context: bytes = b"") -> bytes:
    """PRG seed for the pair {u, v}: HKDF over the raw X25519 secret, bound to the unordered
    pair and the round ``context``. Symmetric: ``pairwise_seed(s, u, v) == pairwise_seed(s, v, u)``."""
    _check_ids(u, v)
    if len(shared_secret) != 32:
        raise ValueError("shared secret must be 32 bytes")
    lo, hi = min(u, v), max(u, v)
    info = _PAIR_INFO + lo.to_bytes(8, "big") + hi.to_bytes(8, "big") + len(context).to_bytes(4, "big") + context
    return HKDF(algorithm=hashes.SHA256(), length=SEED_LEN, salt=None, info=info).derive(shared_secret)


def pairwise_mask(
    shared_secret: bytes, own_id: int, peer_id: int, n: int, modulus_bits: int, *, context: bytes = b""
) -> np.ndarray:
    """The term client ``own_id`` adds for ``peer_id``: +PRG(s_uv) if own_id < peer_id, else -PRG(s_uv)."""
    stream = expand_seed(pairwise_seed(shared_secret, own_id, peer_id, context=context), n, modulus_bits,
                         label=_PAIR_LABEL + context)
    return stream if own_id < peer_id else neg_mod(stream, modulus_bits)


def add_pairwise_mask(acc: np.ndarray, shared_secret: bytes, own_id: int, peer_id: int, modulus_bits: int, *,
                      context: bytes = b"", sign: int = 1) -> None:
    """``acc += sign x pairwise_mask(...)`` in place and unreduced (``acc``: a word vector, see
    :func:`~fl_common.secagg.prg.add_expansion`): the same term without a vector of its own."""
    positive = (own_id < peer_id) == (sign > 0)
    add_expansion(acc, pairwise_seed(shared_secret, own_id, peer_id, context=context), modulus_bits,
                  label=_PAIR_LABEL + context, subtract=not positive)


def add_self_mask(acc: np.ndarray, self_seed: bytes, modulus_bits: int, *, context: bytes = b"", sign: int = 1) -> None:
    """``acc += sign x self_mask(...)`` in place and unreduced."""
    add_expansion(acc, self_seed, modulus_bits, label=_SELF_LABEL + context, subtract=sign < 0)


def word_vector(x: np.ndarray, modulus_bits: int) -> np.ndarray:
    """A fresh contiguous copy of ring elements ``x`` in the word dtype of ``modulus_bits`` (uint32 up to 32
    bits): the accumulator the masking adds its streams into."""
    return np.array(np.asarray(x).ravel(), dtype=word_dtype(modulus_bits))


def reduce_words(acc: np.ndarray, modulus_bits: int) -> np.ndarray:
    """``acc mod 2^b`` as the uint64 vector every caller of the masking gets (one pass; ``acc`` is consumed)."""
    np.bitwise_and(acc, acc.dtype.type((1 << modulus_bits) - 1), out=acc)
    return acc if acc.dtype == np.uint64 else acc.astype(np.uint64)


def self_mask(self_seed: bytes, n: int, modulus_bits: int, *, context: bytes = b"") -> np.ndarray:
    """PRG(b_u). Without it, the server could learn x_u of a client it wrongly believed dropped
    (its pairwise masks would be removed); with it, each x_u stays hidden until b_u is revealed."""
    return expand_seed(self_seed, n, modulus_bits, label=_SELF_LABEL + context)


def mask_input(
    x_encoded: np.ndarray,
    own_id: int,
    self_seed: bytes,
    pairwise_secrets: Mapping[int, bytes],
    modulus_bits: int,
    *,
    context: bytes = b"",
) -> np.ndarray:
    """y_u = x_u + PRG(b_u) + sum_v s(u,v) PRG(s_uv) mod 2^b, over the neighbours in ``pairwise_secrets``.

    ``pairwise_secrets`` maps neighbour id -> raw X25519 shared secret (from the round's
    *mask* key pair). ``context`` should carry the round id unless keys are fresh per round.
    """
    y = mask_words(word_vector(x_encoded, modulus_bits), own_id, self_seed, pairwise_secrets, modulus_bits,
                   context=context)  # on a copy: the caller's array is never modified
    return y if y.dtype == np.uint64 else y.astype(np.uint64)


def mask_words(words: np.ndarray, own_id: int, self_seed: bytes, pairwise_secrets: Mapping[int, bytes],
               modulus_bits: int, *, context: bytes = b"") -> np.ndarray:
    """:func:`mask_input` in place on a word vector the caller gives up (``word_vector``'s dtype, e.g. from
    ``encode_input(..., words=True)``), returned reduced mod 2^b in that dtype: :func:`~fl_common.secagg.encoding.pack`
    takes it as it is. Why: a client's masking then makes no copy of its input and no uint64 widening of the
    result (two 6.7 / 13 MB passes at a cnn's size, a quarter of what masking costs besides the PRG)."""
    if words.dtype != word_dtype(modulus_bits) or words.ndim != 1 or not words.flags.c_contiguous:
        raise ValueError(f"words must be a contiguous 1-D {word_dtype(modulus_bits)} vector")
    # Accumulate in place: the word wraps mod 2^32 or 2^64, which 2^b divides, so one final reduction suffices.
    add_self_mask(words, self_seed, modulus_bits, context=context)
    for peer_id, secret in sorted(pairwise_secrets.items()):
        add_pairwise_mask(words, secret, own_id, peer_id, modulus_bits, context=context)
    np.bitwise_and(words, words.dtype.type((1 << modulus_bits) - 1), out=words)
    return words


def unmask_sum(
    masked_sum: np.ndarray,
    modulus_bits: int,
    *,
    survivor_self_seeds: Mapping[int, bytes],
    dangling_pairs: Iterable[tuple[int, int, bytes]] = (),
    context: bytes = b"",
    consume: bool = False,
) -> np.ndarray:
    """Server side: remove survivors' self masks and the masks survivors added for dropped peers.

    ``masked_sum`` is the mod-2^b sum of the survivors' ``y_u``. ``dangling_pairs`` holds
    ``(survivor_id, dropped_id, shared_secret)`` for every survivor-dropped neighbour pair, the
    secret recomputed from the dropped client's reconstructed mask private key.

    ``consume``: ``masked_sum`` is a contiguous word vector (``word_vector``'s dtype) the caller gives up: the masks
    are removed where it lies and it is returned reduced in that dtype (the server's running sum: no 6.6 MB copy
    and no uint64 widening on the round's critical path; ``field.decode_sum`` reads uint32 as it is).
    """
    owned = (consume and masked_sum.dtype == word_dtype(modulus_bits) and masked_sum.ndim == 1
             and masked_sum.flags.c_contiguous and masked_sum.flags.writeable)
    s = masked_sum if owned else word_vector(masked_sum, modulus_bits)  # the low b bits are all that matter
    for seed in survivor_self_seeds.values():
        add_self_mask(s, seed, modulus_bits, context=context, sign=-1)
    for survivor_id, dropped_id, secret in dangling_pairs:
        add_pairwise_mask(s, secret, survivor_id, dropped_id, modulus_bits, context=context, sign=-1)
    if owned:
        np.bitwise_and(s, s.dtype.type((1 << modulus_bits) - 1), out=s)
        return s
    return reduce_words(s, modulus_bits)
