"""Noise calibration: the smallest-enough σ for a target (ε, δ).

Why bisection on σ (as Opacus' ``get_noise_multiplier``): ε is monotone decreasing in σ for
a fixed (q, steps, δ), and the accountant is a black box, so bracketing + bisection is the
simplest method that works for every accountant. We always return the *upper* end of the
bracket, whose ε was actually computed and is ≤ the target, so the returned σ never
overspends; bisection stops once that ε is within ``tolerance`` (relative) of the target.
"""

from __future__ import annotations

from .accountant import make_accountant
from .validation import check_delta, check_epsilon, check_sample_rate, check_steps

__all__ = ["calibrate_noise_multiplier", "MAX_NOISE_MULTIPLIER"]

#: Give up above this σ: a budget that needs more noise is, in practice, a configuration bug.
MAX_NOISE_MULTIPLIER = 1e6
_MAX_ITERATIONS = 200


def _epsilon_for(sigma: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    return make_accountant(accountant, [(sigma, sample_rate, steps)]).epsilon(delta)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    tolerance: float = 0.01,
) -> float:
    """σ such that ``target·(1 − tolerance) ≤ ε(σ) ≤ target`` under ``accountant``.

    ``tolerance`` is relative (0.01 = within 1 % of the target). Raises ``ValueError`` for
    out-of-range inputs or if the target needs σ > ``MAX_NOISE_MULTIPLIER``.
    """
    target = check_epsilon(target_epsilon, "target_epsilon")
    delta = check_delta(delta)
    sample_rate = check_sample_rate(sample_rate)
    steps = check_steps(steps, allow_zero=False)
    if not 0.0 < tolerance < 1.0:
        raise ValueError(f"tolerance must be in (0, 1) (relative to target_epsilon); got {tolerance!r}")

    sigma_low, sigma_high = 0.0, 1.0
    eps_high = _epsilon_for(sigma_high, delta, sample_rate, steps, accountant)
    while eps_high > target:
        sigma_low, sigma_high = sigma_high, 2.0 * sigma_high
        if sigma_high > MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"target_epsilon={target_epsilon!r} at delta={delta!r} needs a noise_multiplier above "
                f"{MAX_NOISE_MULTIPLIER:g} for sample_rate={sample_rate!r}, steps={steps}; the budget is too small"
            )
        eps_high = _epsilon_for(sigma_high, delta, sample_rate, steps, accountant)

    for _ in range(_MAX_ITERATIONS):
        if target - eps_high <= tolerance * target:
            return sigma_high
        sigma = 0.5 * (sigma_low + sigma_high)
        eps = _epsilon_for(sigma, delta, sample_rate, steps, accountant)
        if eps <= target:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    raise ArithmeticError(  # pragma: no cover - needs a discontinuous accountant
        f"calibration did not reach {tolerance:.2%} of target_epsilon={target_epsilon!r}; "
        f"best noise_multiplier={sigma_high!r} gives epsilon={eps_high!r}"
    )
