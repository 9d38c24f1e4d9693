"""validate_dp_params: every out-of-range value is refused with a message naming it."""

from __future__ import annotations

import math

import pytest

from fl_common.privacy import validate_dp_params


def test_valid_parameters_pass() -> None:
    validate_dp_params(1.0, 1e-5, 60_000, sample_rate=0.01, noise_multiplier=1.1, max_grad_norm=1.0, steps=100)
    validate_dp_params(sample_rate=1.0, noise_multiplier=0.0)  # σ = 0 is legal (it means ε = ∞)
    validate_dp_params()


@pytest.mark.parametrize(
    "kwargs,name,allowed",
    [
        ({"epsilon": 0.0}, "epsilon", "> 0"),
        ({"epsilon": -1.0}, "epsilon", "> 0"),
        ({"epsilon": math.inf}, "epsilon", "finite"),
        ({"epsilon": math.nan}, "epsilon", "NaN"),
        ({"delta": 0.0}, "delta", "(0, 1)"),
        ({"delta": -1e-5}, "delta", "(0, 1)"),
        ({"delta": 1e-3, "num_records": 1000}, "delta", "1/num_records"),
        ({"delta": 2e-3, "num_records": 1000}, "delta", "1/num_records"),
        ({"num_records": 0}, "num_records", ">= 1"),
        ({"sample_rate": 0.0}, "sample_rate", "(0, 1]"),
        ({"sample_rate": 1.01}, "sample_rate", "(0, 1]"),
        ({"noise_multiplier": -0.1}, "noise_multiplier", ">= 0"),
        ({"max_grad_norm": 0.0}, "max_grad_norm", "> 0"),
        ({"max_grad_norm": -2.0}, "max_grad_norm", "> 0"),
        ({"steps": -1}, "steps", ">= 0"),
        ({"epsilon": "1.0"}, "epsilon", "real number"),
        ({"sample_rate": True}, "sample_rate", "real number"),
    ],
)
def test_invalid_parameters_raise_with_name_value_and_range(kwargs: dict, name: str, allowed: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_dp_params(**kwargs)
    message = str(info.value)
    assert message.startswith(name)
    assert allowed in message
    value = kwargs[name]
    assert repr(value) in message or "NaN" in message


def test_delta_just_below_one_over_n_is_accepted() -> None:
    validate_dp_params(1.0, 0.999e-3, 1000)
