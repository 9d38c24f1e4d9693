"""RDP of the subsampled Gaussian: closed forms, numerical integration, reference values, Opacus."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from fl_common.privacy.rdp import (
    DEFAULT_ORDERS,
    _log_a_frac,
    _log_a_int,
    compose_rdp,
    compute_rdp,
    rdp_subsampled_gaussian,
    rdp_to_epsilon,
    rdp_to_epsilon_classic,
)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.7])
@pytest.mark.parametrize("alpha", [1.5, 2.0, 3.0, 7.25, 32.0, 256.0])
def test_unsubsampled_gaussian_is_alpha_over_two_sigma_squared(sigma: float, alpha: float) -> None:
    # Mironov 2017, Prop. 7: the Gaussian mechanism with sensitivity 1 is (α, α/(2σ²))-RDP.
    assert rdp_subsampled_gaussian(sigma, 1.0, alpha) == alpha / (2 * sigma**2)
    assert compute_rdp(sigma, 1.0, 10, [alpha])[0] == pytest.approx(10 * alpha / (2 * sigma**2), rel=1e-15)


@pytest.mark.parametrize("sigma", [0.7, 1.0, 4.0])
@pytest.mark.parametrize("alpha", [2, 3, 10.0])
def test_general_formula_tends_to_gaussian_as_q_tends_to_one(sigma: float, alpha: float) -> None:
    # The binomial expansion (not the q = 1 shortcut) must approach α/(2σ²).
    q = 1 - 1e-12
    assert _log_a_int(q, sigma, int(alpha)) / (alpha - 1) == pytest.approx(alpha / (2 * sigma**2), rel=1e-9)


@pytest.mark.parametrize("sigma,q", [(1.0, 0.01), (0.6, 0.2), (2.5, 0.5)])
def test_order_two_and_three_closed_forms(sigma: float, q: float) -> None:
    # α = 2: A_2 = 1 + q²(e^{1/σ²} − 1), the binomial expansion written out by hand.
    expected2 = math.log1p(q * q * math.expm1(1 / sigma**2))
    assert rdp_subsampled_gaussian(sigma, q, 2) == pytest.approx(expected2, rel=1e-12)
    # α = 3: A_3 = (1−q)³ + 3q(1−q)² + 3q²(1−q)e^{1/σ²} + q³e^{3/σ²}.
    a3 = (1 - q) ** 3 + 3 * q * (1 - q) ** 2 + 3 * q**2 * (1 - q) * math.exp(1 / sigma**2) + q**3 * math.exp(3 / sigma**2)
    assert rdp_subsampled_gaussian(sigma, q, 3) == pytest.approx(math.log(a3) / 2, rel=1e-12)


@pytest.mark.parametrize("sigma,q", [(1.0, 0.01), (0.8, 0.1), (3.0, 0.3)])
@pytest.mark.parametrize("alpha", [2, 3, 5, 12])
def test_fractional_series_agrees_with_integer_expansion_at_integers(sigma: float, q: float, alpha: int) -> None:
    # MTZ 2019: both formulas compute the same A_α; at integer α they must coincide.
    assert _log_a_frac(q, sigma, float(alpha)) == pytest.approx(_log_a_int(q, sigma, alpha), rel=1e-9, abs=1e-14)


def _rdp_by_integration(sigma: float, q: float, alpha: float) -> float:
    """A_α = E_{z~N(0,σ²)}[((1−q) + q·exp((2z−1)/(2σ²)))^α], integrated numerically.

    The integrand is evaluated in log space (no overflow) and integrated over a window that
    holds all but a negligible tail of its mass (it is a Gaussian bump centred below α).
    """

    def integrand(z: float) -> float:
        log_mix = np.logaddexp(math.log1p(-q), math.log(q) + (2 * z - 1) / (2 * sigma**2))
        return math.exp(stats.norm.logpdf(z, scale=sigma) + alpha * log_mix)

    lo, hi = -40 * sigma, alpha + 40 * sigma
    value, _ = integrate.quad(integrand, lo, hi, epsabs=0, epsrel=1e-12, limit=1000, points=[0.0, 0.5, alpha / 2, alpha])
    return math.log(value) / (alpha - 1)


@pytest.mark.parametrize("sigma,q,alpha", [(1.0, 0.01, 1.5), (1.0, 0.01, 7.8), (0.8, 0.1, 4.3), (2.0, 0.05, 10.5), (1.2, 0.5, 2.5)])
def test_fractional_orders_match_numerical_integration(sigma: float, q: float, alpha: float) -> None:
    assert rdp_subsampled_gaussian(sigma, q, alpha) == pytest.approx(_rdp_by_integration(sigma, q, alpha), rel=1e-7)


def test_degenerate_cases() -> None:
    assert rdp_subsampled_gaussian(0.0, 0.5, 2.0) == math.inf
    assert rdp_subsampled_gaussian(1.0, 0.0, 2.0) == 0.0
    assert np.all(compute_rdp(1.0, 0.01, 0) == 0.0)
    with pytest.raises(ValueError, match="order"):
        rdp_subsampled_gaussian(1.0, 0.1, 1.0)


def test_rdp_is_monotone_in_order_and_noise() -> None:
    rdp = compute_rdp(1.0, 0.01, 1, DEFAULT_ORDERS)
    assert np.all(np.diff(rdp) > 0)
    assert np.all(compute_rdp(2.0, 0.01, 1) < rdp)


def test_heterogeneous_composition_is_the_sum() -> None:
    history = [(1.0, 0.01, 300), (1.5, 0.02, 200), (1.0, 0.01, 500)]
    total = compose_rdp(history)
    expected = compute_rdp(1.0, 0.01, 800) + compute_rdp(1.5, 0.02, 200)
    np.testing.assert_allclose(total, expected, rtol=1e-12)


def test_reference_epsilon_sigma1_q001_1000steps() -> None:
    # The published 2.10 (Opacus' README/tutorials, TF-Privacy) is the improved conversion of
    # Balle et al. 2020 Thm 21 with Opacus' orders; our default orders give the same value
    # (optimal α = 7.8 is inside both grids).
    rdp = compute_rdp(1.0, 0.01, 1000)
    eps, order = rdp_to_epsilon(DEFAULT_ORDERS, rdp, 1e-5)
    assert eps == pytest.approx(2.10, abs=0.05)
    assert eps == pytest.approx(2.1013652716, rel=1e-8)
    assert order == 7.8
    # The classic conversion (Mironov 2017 Prop. 3, ε = min_α rdp + log(1/δ)/(α−1)) on the same
    # RDP curve gives 2.54: it drops the log((α−1)/α) − log(α)/(α−1) terms, which at α ≈ 8 are
    # worth ≈ 0.43 in ε. Older papers (Abadi et al. 2016 era) quote this looser number.
    eps_classic, _ = rdp_to_epsilon_classic(DEFAULT_ORDERS, rdp, 1e-5)
    assert eps_classic == pytest.approx(2.538, abs=0.005)
    assert eps_classic > eps


def test_improved_conversion_never_worse_than_classic() -> None:
    for sigma, q, steps, delta in [(0.8, 0.05, 100, 1e-6), (2.0, 0.001, 10_000, 1e-5), (1.0, 1.0, 5, 1e-3)]:
        rdp = compute_rdp(sigma, q, steps)
        assert rdp_to_epsilon(DEFAULT_ORDERS, rdp, delta)[0] <= rdp_to_epsilon_classic(DEFAULT_ORDERS, rdp, delta)[0]


def test_conversion_is_zero_for_no_spend_and_inf_for_no_noise() -> None:
    assert rdp_to_epsilon([2.0, 4.0], [0.0, 0.0], 1e-5)[0] == 0.0
    assert rdp_to_epsilon([2.0, 4.0], [math.inf, math.inf], 1e-5)[0] == math.inf


OPACUS_CASES = [(1.0, 0.01, 1000), (0.7, 0.05, 300), (2.0, 0.001, 20_000), (1.3, 0.25, 50), (4.0, 1.0, 10)]


@pytest.mark.parametrize("sigma,q,steps", OPACUS_CASES)
def test_matches_opacus_rdp_accountant(sigma: float, q: float, steps: int) -> None:
    opacus_rdp = pytest.importorskip("opacus.accountants.analysis.rdp")
    from opacus.accountants import RDPAccountant as OpacusRDP

    orders = OpacusRDP.DEFAULT_ALPHAS
    ours = compute_rdp(sigma, q, steps, orders)
    theirs = np.asarray(opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    eps_ours, _ = rdp_to_epsilon(orders, ours, 1e-5)
    acc = OpacusRDP()
    acc.history = [(sigma, q, steps)]
    eps_theirs = acc.get_epsilon(delta=1e-5)
    assert eps_ours == pytest.approx(eps_theirs, rel=1e-6)
