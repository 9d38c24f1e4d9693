"""Sample-level DP-SGD: per-sample clipping vs a manual loop, noise scale, BatchNorm, Poisson batches."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fl_common.privacy import (
    DPIncompatibleModelError,
    check_dp_compatible,
    convert_batchnorm_to_groupnorm,
    dp_sgd_gradients,
    per_sample_gradients,
    poisson_batches,
)


def _tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def _data(batch: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 5, generator=gen) * torch.linspace(0.1, 5.0, batch).unsqueeze(1)  # spread of norms
    y = torch.randint(0, 3, (batch,), generator=gen)
    return x, y


def _manual_clipped_mean(model: nn.Module, loss_fn, x, y, max_norm: float, denom: float) -> list[torch.Tensor]:
    """Reference: one autograd backward per example, clip the flattened gradient, sum, divide."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, max_norm / float(norm))
        for t, g in zip(total, grads, strict=False):
            t += g * factor
    return [t / denom for t in total]


def test_per_sample_gradients_match_autograd_loop() -> None:
    model, (x, y) = _tiny_model(), _data()
    loss_fn = nn.CrossEntropyLoss()
    grads = per_sample_gradients(model, loss_fn, x, y)
    params = dict(model.named_parameters())
    for i in range(x.shape[0]):
        ref = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), list(params.values()))
        for (name, _), r in zip(params.items(), ref, strict=False):
            torch.testing.assert_close(grads[name][i], r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_norm", [0.05, 2.0, 100.0])
def test_clipped_sum_equals_manual_loop(max_norm: float) -> None:
    model, (x, y) = _tiny_model(), _data()
    loss_fn = nn.CrossEntropyLoss()
    expected_batch = 10.0  # Poisson: the expected size, not the realised 12
    stats = dp_sgd_gradients(model, loss_fn, x, y, max_norm, 0.0, torch.Generator().manual_seed(0), expected_batch)
    reference = _manual_clipped_mean(model, loss_fn, x, y, max_norm, expected_batch)
    for p, r in zip(model.parameters(), reference, strict=False):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-5)
    assert stats.batch_size == 12
    if max_norm == 2.0:
        assert 0.0 < stats.fraction_clipped < 1.0  # the case mixes clipped and unclipped examples


def test_noise_std_is_sigma_c_over_expected_batch() -> None:
    torch.manual_seed(0)
    model = nn.Linear(200, 1000)  # 201k parameters: enough draws for a 1 % check
    loss_fn = nn.MSELoss()
    x, y = torch.randn(4, 200), torch.randn(4, 1000)
    sigma, c, b = 1.3, 0.7, 16.0
    dp_sgd_gradients(model, loss_fn, x, y, c, 0.0, None, b)
    clean = [p.grad.clone() for p in model.parameters()]
    dp_sgd_gradients(model, loss_fn, x, y, c, sigma, torch.Generator().manual_seed(9), b)
    noise = torch.cat([(p.grad - g).flatten() for p, g in zip(model.parameters(), clean, strict=False)]).double()
    n, std = noise.numel(), sigma * c / b
    se = std / math.sqrt(2 * (n - 1))
    assert abs(float(noise.std()) - std) <= 4 * se <= 0.01 * std
    assert abs(float(noise.mean())) <= 4 * std / math.sqrt(n)


def test_empty_poisson_batch_gives_pure_noise() -> None:
    model = _tiny_model()
    x, y = torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)
    stats = dp_sgd_gradients(model, nn.CrossEntropyLoss(), x, y, 1.0, 1.0, torch.Generator().manual_seed(0), 4.0)
    assert stats.batch_size == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_argument_validation() -> None:
    model, (x, y) = _tiny_model(), _data()
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="max_grad_norm"):
        dp_sgd_gradients(model, loss_fn, x, y, 0.0, 1.0, None, 8.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        dp_sgd_gradients(model, loss_fn, x, y, 1.0, -0.5, None, 8.0)
    with pytest.raises(ValueError, match="expected_batch_size"):
        dp_sgd_gradients(model, loss_fn, x, y, 1.0, 1.0, None, 0)


class _NetWithBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(8, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_batchnorm_is_refused_with_a_clear_message_and_conversion_fixes_it() -> None:
    model = _NetWithBN()
    with pytest.raises(DPIncompatibleModelError) as info:
        check_dp_compatible(model)
    message = str(info.value)
    assert "features.1 (BatchNorm2d)" in message and "head.1 (BatchNorm1d)" in message
    assert "convert_batchnorm_to_groupnorm" in message and "GroupNorm" in message
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 2, (6,))
    with pytest.raises(DPIncompatibleModelError):
        dp_sgd_gradients(model, nn.CrossEntropyLoss(), x, y, 1.0, 1.0, None, 6.0)

    fixed = convert_batchnorm_to_groupnorm(model)
    assert fixed is model
    assert isinstance(model.features[1], nn.GroupNorm) and model.features[1].num_groups == 8
    assert isinstance(model.head[1], nn.GroupNorm) and model.head[1].num_channels == 12
    assert model.head[1].num_groups == 4  # gcd(12, 32): groups must divide the channels
    check_dp_compatible(model)
    stats = dp_sgd_gradients(model, nn.CrossEntropyLoss(), x, y, 1.0, 1.0, torch.Generator().manual_seed(0), 6.0)
    assert stats.batch_size == 6 and all(p.grad is not None for p in model.parameters())
    assert isinstance(convert_batchnorm_to_groupnorm(nn.BatchNorm2d(64)), nn.GroupNorm)


def test_poisson_batches_are_independent_bernoulli_draws() -> None:
    n, q = 2000, 0.05
    batches = list(poisson_batches(n, q, torch.Generator().manual_seed(3)))
    assert len(batches) == 20  # round(1/q): one expected epoch
    again = list(poisson_batches(n, q, torch.Generator().manual_seed(3)))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=False))
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert sizes.var() > 0  # not fixed-size batches
    # Mean batch size: Binomial(n, q) over 20 batches.
    assert abs(float(sizes.mean()) - n * q) <= 4 * math.sqrt(n * q * (1 - q) / 20)
    for b in batches:
        assert b.dtype == torch.int64 and bool((b[1:] > b[:-1]).all()) and int(b.max()) < n
    tiny = list(poisson_batches(5, 0.01, torch.Generator().manual_seed(0), num_batches=50))
    assert len(tiny) == 50 and any(len(b) == 0 for b in tiny)  # empty batches are yielded, not skipped
    with pytest.raises(ValueError, match="sample_rate"):
        next(poisson_batches(10, 0.0))
