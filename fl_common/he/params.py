"""The public parameters of one CKKS round: ring, moduli, scale, and how a client's update is laid
out in the slots; plus the error bound of the decrypted sum.

Why these ring parameters: aggregation only adds ciphertexts (no multiplication, no rescaling), so
one data prime q0 of 60 bits and one special prime of 60 bits (log QP = 120 < 218, the 128-bit
classical bound of the HE standard for N = 8192) are enough; the scale 2^40 leaves 2^19 of headroom
above the sum's magnitude (every value is clipped to ``clip`` in L2, and at most ``n`` are added).
N = 4096 would halve nothing that matters: it needs a smaller scale (log QP <= 109) and its error
grows to ~1e-2 (measured). With N = 8192 each ciphertext carries N/2 = 4096 real slots, so the
1,663,370-parameter cnn plus its weight slot is 407 ciphertexts.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

#: CKKS ring dimension N (slots = N / 2)
RING_DIMENSION = 8192
#: bit sizes of the coefficient-modulus primes: one data prime and the special prime
COEFF_MOD_BITS = (60, 60)
#: log2 of the encoding scale Delta
SCALE_BITS = 40
#: std of the RLWE error (SEAL's default)
ERROR_STD = 3.2


@dataclass(frozen=True)
class CKKSParams:
    """What every participant of a CKKS round agrees on (sent to the clients with the public key).

    ``weighted``: the plain vector is [w d (vector_length), w (1)] with w = n_k / weight_bound, so the
    sum yields the weighted mean and the total weight; otherwise [d, 1] (count) and, when
    ``with_unclipped``, the clipping bit of adaptive clipping. ``control_length``: SCAFFOLD's variate
    delta follows the update. ``clip``: L2 bound of d (and of the variate delta) applied by the client."""

    round: int
    clients: tuple[str, ...]
    decryptor: str
    vector_length: int
    clip: float
    weighted: bool
    weight_bound: int = 1
    control_length: int = 0
    with_unclipped: bool = False
    with_loss: bool = False
    noise_std: float = 0.0
    l2_clip: bool = True
    ring_dimension: int = RING_DIMENSION
    coeff_mod_bits: tuple[int, ...] = COEFF_MOD_BITS
    scale_bits: int = SCALE_BITS

    def __post_init__(self) -> None:
        if self.vector_length < 1 or self.control_length < 0:
            raise ValueError(f"CKKS vector length must be positive, got {self.vector_length} / {self.control_length}")
        if not self.clients or self.decryptor not in self.clients:
            raise ValueError(f"the decryptor {self.decryptor!r} must be one of the round's clients")
        if self.ring_dimension & (self.ring_dimension - 1) or not 1024 <= self.ring_dimension <= 32768:
            raise ValueError(f"CKKS ring dimension must be a power of two in [1024, 32768], got {self.ring_dimension}")
        if self.weight_bound < 1 or not math.isfinite(self.clip) or self.clip <= 0:
            raise ValueError(f"bad CKKS weight bound {self.weight_bound} or clip {self.clip}")

    @property
    def slots(self) -> int:
        return self.ring_dimension // 2

    @property
    def plain_length(self) -> int:
        """Update, variate delta, then the scalars: weight/count, loss (weighted only), unclipped bit."""
        return self.vector_length + self.control_length + 1 + int(self.with_loss) + int(self.with_unclipped)

    @property
    def num_ciphertexts(self) -> int:
        return -(-self.plain_length // self.slots)

    def chunk_lengths(self) -> list[int]:
        """The slot count used by each ciphertext (the last one may be partial)."""
        full, rest = divmod(self.plain_length, self.slots)
        return [self.slots] * full + ([rest] if rest else [])

    def error_bound(self, n: int) -> float:
        """Per-slot bound on |decrypted sum - exact sum| of ``n`` fresh ciphertexts.

        Each fresh public-key encryption has canonical-embedding noise at most
        B_clean = 8 sqrt(2) sigma N + 6 sigma sqrt(N) + 16 sigma sqrt(h N) (Cheon, Kim, Kim, Song 2017,
        Lemma 1; h <= N for SEAL's ternary secret), and the encoder rounds each coefficient by at most
        1/2 (at most N/2 in the embedding); adding n ciphertexts adds their noises, and decoding divides
        by the scale. The bound holds with overwhelming probability (six-sigma tails per coefficient),
        and is ~25x above what is measured (tests/common/test_he.py)."""
        ring, s = self.ring_dimension, ERROR_STD
        b_clean = 8 * math.sqrt(2) * s * ring + 6 * s * math.sqrt(ring) + 16 * s * math.sqrt(ring * ring)
        return n * (b_clean + ring / 2) / 2.0 ** self.scale_bits

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["clients"] = list(self.clients)
        d["coeff_mod_bits"] = list(self.coeff_mod_bits)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CKKSParams:
        try:
            return cls(**{**d, "clients": tuple(str(c) for c in d["clients"]),
                          "coeff_mod_bits": tuple(int(b) for b in d["coeff_mod_bits"])})
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed CKKS parameters: {exc}") from None

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True).encode()


__all__ = ["COEFF_MOD_BITS", "ERROR_STD", "RING_DIMENSION", "SCALE_BITS", "CKKSParams"]
