"""Noise calibration: round trip through the accountant, bounds, errors."""

from __future__ import annotations

import pytest

from fl_common.privacy import calibrate_noise_multiplier, make_accountant


@pytest.mark.parametrize(
    "target,delta,q,steps",
    [(0.5, 1e-5, 0.01, 1000), (1.0, 1e-5, 0.01, 1000), (3.0, 1e-6, 0.004, 5000), (8.0, 1e-5, 0.05, 200), (2.0, 1e-3, 1.0, 20)],
)
def test_rdp_round_trip_within_one_percent_below(target: float, delta: float, q: float, steps: int) -> None:
    sigma = calibrate_noise_multiplier(target, delta, q, steps)
    eps = make_accountant("rdp", [(sigma, q, steps)]).epsilon(delta)
    assert target * 0.99 <= eps <= target


def test_pld_round_trip_within_one_percent_below() -> None:
    pytest.importorskip("opacus")
    target, delta, q, steps = 2.0, 1e-5, 0.01, 1000
    sigma = calibrate_noise_multiplier(target, delta, q, steps, accountant="pld")
    eps = make_accountant("pld", [(sigma, q, steps)]).epsilon(delta)
    assert target * 0.99 <= eps <= target
    # The tighter accountant needs less noise for the same budget.
    assert sigma < calibrate_noise_multiplier(target, delta, q, steps, accountant="rdp")


def test_tolerance_is_relative_and_tighter_tolerance_is_honoured() -> None:
    sigma = calibrate_noise_multiplier(1.0, 1e-5, 0.01, 1000, tolerance=0.001)
    eps = make_accountant("rdp", [(sigma, 0.01, 1000)]).epsilon(1e-5)
    assert 0.999 <= eps <= 1.0


def test_invalid_inputs_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise_multiplier(0.0, 1e-5, 0.01, 100)
    with pytest.raises(ValueError, match="delta"):
        calibrate_noise_multiplier(1.0, 1.0, 0.01, 100)
    with pytest.raises(ValueError, match="sample_rate"):
        calibrate_noise_multiplier(1.0, 1e-5, 0.0, 100)
    with pytest.raises(ValueError, match="steps"):
        calibrate_noise_multiplier(1.0, 1e-5, 0.01, 0)
    with pytest.raises(ValueError, match="tolerance"):
        calibrate_noise_multiplier(1.0, 1e-5, 0.01, 100, tolerance=0.0)
