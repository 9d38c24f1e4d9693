"""The primitive DP mechanisms: L2 clipping, Gaussian and Laplace noise, adaptive clipping.

Why these live apart from the training code: the same clip-then-noise appears in sample-
level DP-SGD (per example), in DP-FedAvg (per client update) and in private statistics
(histograms, clipped-count bits); one tested implementation keeps the sensitivity argument
in one place.

Randomness: every sampler takes an optional ``torch.Generator``. Tests and simulations pass
a seeded one for reproducibility; with ``None`` a fresh generator is seeded from the OS
CSPRNG (``secrets``), so production noise is not predictable from a fixed seed. Note that
torch's generator is a Mersenne Twister and the samplers use floating point: fine for
research and simulation, but not hardened against the floating-point attacks of Mironov
2012 ("On significance of the least significant bits for differential privacy").
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .validation import check_clip_norm, check_epsilon

__all__ = [
    "secure_generator",
    "clip_l2",
    "gaussian_noise",
    "add_gaussian_noise",
    "laplace_noise",
    "laplace_histogram",
    "AdaptiveClipState",
    "adaptive_clip_noise_multiplier",
]


def secure_generator(device: torch.device | str | None = None) -> torch.Generator:
    """A generator seeded from the OS CSPRNG (for when the caller does not pass one)."""
    gen = torch.Generator(device=device if device is not None else "cpu")
    gen.manual_seed(secrets.randbits(63))
    return gen


def _generator(generator: torch.Generator | None, device: torch.device | str | None) -> torch.Generator:
    return generator if generator is not None else secure_generator(device)


def _check_std(std: float, name: str = "std") -> float:
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not (std >= 0 and math.isfinite(std)):
        raise ValueError(f"{name} must be a finite number >= 0; got {std!r}")
    return float(std)


def clip_l2(vector: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, float]:
    """Scales ``vector`` so its L2 norm is ≤ ``max_norm``; returns (clipped copy, original norm).

    Why the care: C is the sensitivity the noise is calibrated to, so ‖clipped‖ ≤ C must hold
    for the float32 values actually produced, not just in exact arithmetic. The norm is
    measured in float64 (no float32 overflow for huge entries, no underflow for tiny ones),
    and if rounding of the scaled float32 values lands a hair above C the scale is nudged
    down until the float64 norm of the result is ≤ C. Vectors already within C are returned
    unchanged (as a copy). Non-finite entries raise ``ValueError``: they cannot be clipped.
    """
    max_norm = check_clip_norm(max_norm, "max_norm")
    if not torch.is_floating_point(vector):
        raise ValueError(f"vector must be a floating-point tensor; got dtype {vector.dtype}")
    norm = float(torch.linalg.vector_norm(vector.detach(), dtype=torch.float64))
    if not math.isfinite(norm):
        raise ValueError("vector contains non-finite values (inf/NaN); it cannot be clipped")
    if norm <= max_norm:
        return vector.clone(), norm
    scale = max_norm / norm
    for _ in range(64):
        clipped = (vector.to(torch.float64) * scale).to(vector.dtype)
        if float(torch.linalg.vector_norm(clipped, dtype=torch.float64)) <= max_norm:
            return clipped, norm
        scale *= 1.0 - 2.0**-20
    raise ArithmeticError("could not clip within max_norm")  # pragma: no cover - unreachable in practice


def gaussian_noise(
    shape: Sequence[int] | torch.Size,
    std: float,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """i.i.d. N(0, std²) of the given shape."""
    std = _check_std(std)
    gen = _generator(generator, device)
    noise = torch.randn(tuple(shape), generator=gen, dtype=dtype, device=device if device is not None else gen.device)
    return noise * std


def add_gaussian_noise(vector: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``vector + N(0, std² I)`` as a new tensor (same dtype and device). std = σ·C for the Gaussian mechanism."""
    return vector + gaussian_noise(vector.shape, std, generator, dtype=vector.dtype, device=vector.device)


def laplace_noise(
    shape: Sequence[int] | torch.Size,
    scale: float,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """i.i.d. Laplace(0, scale), sampled as the difference of two Exp(1) draws times ``scale``.

    Why not ``torch.distributions.Laplace``: it does not accept a generator.
    """
    scale = _check_std(scale, "scale")
    gen = _generator(generator, None)
    shape = tuple(shape)
    e1 = torch.empty(shape, dtype=torch.float64).exponential_(1.0, generator=gen)
    e2 = torch.empty(shape, dtype=torch.float64).exponential_(1.0, generator=gen)
    return ((e1 - e2) * scale).to(dtype)


def laplace_histogram(
    counts: torch.Tensor | Sequence[float],
    epsilon: float,
    sensitivity: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pure ε-DP histogram: each count plus Laplace(0, sensitivity/ε) noise (float64).

    Sensitivity is the L1 change of the whole count vector when one record changes:

    * each record falls in exactly one bin, add/remove-one neighbours → 1 (the default);
    * replace-one neighbours (one bin −1, another +1) → 2;
    * a record that can touch k bins → k.

    Noise on all bins with that single scale gives ε-DP for the whole vector (the L1
    sensitivity already accounts for the bins jointly). Noisy counts may be negative or
    fractional; rounding or clamping them afterwards is post-processing and costs nothing.
    """
    epsilon = check_epsilon(epsilon)
    if isinstance(sensitivity, bool) or not (sensitivity > 0 and math.isfinite(sensitivity)):
        raise ValueError(f"sensitivity must be a finite number > 0 (L1, in counts); got {sensitivity!r}")
    values = torch.as_tensor(counts, dtype=torch.float64)
    return values + laplace_noise(values.shape, sensitivity / epsilon, generator)


def adaptive_clip_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """Noise multiplier z_Δ for the update when the clipped-count bits also spend privacy.

    Andrew et al. 2021 (“Differentially Private Learning with Adaptive Clipping”, NeurIPS),
    §3: releasing both the noised update sum (multiplier z_Δ) and the noised count of
    centred bits (sensitivity 1/2, noise std σ_b, i.e. multiplier 2σ_b) composes like one
    Gaussian mechanism with multiplier z where z⁻² = z_Δ⁻² + (2σ_b)⁻². So to keep the
    accountant's z, the update must use z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2), which requires z < 2σ_b.
    """
    z = float(noise_multiplier)
    sb = _check_std(count_noise_std, "count_noise_std")
    if not (z > 0 and math.isfinite(z)):
        raise ValueError(f"noise_multiplier must be a finite number > 0; got {noise_multiplier!r}")
    if sb == 0.0 or z >= 2.0 * sb:
        raise ValueError(
            f"count_noise_std must exceed noise_multiplier/2 = {z / 2:g} for the adaptive clipping "
            f"count to fit in the budget; got {count_noise_std!r} (Andrew et al. suggest expected_clients/20)"
        )
    return float((z**-2 - (2.0 * sb) ** -2) ** -0.5)


@dataclass
class AdaptiveClipState:
    """Geometric adaptive clipping towards a target quantile (Andrew et al. 2021).

    Each round, every participant reports the bit b_i = 1 if its update norm ≤ C (unclipped).
    The server releases the noisy fraction b̄ = (Σ(b_i − ½) + N(0, σ_b²)) / m + ½, with m the
    expected number of participants, and updates C ← C · exp(−η (b̄ − γ)): too many unclipped
    updates (b̄ > γ) shrink C, too few grow it. The geometric step makes the rate scale-free.
    Use :func:`adaptive_clip_noise_multiplier` to pay for the count in the update's noise.
    """

    clip_norm: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_std: float = 0.0

    def __post_init__(self) -> None:
        self.clip_norm = check_clip_norm(self.clip_norm, "clip_norm")
        if not 0.0 <= self.target_quantile <= 1.0:
            raise ValueError(f"target_quantile must be in [0, 1]; got {self.target_quantile!r}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a finite number > 0; got {self.learning_rate!r}")
        self.count_noise_std = _check_std(self.count_noise_std, "count_noise_std")

    def unclipped_bits(self, norms: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """b_i = 1.0 where norm ≤ the current clip norm, else 0.0."""
        return (torch.as_tensor(norms, dtype=torch.float64) <= self.clip_norm).to(torch.float64)

    def noisy_unclipped_fraction(
        self,
        norms: torch.Tensor | Sequence[float],
        expected_count: float,
        generator: torch.Generator | None = None,
    ) -> float:
        """b̄ from the participants' norms: centred bit sum + N(0, σ_b²), over the expected count."""
        if not (expected_count > 0 and math.isfinite(expected_count)):
            raise ValueError(f"expected_count must be a finite number > 0; got {expected_count!r}")
        bits = self.unclipped_bits(norms)
        centred_sum = float((bits - 0.5).sum())
        noise = float(gaussian_noise((), self.count_noise_std, generator, dtype=torch.float64))
        return (centred_sum + noise) / expected_count + 0.5

    def update(self, fraction_unclipped_noisy: float) -> float:
        """C ← C · exp(−η (b̄ − γ)); returns the new clip norm."""
        b = float(fraction_unclipped_noisy)
        if not math.isfinite(b):
            raise ValueError(f"fraction_unclipped_noisy must be finite; got {fraction_unclipped_noisy!r}")
        self.clip_norm = self.clip_norm * math.exp(-self.learning_rate * (b - self.target_quantile))
        return self.clip_norm
