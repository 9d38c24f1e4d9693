"""The loss DP-SGD differentiates one example at a time, in a module of its own.

Why its own module: :mod:`.client_dp` hands it to :func:`.dpsgd.dp_sgd_gradients`, and
:mod:`.ghost` must recognise it to vectorise the per-example losses. Both import it from here,
which imports nothing of the package, so neither path needs a lazy import to avoid a loop.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["per_example_cross_entropy"]


def per_example_cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The loss :func:`~fl_common.privacy.dpsgd.dp_sgd_gradients` differentiates (one example at a time)."""
    return F.cross_entropy(output, target)
