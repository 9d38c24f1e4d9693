"""A file-free 10-class image task, so tests and smoke runs need no dataset on disk.

Each class has a smooth random prototype image; a sample is its class prototype at a random
contrast, plus a weaker prototype of another class and heavy pixel noise. That keeps it
learnable by a linear model (around 90 % test accuracy) yet far from trivially separable, so
federated effects (non-IID drift, noise from privacy) still show up in accuracy curves.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["SYNTHETIC_SIZES", "SYNTHETIC_NUM_CLASSES", "make_synthetic"]

SYNTHETIC_NUM_CLASSES = 10
SYNTHETIC_SIZES = {"train": 6000, "test": 1000}
_SIDE = 28
_PROTO_SIDE = 7  # low-res prototypes upsampled: spatially smooth, so convolutions have something to find
_NOISE_STD = 3.0
_CONTRAST = (0.5, 1.5)
_DISTRACTOR_MAX = 0.8
# Analytic pixel std of the generator (prototypes have unit variance): E[a^2] + E[b^2] + noise^2.
_PIXEL_STD = math.sqrt(
    (_CONTRAST[1] - _CONTRAST[0]) ** 2 / 12 + ((_CONTRAST[0] + _CONTRAST[1]) / 2) ** 2
    + _DISTRACTOR_MAX**2 / 3
    + _NOISE_STD**2
)
_SPLIT_STREAM = {"train": 1, "test": 2}


def _prototypes(seed: int) -> np.ndarray:
    # Stream 0 of the seed: shared by both splits, otherwise test would be a different task.
    rng = np.random.default_rng([seed, 0])
    low = rng.standard_normal((SYNTHETIC_NUM_CLASSES, 1, _PROTO_SIDE, _PROTO_SIDE), dtype=np.float32)
    up = torch.nn.functional.interpolate(
        torch.from_numpy(low), size=(_SIDE, _SIDE), mode="bilinear", align_corners=False
    )
    up = up / up.std(dim=(1, 2, 3), keepdim=True)
    return up.numpy()


def make_synthetic(split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x, y)``: x float32 [N, 1, 28, 28] already standardised, y int64 [N], classes balanced."""
    n = SYNTHETIC_SIZES[split]
    protos = _prototypes(seed)
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    y = rng.permutation(np.arange(n) % SYNTHETIC_NUM_CLASSES)
    other = (y + rng.integers(1, SYNTHETIC_NUM_CLASSES, n)) % SYNTHETIC_NUM_CLASSES
    contrast = rng.uniform(*_CONTRAST, n).astype(np.float32)[:, None, None, None]
    distractor = rng.uniform(0.0, _DISTRACTOR_MAX, n).astype(np.float32)[:, None, None, None]
    x = rng.standard_normal((n, 1, _SIDE, _SIDE), dtype=np.float32)
    x *= _NOISE_STD
    x += contrast * protos[y]
    x += distractor * protos[other]
    x /= _PIXEL_STD
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
