"""Clipping, Gaussian and Laplace noise, adaptive clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fl_common.privacy import (
    AdaptiveClipState,
    adaptive_clip_noise_multiplier,
    add_gaussian_noise,
    clip_l2,
    gaussian_noise,
    laplace_histogram,
    laplace_noise,
)

N_DRAWS = 200_000
Z = 4.0  # two-sided p ≈ 6e-5 per check; the seeds are fixed anyway, so the tests are deterministic


def _norm64(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t, dtype=torch.float64))


@pytest.mark.parametrize("max_norm", [1e-3, 0.1, 1.0, 7.5, 1e4])
def test_clipped_norm_never_exceeds_bound(max_norm: float) -> None:
    gen = torch.Generator().manual_seed(1)
    for scale in [1e-30, 1e-6, 1e-2, 1.0, 3.0, 1e3, 1e12, 1e30]:
        for dim in [1, 7, 1000, 100_000]:
            v = torch.randn(dim, generator=gen) * scale
            clipped, norm = clip_l2(v, max_norm)
            assert norm == pytest.approx(_norm64(v), rel=1e-12)
            assert _norm64(clipped) <= max_norm
            assert clipped.dtype == v.dtype and clipped.shape == v.shape
            if norm <= max_norm:
                assert torch.equal(clipped, v) and clipped.data_ptr() != v.data_ptr()
            else:
                assert _norm64(clipped) == pytest.approx(max_norm, rel=1e-5)
                cos = float(torch.dot(clipped.double(), v.double())) / (_norm64(clipped) * norm)
                assert cos == pytest.approx(1.0, abs=1e-6)


def test_clipping_just_above_the_bound_is_still_within_it() -> None:
    # The rounding-sensitive case: norms a few ulps above C.
    gen = torch.Generator().manual_seed(2)
    for _ in range(300):
        v = torch.randn(513, generator=gen)
        v = (v / _norm64(v) * (1.0 + 3e-7)).float()
        clipped, _ = clip_l2(v, 1.0)
        assert _norm64(clipped) <= 1.0


def test_clip_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="max_norm"):
        clip_l2(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        clip_l2(torch.tensor([1.0, float("inf")]), 1.0)
    with pytest.raises(ValueError, match="floating-point"):
        clip_l2(torch.ones(3, dtype=torch.int64), 1.0)
    zero, norm = clip_l2(torch.zeros(4), 1.0)
    assert norm == 0.0 and torch.equal(zero, torch.zeros(4))


@pytest.mark.parametrize("std", [0.01, 1.0, 37.0])
def test_gaussian_noise_std_and_mean(std: float) -> None:
    x = gaussian_noise((N_DRAWS,), std, torch.Generator().manual_seed(3)).double().numpy()
    # SE of the sample std of a Gaussian: σ/√(2(n−1)); of the mean: σ/√n.
    se_std = std / math.sqrt(2 * (N_DRAWS - 1))
    assert Z * se_std <= 0.01 * std  # the statistical tolerance is within the 1 % asked for
    assert abs(x.std(ddof=1) - std) <= Z * se_std
    assert abs(x.mean()) <= Z * std / math.sqrt(N_DRAWS)


def test_add_gaussian_noise_keeps_shape_dtype_and_is_seeded() -> None:
    v = torch.zeros(10, dtype=torch.float32)
    a = add_gaussian_noise(v, 2.0, torch.Generator().manual_seed(4))
    b = add_gaussian_noise(v, 2.0, torch.Generator().manual_seed(4))
    assert a.dtype == torch.float32 and a.shape == v.shape and torch.equal(a, b)
    assert torch.equal(add_gaussian_noise(v, 0.0, torch.Generator().manual_seed(4)), v)
    # Without a generator, a fresh CSPRNG-seeded one is used: two calls differ.
    assert not torch.equal(add_gaussian_noise(v, 1.0), add_gaussian_noise(v, 1.0))
    with pytest.raises(ValueError, match="std"):
        gaussian_noise((3,), -1.0)


@pytest.mark.parametrize("scale", [0.05, 1.0, 20.0])
def test_laplace_scale(scale: float) -> None:
    x = laplace_noise((N_DRAWS,), scale, torch.Generator().manual_seed(5)).numpy()
    # |X| ~ Exp(b): E|X| = b with SE b/√n. std = b√2 with SE σ·√((κ−1)/(4n)), kurtosis κ = 6.
    se_mad = scale / math.sqrt(N_DRAWS)
    assert Z * se_mad <= 0.01 * scale
    assert abs(np.abs(x).mean() - scale) <= Z * se_mad
    std = scale * math.sqrt(2)
    se_std = std * math.sqrt(5 / (4 * N_DRAWS))
    assert Z * se_std <= 0.0101 * std
    assert abs(x.std(ddof=1) - std) <= Z * se_std
    assert abs(x.mean()) <= Z * std / math.sqrt(N_DRAWS)


def test_laplace_histogram_scale_is_sensitivity_over_epsilon() -> None:
    counts = torch.arange(N_DRAWS) % 50
    for eps, sens in [(0.5, 1.0), (2.0, 2.0)]:
        noisy = laplace_histogram(counts, eps, sens, torch.Generator().manual_seed(6))
        assert noisy.dtype == torch.float64 and noisy.shape == counts.shape
        b = sens / eps
        assert abs(float((noisy - counts).abs().mean()) - b) <= Z * b / math.sqrt(N_DRAWS)
    with pytest.raises(ValueError, match="epsilon"):
        laplace_histogram([1, 2], 0.0)
    with pytest.raises(ValueError, match="sensitivity"):
        laplace_histogram([1, 2], 1.0, sensitivity=0)


def test_adaptive_clip_noise_multiplier_composes_to_target() -> None:
    z, sigma_b = 1.0, 5.0
    z_delta = adaptive_clip_noise_multiplier(z, sigma_b)
    assert z_delta ** -2 + (2 * sigma_b) ** -2 == pytest.approx(z ** -2, rel=1e-12)
    assert z_delta > z
    with pytest.raises(ValueError, match="count_noise_std"):
        adaptive_clip_noise_multiplier(1.0, 0.5)


def test_adaptive_clip_update_direction_and_step() -> None:
    state = AdaptiveClipState(clip_norm=2.0, target_quantile=0.5, learning_rate=0.2)
    assert state.update(0.5) == 2.0
    assert state.update(1.0) == pytest.approx(2.0 * math.exp(-0.1))  # all unclipped → shrink
    c = state.clip_norm
    assert state.update(0.0) == pytest.approx(c * math.exp(0.1))  # all clipped → grow


@pytest.mark.parametrize("quantile", [0.3, 0.5, 0.9])
def test_adaptive_clip_tracks_target_quantile(quantile: float) -> None:
    gen = torch.Generator().manual_seed(7)
    state = AdaptiveClipState(clip_norm=0.01, target_quantile=quantile, learning_rate=0.2, count_noise_std=100 / 20)
    for _ in range(400):
        norms = torch.exp(torch.randn(100, generator=gen, dtype=torch.float64))  # lognormal update norms
        state.update(state.noisy_unclipped_fraction(norms, expected_count=100, generator=gen))
    true_quantile = math.exp(float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(quantile))))
    assert state.clip_norm == pytest.approx(true_quantile, rel=0.25)


def test_noisy_fraction_is_exact_without_noise() -> None:
    state = AdaptiveClipState(clip_norm=1.0)
    frac = state.noisy_unclipped_fraction([0.5, 1.0, 1.5, 3.0], expected_count=4)
    assert frac == pytest.approx(0.5)
    with pytest.raises(ValueError, match="clip_norm"):
        AdaptiveClipState(clip_norm=-1.0)


def test_clip_l2_keeps_an_exact_scaling_that_lands_on_the_bound() -> None:
    """When scaling lands exactly on C (3-4-5 halves: norm 2.5), the result is that scaling, not one nudged below it
    (the nudge is only for float rounding that lands above C)."""
    clipped, norm = clip_l2(torch.tensor([3.0, 4.0], dtype=torch.float64), 2.5)
    assert norm == 5.0
    assert clipped.tolist() == [1.5, 2.0]
