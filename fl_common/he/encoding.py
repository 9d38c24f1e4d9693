"""A client's update as the CKKS round's plain slot vector, and the decrypted sum back as sums.

Layout (``CKKSParams``): [f d, f c (SCAFFOLD only), f, f loss (if collected), unclipped bit (if
collected)] with f = n_k / W for weighted rounds (W: the round's public weight bound) and f = 1
otherwise, so the decrypted sum gives sum f d, sum f, ... The count of inputs is known to the server
(it added them) and is not encrypted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fl_common.he.params import CKKSParams

#: the training loss is clipped to [0, LOSS_BOUND] before it is encrypted (keeps the slot bounded)
LOSS_BOUND = 1000.0


@dataclass
class HEInput:
    """What a client contributes, before encoding (flat float vectors)."""

    delta: np.ndarray
    weight: int = 1
    control: np.ndarray | None = None
    loss: float | None = None
    unclipped: bool | None = None


@dataclass
class HESums:
    """The decrypted sums over the ``count`` inputs (weight: sum of n_k, or count when unweighted)."""

    delta: np.ndarray
    control: np.ndarray | None
    weight: float
    loss: float | None
    unclipped: float | None
    count: int


def _clip(v: np.ndarray, bound: float) -> tuple[np.ndarray, bool]:
    norm = float(np.linalg.norm(v))
    if norm > bound:
        return v * (bound / norm), True
    return v, False


def encode_input(params: CKKSParams, plain: HEInput) -> tuple[np.ndarray, bool]:
    """The plain slot vector and whether clipping changed the update (or variate delta)."""
    if isinstance(plain.weight, bool) or not isinstance(plain.weight, (int, np.integer)) or plain.weight < 1:
        raise ValueError(f"weight must be an integer >= 1, got {plain.weight!r}")
    p = params
    delta = np.asarray(plain.delta, dtype=np.float64).ravel()
    if delta.size != p.vector_length:
        raise ValueError(f"delta has {delta.size} values, the round expects {p.vector_length}")
    if not np.isfinite(delta).all():
        raise ValueError("delta has non-finite values")
    clipped = False
    if p.l2_clip:
        delta, clipped = _clip(delta, p.clip)
    weight = min(int(plain.weight), p.weight_bound)
    f = weight / p.weight_bound if p.weighted or p.control_length else 1.0
    parts = [delta * f]
    if p.control_length:
        if plain.control is None:
            raise ValueError("this round carries SCAFFOLD variate deltas but the input has none")
        control = np.asarray(plain.control, dtype=np.float64).ravel()
        if control.size != p.control_length or not np.isfinite(control).all():
            raise ValueError(f"control delta must be {p.control_length} finite values")
        control, c2 = _clip(control, p.clip)
        clipped |= c2
        parts.append(control * f)
    parts.append(np.array([f]))
    if p.with_loss:
        loss = 0.0 if plain.loss is None or not math.isfinite(plain.loss) else min(max(float(plain.loss), 0.0), LOSS_BOUND)
        parts.append(np.array([loss * f]))
    if p.with_unclipped:
        if plain.unclipped is None:
            raise ValueError("this round collects the DP clipping bit, but the input has none")
        parts.append(np.array([1.0 if plain.unclipped else 0.0]))
    out = np.concatenate(parts)
    headroom = 2.0 ** (p.coeff_mod_bits[0] - p.scale_bits - 2) / len(p.clients)
    if float(np.abs(out).max()) >= headroom:
        raise ValueError(f"a value of {float(np.abs(out).max()):.3g} is beyond the CKKS headroom {headroom:.3g} for "
                         f"{len(p.clients)} clients (the sum would wrap modulo q0)")
    return out, clipped


def decode_sum(params: CKKSParams, values: np.ndarray, count: int) -> HESums:
    """Split the decrypted slots into the sums (rescaling the weight by W)."""
    p = params
    if values.shape != (p.plain_length,):
        raise ValueError(f"decrypted sum has shape {values.shape}, expected ({p.plain_length},)")
    at = p.vector_length
    delta = values[:at].copy()
    control = None
    if p.control_length:
        control = values[at:at + p.control_length].copy()
        at += p.control_length
    scaled = p.weighted or p.control_length
    fsum = float(values[at])
    at += 1
    loss = None
    if p.with_loss:
        loss = float(values[at]) / fsum if fsum > 0 else None
        at += 1
    unclipped = None
    if p.with_unclipped:
        unclipped = float(values[at])
    weight = fsum * p.weight_bound if scaled else float(count)
    return HESums(delta=delta, control=control, weight=weight, loss=loss, unclipped=unclipped, count=count)


__all__ = ["LOSS_BOUND", "HEInput", "HESums", "decode_sum", "encode_input"]
