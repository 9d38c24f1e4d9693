"""A client's label histogram released under pure epsilon-DP.

Why here and not in ``fl_server.selection``: the histogram is computed and noised on the client
(the REST daemon), which may import only ``fl_common``; the simulation noises the same way with
a seeded generator. ``fl_server.selection`` re-exports :func:`private_label_histogram`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .mechanisms import laplace_histogram

__all__ = ["private_label_histogram"]


def private_label_histogram(counts: Sequence[float] | np.ndarray, epsilon: float,
                            generator: torch.Generator | None = None) -> tuple[float, ...]:
    """The client's label histogram under pure epsilon-DP (Laplace, L1 sensitivity 1).

    Adding or removing one record changes one bin by one, so Laplace(1/epsilon) noise on every
    bin is epsilon-DP for the whole vector (fl_common.privacy.laplace_histogram). Negative noisy
    counts are clamped to 0 afterwards: post-processing, it costs no privacy. A deployed client
    passes no generator (OS randomness) and releases its histogram once (a second noisy release
    would compose to 2 epsilon); the simulation passes one seeded by (seed, client).
    """
    noisy = laplace_histogram(torch.as_tensor(np.asarray(counts, dtype=np.float64)), epsilon, 1.0, generator)
    return tuple(float(v) for v in noisy.clamp_min(0.0).tolist())
