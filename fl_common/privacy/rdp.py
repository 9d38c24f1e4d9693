"""Rényi-DP of the Poisson-subsampled Gaussian mechanism, and the RDP → (ε, δ) conversion.

Why our own implementation: this is the number every privacy claim rests on, so it is kept
small, dependency-free (numpy/scipy only) and tested against closed forms, numerical
integration and Opacus.

Mechanism: each record is included independently with probability q (Poisson sampling), the
per-record contributions are clipped to L2 norm C, summed, and N(0, (σC)²) noise is added.
Its RDP at order α is ``log(A_α) / (α − 1)`` with (Mironov, Talwar & Zhang 2019,
"Rényi Differential Privacy of the Sampled Gaussian Mechanism", arXiv:1908.10530, §3.3)::

    A_α = E_{z ~ N(0, σ²)} [ ((1 − q) + q · exp((2z − 1) / (2σ²)))^α ]

* integer α: binomial expansion, exact and finite::

      A_α = Σ_{k=0}^{α} C(α, k) (1 − q)^{α−k} q^k exp((k² − k) / (2σ²))

* fractional α: the two-sided series split at z₀ = σ² log(1/q − 1) + 1/2 (MTZ 2019, §3.3),
  summed until the terms fall below e^-30 (A_α ≥ 1, so the truncation is relative error
  below 1e-13).

RDP composes additively over steps and over heterogeneous phases.

Conversion to (ε, δ): Balle, Barthe, Gaboardi, Hsu & Sato 2020, "Hypothesis Testing
Interpretations and Rényi Differential Privacy", AISTATS, Theorem 21 (arXiv:1905.09982) —
the conversion Opacus and TF-Privacy use::

    ε = min_α [ rdp(α) + log((α − 1)/α) − (log δ + log α) / (α − 1) ]

It is never looser than the classic conversion of Mironov 2017, Prop. 3,
``ε = min_α rdp(α) + log(1/δ)/(α − 1)``, which is kept as :func:`rdp_to_epsilon_classic` for
comparison with older papers.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Iterable, Sequence
from types import ModuleType

import numpy as np

__all__ = [
    "DEFAULT_ORDERS",
    "rdp_subsampled_gaussian",
    "compute_rdp",
    "compose_rdp",
    "rdp_to_epsilon",
    "rdp_to_epsilon_classic",
]

#: Opacus' default orders (1.1 … 10.9 step 0.1, then integers), extended to 64 and a few
#: larger orders: large α matter for small ε / large σ, and a richer grid only lowers ε.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1.0 + x / 10.0 for x in range(1, 100)]
    + [float(a) for a in range(11, 65)]
    + [80.0, 96.0, 128.0, 256.0, 512.0]
)

_TRUNCATION_LOG = -30.0  # stop the fractional series once every new term is < e^-30
_MAX_SERIES_TERMS = 100_000


def _log_add(a: float, b: float) -> float:
    """log(e^a + e^b) without overflow."""
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    hi, lo = (a, b) if a > b else (b, a)
    return hi + math.log1p(math.exp(lo - hi))


def _log_sub(a: float, b: float) -> float:
    """log(e^a − e^b) for a ≥ b (b = −∞ means subtracting 0)."""
    if b == -math.inf:
        return a
    if a < b:
        raise ArithmeticError("log-space subtraction went negative: the series lost precision")
    if a == b:
        return -math.inf
    return a + math.log(-math.expm1(b - a))


@functools.cache
def _special() -> ModuleType:
    """``scipy.special``, imported on first use: it is ~0.3 s of every process's start-up (the daemons, the
    simulation's CLI import this module through fl_common.training) and only an accountant calls it."""
    return importlib.import_module("scipy.special")


def _log_erfc(x: float) -> float:
    """log(erfc(x)), accurate in the far tail where erfc underflows (erfc(x) = 2Φ(−x√2))."""
    return math.log(2.0) + float(_special().log_ndtr(-x * math.sqrt(2.0)))


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log A_α for integer α ≥ 1 via the exact binomial expansion (all terms positive).

    Only called with 0 < q < 1 (q = 0 and q = 1 are closed forms), so every log is finite.
    """
    sp = _special()
    k = np.arange(alpha + 1, dtype=np.float64)
    log_binom = sp.gammaln(alpha + 1.0) - sp.gammaln(k + 1.0) - sp.gammaln(alpha - k + 1.0)
    terms = log_binom + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2.0 * sigma * sigma)
    return float(sp.logsumexp(terms))


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """log A_α for fractional α via the MTZ 2019 two-part series.

    The generalised binomial coefficients C(α, i) change sign once i > α, so positive and
    negative terms are accumulated separately in log space and subtracted at the end.
    """
    z0 = sigma * sigma * math.log(1.0 / q - 1.0) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    inv2s2 = 1.0 / (2.0 * sigma * sigma)
    sqrt2s = math.sqrt(2.0) * sigma
    pos, neg = -math.inf, -math.inf
    log_coef, sign = 0.0, 1.0  # C(α, 0) = 1
    for i in range(_MAX_SERIES_TERMS):
        j = alpha - i
        log_t0 = log_coef + i * log_q + j * log_1mq
        log_t1 = log_coef + j * log_q + i * log_1mq
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / sqrt2s)
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / sqrt2s)
        log_s0 = log_t0 + (i * i - i) * inv2s2 + log_e0
        log_s1 = log_t1 + (j * j - j) * inv2s2 + log_e1
        term = _log_add(log_s0, log_s1)
        if sign > 0:
            pos = _log_add(pos, term)
        else:
            neg = _log_add(neg, term)
        if max(log_s0, log_s1) < _TRUNCATION_LOG:
            break
        # C(α, i+1) = C(α, i) · (α − i) / (i + 1)
        ratio = (alpha - i) / (i + 1)
        if ratio == 0.0:
            break
        if ratio < 0:
            sign = -sign
        log_coef += math.log(abs(ratio))
    else:  # pragma: no cover - only reachable for absurd (q, σ, α)
        raise ArithmeticError(f"RDP series did not converge for q={q}, sigma={sigma}, alpha={alpha}")
    return _log_sub(pos, neg)


@functools.lru_cache(maxsize=4096)
def _rdp_single(q: float, sigma: float, alpha: float) -> float:
    if q == 0.0:
        return 0.0
    if sigma == 0.0 or math.isinf(alpha):
        return math.inf
    if q == 1.0:
        return alpha / (2.0 * sigma * sigma)
    log_a = _log_a_int(q, sigma, int(alpha)) if float(alpha).is_integer() else _log_a_frac(q, sigma, alpha)
    return max(log_a, 0.0) / (alpha - 1.0)  # A_α ≥ 1 in exact arithmetic; clamp rounding noise


def rdp_subsampled_gaussian(noise_multiplier: float, sample_rate: float, order: float) -> float:
    """RDP at one order α > 1 of ONE step of the Poisson-subsampled Gaussian mechanism.

    ``noise_multiplier`` is σ = noise std / L2 sensitivity. q = 1 gives the plain Gaussian
    mechanism, α / (2σ²) exactly. σ = 0 gives ∞ (no privacy).
    """
    q, sigma, alpha = float(sample_rate), float(noise_multiplier), float(order)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sample_rate must be in [0, 1]; got {sample_rate!r}")
    if not sigma >= 0.0:
        raise ValueError(f"noise_multiplier must be >= 0; got {noise_multiplier!r}")
    if not alpha > 1.0:
        raise ValueError(f"RDP order must be > 1; got {order!r}")
    return _rdp_single(q, sigma, alpha)


def compute_rdp(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> np.ndarray:
    """RDP vector (one value per order) of ``steps`` identical subsampled-Gaussian steps."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps!r}")
    if steps == 0:
        return np.zeros(len(orders))
    one = np.array([rdp_subsampled_gaussian(noise_multiplier, sample_rate, a) for a in orders])
    return one * steps


def compose_rdp(
    history: Iterable[tuple[float, float, int]],
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> np.ndarray:
    """RDP of a heterogeneous run ``[(noise_multiplier, sample_rate, steps), ...]``: the sum."""
    total = np.zeros(len(orders))
    for noise_multiplier, sample_rate, steps in history:
        total = total + compute_rdp(noise_multiplier, sample_rate, steps, orders)
    return total


def _check_conversion_inputs(orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[np.ndarray, np.ndarray]:
    orders_v = np.asarray(orders, dtype=np.float64)
    rdp_v = np.asarray(rdp, dtype=np.float64)
    if orders_v.shape != rdp_v.shape or orders_v.ndim != 1 or orders_v.size == 0:
        raise ValueError(f"orders and rdp must be 1-D and of equal length; got {orders_v.shape} and {rdp_v.shape}")
    if np.any(orders_v <= 1.0):
        raise ValueError("every RDP order must be > 1")
    if np.any(rdp_v < 0) or np.any(np.isnan(rdp_v)):
        raise ValueError("RDP values must be >= 0 (and not NaN)")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1); got {delta!r}")
    return orders_v, rdp_v


def rdp_to_epsilon(orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[float, float]:
    """(ε, best α) by Balle et al. 2020, Thm 21 — the conversion Opacus uses.

    Two exact refinements (both also in TF-Privacy): ε is clamped at 0 (a negative ε says no
    more than ε = 0), and an order whose RDP r satisfies 1 − e^(−r) ≤ δ² yields ε = 0 there,
    because then TV ≤ √(1 − e^(−KL)) ≤ √(1 − e^(−r)) ≤ δ (Bretagnolle–Huber, KL ≤ D_α for
    α ≥ 1), i.e. the mechanism is (0, δ)-DP. Neither changes ε in any realistic regime; they
    make "no privacy spent" read as ε = 0 instead of log(1/δ)/(α − 1).
    """
    orders_v, rdp_v = _check_conversion_inputs(orders, rdp, delta)
    with np.errstate(invalid="ignore", over="ignore"):
        eps = rdp_v + np.log1p(-1.0 / orders_v) - (math.log(delta) + np.log(orders_v)) / (orders_v - 1.0)
        eps = np.where(delta * delta + np.expm1(-rdp_v) >= 0.0, 0.0, eps)
    if np.all(np.isinf(eps)):
        return math.inf, float("nan")
    idx = int(np.argmin(eps))
    return max(0.0, float(eps[idx])), float(orders_v[idx])


def rdp_to_epsilon_classic(orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[float, float]:
    """(ε, best α) by the classic conversion, Mironov 2017 Prop. 3: rdp(α) + log(1/δ)/(α − 1)."""
    orders_v, rdp_v = _check_conversion_inputs(orders, rdp, delta)
    eps = rdp_v + math.log(1.0 / delta) / (orders_v - 1.0)
    if np.all(np.isinf(eps)):
        return math.inf, float("nan")
    idx = int(np.argmin(eps))
    return float(eps[idx]), float(orders_v[idx])
