"""Drawing k distinct clients so that each one's chance of being drawn is exactly what a policy says.

Why this scheme. A policy states a weight p_i per client ("p_k proportional to ..."). Drawing k
clients *without replacement* cannot make every client's chance equal to k * p_i when some
k * p_i exceed 1, and the usual sequential scheme (draw one with probability p_i, renormalise,
repeat; Efraimidis-Spirakis keys are the same thing) makes the inclusion probabilities an
awkward function of all the weights that nobody can state in closed form. So here
"probability" means the **inclusion probability** pi_i = P(client i is among the k drawn), and:

1. :func:`inclusion_probabilities` turns weights into pi_i = min(1, c * w_i) with c chosen so
   that sum(pi) = k (clients whose share would exceed one slot are taken with certainty and the
   remaining slots are shared in proportion among the rest - the standard capping of
   probability-proportional-to-size sampling). With no capped client, pi_i = k * w_i / sum(w).
2. :func:`systematic_sample` draws exactly k distinct clients with exactly those pi_i:
   randomised systematic sampling (Madow 1949; Goodman & Kish 1950) - the units are put in a
   random order, laid end to end as intervals of length pi_i on [0, k), and the units hit by
   the points u, u+1, ..., u+k-1 (u ~ U[0, 1)) are taken. Each interval is shorter than 1, so
   no unit is hit twice, and unit i is hit with probability pi_i. The random order makes every
   pair of clients possible together (no fixed-neighbour artefacts).

Everything is deterministic given the ``numpy.random.Generator`` passed in; selectors seed it
from (run seed, round), so a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

import numpy as np

__all__ = ["inclusion_probabilities", "systematic_sample"]


def inclusion_probabilities(weights: np.ndarray, k: int) -> np.ndarray:
    """pi with sum(pi) = min(k, #positive weights), pi_i proportional to w_i, capped at 1.

    Clients with weight 0 are never drawn; when fewer than k clients have a positive weight,
    all of those are taken (pi = 1) and fewer than k clients are drawn.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1:
        raise ValueError("weights must be a 1-d array")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("selection weights must be finite and >= 0")
    if k < 0:
        raise ValueError(f"cannot select {k} clients")
    pi = np.zeros_like(w)
    free = w > 0
    slots = float(min(k, int(free.sum())))
    while slots > 0 and free.any():
        share = slots * w[free] / w[free].sum()
        capped = share >= 1.0
        if not capped.any():
            pi[free] = share
            break
        idx = np.flatnonzero(free)[capped]
        pi[idx] = 1.0
        free[idx] = False
        slots -= len(idx)
    return pi


def systematic_sample(pi: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of the drawn units (sorted), each unit i drawn with probability exactly pi_i.

    ``pi`` must lie in [0, 1] and sum to an integer (what :func:`inclusion_probabilities`
    returns); that integer is the number drawn.
    """
    pi = np.asarray(pi, dtype=np.float64)
    if np.any(pi < 0) or np.any(pi > 1):
        raise ValueError("inclusion probabilities must lie in [0, 1]")
    total = float(pi.sum())
    k = round(total)
    if abs(total - k) > 1e-6:
        raise ValueError(f"inclusion probabilities must sum to an integer, got {total}")
    certain = np.flatnonzero(pi >= 1.0)
    rest = np.flatnonzero((pi > 0) & (pi < 1.0))
    m = k - len(certain)
    order = rng.permutation(rest)  # drawn even when m == 0, so the stream's use does not depend on pi
    u = rng.random()
    if m <= 0 or len(order) == 0:
        return np.sort(certain)
    cum = np.cumsum(pi[order])
    cum *= m / cum[-1]  # remove rounding drift: the intervals tile [0, m) exactly
    cum[-1] = float(m)
    hits = np.searchsorted(cum, u + np.arange(m), side="right")
    return np.sort(np.concatenate([certain, order[hits]]))
