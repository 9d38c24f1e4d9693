"""Parameter checks shared by every privacy entry point.

Why a module of its own: a privacy guarantee silently degrades when a parameter is out of
range (a negative σ, a δ larger than 1/n, a sample rate of 1.5 that the accountant happily
plugs into a formula). Every public function validates through these helpers so the error
is raised at the boundary, names the parameter, its value and the allowed range, and reads
the same wherever it comes from.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

__all__ = [
    "validate_dp_params",
    "check_epsilon",
    "check_delta",
    "check_num_records",
    "check_sample_rate",
    "check_noise_multiplier",
    "check_clip_norm",
    "check_steps",
]


def _as_real(name: str, value: object) -> float:
    """Rejects non-numbers (and bools, which are ints in Python) before any range check."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number; got {value!r} of type {type(value).__name__}")
    out = float(value)
    if math.isnan(out):
        raise ValueError(f"{name} must be a number; got NaN")
    return out


def check_epsilon(epsilon: float, name: str = "epsilon") -> float:
    """ε must be finite and > 0: ε = 0 is unreachable by any useful mechanism, ε = ∞ is no privacy."""
    value = _as_real(name, epsilon)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0; got {epsilon!r}")
    return value


def check_num_records(num_records: int, name: str = "num_records") -> int:
    """The dataset (or population) size n that bounds δ; must be a positive integer."""
    if isinstance(num_records, bool) or not isinstance(num_records, Integral) or num_records < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {num_records!r}")
    return int(num_records)


def check_delta(delta: float, num_records: int | None = None, name: str = "delta") -> float:
    """δ in (0, 1), and δ < 1/n when n is known.

    Why δ < 1/n: the mechanism "publish one random record in the clear" is (0, 1/n)-DP, so a
    δ of 1/n or more admits mechanisms that leak whole records.
    """
    value = _as_real(name, delta)
    if num_records is None:
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in the open interval (0, 1); got {delta!r}")
        return value
    n = check_num_records(num_records)
    if not 0.0 < value < 1.0 / n:
        raise ValueError(
            f"{name} must be in (0, 1/num_records) = (0, {1.0 / n:.6g}) for num_records={n}; "
            f"got {delta!r}. A delta >= 1/n allows mechanisms that publish a random record in the clear."
        )
    return value


def check_sample_rate(sample_rate: float, name: str = "sample_rate") -> float:
    """Poisson sampling probability q in (0, 1]; q = 0 trains on nothing, q > 1 is not a probability."""
    value = _as_real(name, sample_rate)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in the half-open interval (0, 1]; got {sample_rate!r}")
    return value


def check_noise_multiplier(noise_multiplier: float, name: str = "noise_multiplier") -> float:
    """σ ≥ 0 and finite. σ = 0 is accepted (it means ε = ∞), a negative σ is a bug."""
    value = _as_real(name, noise_multiplier)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0; got {noise_multiplier!r}")
    return value


def check_clip_norm(max_norm: float, name: str = "max_grad_norm") -> float:
    """Clipping norm C > 0 and finite: it is the sensitivity, so 0 or ∞ makes the noise meaningless."""
    value = _as_real(name, max_norm)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0; got {max_norm!r}")
    return value


def check_steps(steps: int, name: str = "steps", allow_zero: bool = True) -> int:
    """Number of compositions: a non-negative integer (a fractional step has no meaning)."""
    low = 0 if allow_zero else 1
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {steps!r}")
    return int(steps)


def validate_dp_params(
    epsilon: float | None = None,
    delta: float | None = None,
    num_records: int | None = None,
    *,
    sample_rate: float | None = None,
    noise_multiplier: float | None = None,
    max_grad_norm: float | None = None,
    steps: int | None = None,
) -> None:
    """Validates whichever DP parameters are given (``None`` = not checked).

    Raises ``ValueError`` whose message names the parameter, its value and the allowed range:
    ε ≤ 0, δ ≤ 0 or δ ≥ 1/num_records, sample_rate outside (0, 1], noise_multiplier < 0,
    max_grad_norm ≤ 0, steps < 0.
    """
    if epsilon is not None:
        check_epsilon(epsilon)
    if num_records is not None:
        check_num_records(num_records)
    if delta is not None:
        check_delta(delta, num_records)
    if sample_rate is not None:
        check_sample_rate(sample_rate)
    if noise_multiplier is not None:
        check_noise_multiplier(noise_multiplier)
    if max_grad_norm is not None:
        check_clip_norm(max_grad_norm)
    if steps is not None:
        check_steps(steps)
