"""Masks ready before the update is: expand a client's self and pairwise masks while it still trains.

Why: a client's masked input is ``y = x + PRG(b_u) + sum_v +-PRG(s_uv)`` (fl_common/secagg/masks.py).
Expanding the PRG streams costs one pass over the model per neighbour plus one, and it depends only
on secrets the client holds once keys are shared (phase 1), never on the update. Done at upload time it
sits between the end of training and the masked input, on the round's critical path; done here, in a
background thread from the moment keys are shared, it overlaps local training and the upload is one
vector add.

Exactness: the masks are summed over *every* neighbour in the roster's graph. At upload only the
neighbours that shared keys (``neighbours & U2``, from the share bundle) may be masked with; the mask of
any other is subtracted again (expanded then, a rare case: a neighbour that dropped in phase 1). All of it is
word arithmetic that wraps mod 2^32 or 2^64 (prg.word_dtype), which 2^b divides, so the result equals
:func:`~fl_common.secagg.masks.mask_input` bit for bit (tests/common/test_secagg_precompute.py).

The secrets never leave the object; a failure in the background (a degenerate peer key) makes
:meth:`MaskPrecompute.mask` return None and the caller masks the ordinary way, which refuses with the
state machine's own error.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Set
from dataclasses import dataclass, field

import numpy as np

from fl_common.secagg.encoding import PlainInput, encode_input, pack
from fl_common.secagg.masks import add_pairwise_mask, add_self_mask, mask_words, reduce_words, word_vector
from fl_common.secagg.messages import SecAggParams
from fl_common.secagg.prg import word_dtype

__all__ = ["MaskMaterial", "MaskPrecompute", "MaskingJob", "mask_payload"]


@dataclass(frozen=True, repr=False)
class MaskMaterial:
    """What one client's masks in one attempt are made of (secret: never logged, never sent)."""

    index: int
    self_seed: bytes
    #: neighbour index -> raw X25519 shared secret of the mask key pairs
    pairwise_secrets: Mapping[int, bytes]
    modulus_bits: int
    context: bytes
    length: int

    def __repr__(self) -> str:
        return f"MaskMaterial(index={self.index}, neighbours={sorted(self.pairwise_secrets)}, <secrets redacted>)"

    def add_pairwise(self, acc: np.ndarray, peer: int, *, sign: int = 1) -> None:
        """``acc += sign x`` this client's pairwise term for ``peer`` (in place, unreduced)."""
        add_pairwise_mask(acc, self.pairwise_secrets[peer], self.index, peer, self.modulus_bits, context=self.context,
                          sign=sign)


@dataclass
class MaskPrecompute:
    """The sum of a client's self mask and its pairwise masks for every neighbour, expanded in a thread.

    ``start()`` returns at once; :meth:`mask` waits for the expansion (it normally finished during
    training) and applies it to an encoded input."""

    material: MaskMaterial
    _total: np.ndarray | None = field(default=None, init=False)
    _failed: BaseException | None = field(default=None, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    def start(self) -> MaskPrecompute:
        self._thread = threading.Thread(target=self._expand, name="fl-secagg-masks", daemon=True)
        self._thread.start()
        return self

    def _expand(self) -> None:
        m = self.material
        try:
            total = np.zeros(m.length, dtype=word_dtype(m.modulus_bits))
            add_self_mask(total, m.self_seed, m.modulus_bits, context=m.context)
            for peer in sorted(m.pairwise_secrets):
                m.add_pairwise(total, peer)  # the word wraps mod 2^32 or 2^64; 2^b divides it
            self._total = total
        except (ValueError, ArithmeticError) as exc:
            self._failed = exc

    def ready(self) -> bool:
        """Whether the expansion has finished (successfully or not)."""
        return self._thread is not None and not self._thread.is_alive()

    def mask(self, x_encoded: np.ndarray, neighbours_in_sum: Set[int], *, in_place: bool = False) -> np.ndarray | None:
        """``x + PRG(b_u) + sum over neighbours_in_sum of +-PRG(s_uv) mod 2^b``, or None when the masks could
        not be expanded (or ``neighbours_in_sum`` names a peer outside the graph): mask the ordinary way then.
        ``in_place``: ``x_encoded`` is a word vector the caller gives up (``encode_input(..., words=True)``): it is
        masked where it is and returned in its word dtype (no copy, no uint64 widening)."""
        if self._thread is None:
            self._expand()
        else:
            self._thread.join()
        m = self.material
        if self._total is None or x_encoded.size != m.length or not set(neighbours_in_sum) <= set(m.pairwise_secrets):
            return None
        owned = in_place and x_encoded.dtype == self._total.dtype and x_encoded.flags.c_contiguous
        y = x_encoded if owned else word_vector(x_encoded, m.modulus_bits)
        y += self._total
        for peer in sorted(set(m.pairwise_secrets) - set(neighbours_in_sum)):  # shared no keys: not masked with
            m.add_pairwise(y, peer, sign=-1)
        if owned:
            np.bitwise_and(y, y.dtype.type((1 << m.modulus_bits) - 1), out=y)
            return y
        return reduce_words(y, m.modulus_bits)


@dataclass(frozen=True, repr=False)
class MaskingJob:
    """Everything masking one client's input takes once its bundle is opened (secret: never logged): the
    simulation hands it to the client worker that trains the client, so the masking runs there, in parallel,
    instead of serially in the driver (``SecAggClient.masking_job``; the payload goes back to be signed)."""

    params: SecAggParams
    index: int
    self_seed: bytes
    #: neighbour index -> raw X25519 shared secret, for the neighbours that shared keys (those masked with)
    pairwise_secrets: Mapping[int, bytes]
    context: bytes
    #: seeds the stochastic rounding as the client's own rng would
    rounding_seed: int

    def __repr__(self) -> str:
        return f"MaskingJob(index={self.index}, neighbours={sorted(self.pairwise_secrets)}, <secrets redacted>)"


def mask_payload(job: MaskingJob, plain: PlainInput) -> tuple[bytes, bool]:
    """The packed masked input ``y = x + PRG(b_u) + sum_v +-PRG(s_uv)`` and whether clipping bound: the very
    computation of ``SecAggClient.masked_input`` (same encoding, same rounding stream, same masks), run wherever
    the job was sent."""
    p = job.params
    x, clipped = encode_input(p, plain, np.random.default_rng(job.rounding_seed), words=True)
    y = mask_words(x, job.index, job.self_seed, dict(job.pairwise_secrets), p.modulus_bits, context=job.context)
    return pack(y, p.modulus_bits), clipped
