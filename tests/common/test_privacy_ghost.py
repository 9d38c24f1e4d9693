"""Hook-based per-sample clipping (ghost clipping / book-keeping) against the torch.func reference.

Same mechanism, other arithmetic: norms and clipped sums must agree with torch.func to float32
rounding on the project's models and on a zoo of conv/norm layer settings, the noise must be the
same draws in the same order, unsupported models must fall back, and dropout must use one mask.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fl_common.models.registry import create_model
from fl_common.privacy import dp_sgd_gradients
from fl_common.privacy.dpsgd import _per_sample_norms, per_sample_gradients
from fl_common.privacy.ghost import GhostUnsupportedError, _im2col, ghost_clipping, unsupported_reason
from fl_common.privacy.losses import per_example_cross_entropy


# --------------------------------------------------------------------------- models
def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


class _Zoo(nn.Module):
    """Strides, dilation, groups, 'same'/'valid'/reflect padding, no bias, GroupNorm, LayerNorm, a reused Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, stride=2, padding=1, padding_mode="reflect")
        self.gn = nn.GroupNorm(4, 8)
        self.conv_b = nn.Conv2d(8, 8, 3, padding="same", dilation=2, groups=2, bias=False)
        self.conv_c = nn.Conv2d(8, 6, (3, 2), padding="valid", stride=(1, 2))
        self.ln = nn.LayerNorm(6 * 3 * 2)
        self.shared = nn.Linear(36, 36)
        self.head = nn.Linear(36, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.gn(self.conv_a(x)))  # 3x10x10 -> 8x5x5
        h = F.relu(self.conv_b(h), inplace=True)
        h = self.ln(self.conv_c(h).flatten(1))  # 6x3x2
        h = self.shared(torch.tanh(self.shared(h)))  # the same Linear twice: U = 2 positions
        return self.head(h)


def _model(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    if kind in ("cnn", "mlp"):
        model = create_model(kind, (1, 28, 28), 10, hidden_size=64, seed=0)
        x = torch.randn(12, 1, 28, 28, generator=gen)
        y = torch.randint(0, 10, (12,), generator=gen)
    elif kind == "tiny":
        model = _tiny()
        x = torch.randn(12, 5, generator=gen) * torch.linspace(0.1, 5.0, 12).unsqueeze(1)
        y = torch.randint(0, 3, (12,), generator=gen)
    else:
        torch.manual_seed(0)
        model = _Zoo()
        x = torch.randn(12, 3, 10, 10, generator=gen) * torch.linspace(0.2, 3.0, 12).view(12, 1, 1, 1)
        y = torch.randint(0, 4, (12,), generator=gen)
    return model, x, y


def _reference_norms(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    grads = per_sample_gradients(model, loss_fn, x, y)
    return _per_sample_norms(list(grads.values()), x.shape[0], x.device)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", ["cnn", "mlp", "tiny", "zoo"])
@pytest.mark.parametrize("strategy", ["auto", "gram", "materialize"])
def test_norms_and_clipped_sums_match_torch_func(kind: str, strategy: str) -> None:
    model, x, y = _model(kind)
    ref_grads = per_sample_gradients(model, per_example_cross_entropy, x, y)
    ref_norms = _per_sample_norms(list(ref_grads.values()), x.shape[0], x.device)
    result = ghost_clipping(model, per_example_cross_entropy, x, y, strategy)  # type: ignore[arg-type]
    torch.testing.assert_close(result.norms, ref_norms, rtol=1e-5, atol=0.0)
    factor = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sums = result.clipped_sums(factor)
    assert list(sums) == list(ref_grads)  # every trainable parameter, in named_parameters order
    for name, g in ref_grads.items():
        ref = torch.einsum("b,b...->...", factor.float(), g)
        torch.testing.assert_close(sums[name], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()), msg=name)
    assert all(not m._forward_hooks for m in model.modules()), "hooks must be removed"


@pytest.mark.parametrize("kind", ["cnn", "mlp", "tiny", "zoo"])
def test_dp_gradient_matches_reference_with_mixed_clipping(kind: str) -> None:
    model, x, y = _model(kind)
    norms = _reference_norms(model, per_example_cross_entropy, x, y)
    ordered = norms.sort().values
    clip = float(ordered[5] + ordered[6]) / 2  # half the examples clipped, none on the boundary
    expected_batch = 10.0
    ref = dp_sgd_gradients(model, per_example_cross_entropy, x, y, clip, 0.0, None, expected_batch, method="func")
    ref_grads = _grads(model)
    fast = dp_sgd_gradients(model, per_example_cross_entropy, x, y, clip, 0.0, None, expected_batch)
    assert fast.method == "ghost" and ref.method == "func"
    assert 0.0 < fast.fraction_clipped < 1.0 and fast.fraction_clipped == ref.fraction_clipped
    assert fast.batch_size == ref.batch_size == 12
    torch.testing.assert_close(fast.per_sample_norms, ref.per_sample_norms, rtol=1e-5, atol=0.0)
    for g, r in zip(_grads(model), ref_grads, strict=False):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * float(r.abs().max()))


def test_resnet18_groupnorm_matches_reference() -> None:
    model = create_model("resnet", (3, 16, 16), 10, seed=0)
    assert unsupported_reason(model) is None
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 3, 16, 16, generator=gen), torch.randint(0, 10, (3,), generator=gen)
    ref_grads = per_sample_gradients(model, per_example_cross_entropy, x, y)
    ref_norms = _per_sample_norms(list(ref_grads.values()), 3, x.device)
    result = ghost_clipping(model, per_example_cross_entropy, x, y)
    torch.testing.assert_close(result.norms, ref_norms, rtol=1e-5, atol=0.0)
    factor = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    sums = result.clipped_sums(factor)
    for name, g in ref_grads.items():
        ref = torch.einsum("b,b...->...", factor.float(), g)
        torch.testing.assert_close(sums[name], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()), msg=name)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_even_kernel_same_and_circular_padding_match_reference() -> None:
    """'same' with an even kernel pads asymmetrically; circular padding goes through F.pad: both as Conv2d does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 4, padding="same"), nn.Tanh(),
                          nn.Conv2d(4, 3, 3, padding=1, padding_mode="circular"), nn.Flatten(), nn.Linear(3 * 7 * 6, 3))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 2, 7, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen)
    ref_grads = per_sample_gradients(model, per_example_cross_entropy, x, y)
    for strategy in ("gram", "materialize"):
        result = ghost_clipping(model, per_example_cross_entropy, x, y, strategy)  # type: ignore[arg-type]
        torch.testing.assert_close(result.norms, _per_sample_norms(list(ref_grads.values()), 5, x.device),
                                   rtol=1e-5, atol=0.0)
        factor = torch.linspace(0.1, 1.0, 5, dtype=torch.float64)
        sums = result.clipped_sums(factor)
        for name, g in ref_grads.items():
            ref = torch.einsum("b,b...->...", factor.float(), g)
            torch.testing.assert_close(sums[name], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()), msg=name)


def test_im2col_equals_unfold() -> None:
    x = torch.randn(2, 4, 9, 11)
    for conv in (nn.Conv2d(4, 6, 3), nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
                 nn.Conv2d(4, 6, 5, padding=2), nn.Conv2d(4, 4, 3, groups=2, stride=2)):
        expected = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        assert torch.equal(_im2col(x, conv), expected)


@pytest.mark.parametrize("loss_fn", [
    nn.CrossEntropyLoss(),
    nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.1),
    F.cross_entropy,
    lambda o, t: F.cross_entropy(o, t) * 2.0 + o.square().mean(),  # vmapped
    lambda o, t: F.cross_entropy(o, t) * float(t.sum().item() + 1),  # .item(): vmap fails, looped
], ids=["ce", "ce-sum-smooth", "F.ce", "custom-vmap", "custom-loop"])
def test_any_per_example_loss(loss_fn) -> None:
    """Whatever the loss, loss_i = loss_fn(out[i:i+1], y[i:i+1]); reference: one autograd.grad per example
    (torch.func cannot trace ``.item()``, the hook path's per-example loop can)."""
    model, x, y = _model("tiny")
    params = list(model.parameters())
    per_example = [torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), params) for i in range(x.shape[0])]
    ref_norms = torch.stack([torch.sqrt(sum(g.double().square().sum() for g in gs)) for gs in per_example])
    torch.testing.assert_close(ghost_clipping(model, loss_fn, x, y).norms, ref_norms, rtol=1e-5, atol=0.0)


def test_mse_loss_and_frozen_parameters() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3, bias=False), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)  # only the bias of the first layer trains
    model[3].bias.requires_grad_(False)
    x, y = torch.randn(5, 6), torch.randn(5, 2)
    ref_grads = per_sample_gradients(model, nn.MSELoss(), x, y)
    result = ghost_clipping(model, nn.MSELoss(), x, y)
    assert list(result.clipped_sums(torch.ones(5, dtype=torch.float64))) == list(ref_grads)
    ref_norms = _per_sample_norms(list(ref_grads.values()), 5, x.device)
    torch.testing.assert_close(result.norms, ref_norms, rtol=1e-5, atol=0.0)


# --------------------------------------------------------------------------- edge batches and noise
def test_empty_batch_is_pure_noise_bit_identical_to_reference() -> None:
    model, x, y = _model("cnn")
    x, y = x[:0], y[:0]
    ref = dp_sgd_gradients(model, per_example_cross_entropy, x, y, 1.0, 1.1, torch.Generator().manual_seed(5), 4.0,
                           method="func")
    ref_grads = _grads(model)
    fast = dp_sgd_gradients(model, per_example_cross_entropy, x, y, 1.0, 1.1, torch.Generator().manual_seed(5), 4.0)
    assert fast.batch_size == ref.batch_size == 0 and fast.fraction_clipped == 0.0
    assert fast.per_sample_norms.shape == (0,)
    assert all(torch.equal(g, r) for g, r in zip(_grads(model), ref_grads, strict=False))
    assert all(float(g.abs().sum()) > 0 for g in ref_grads)


@pytest.mark.parametrize("kind", ["cnn", "zoo"])
def test_batch_of_one(kind: str) -> None:
    model, x, y = _model(kind)
    x, y = x[:1], y[:1]
    for clip in (1e-3, 1e3):
        ref = dp_sgd_gradients(model, per_example_cross_entropy, x, y, clip, 0.0, None, 2.0, method="func")
        ref_grads = _grads(model)
        fast = dp_sgd_gradients(model, per_example_cross_entropy, x, y, clip, 0.0, None, 2.0)
        assert fast.method == "ghost" and fast.fraction_clipped == ref.fraction_clipped
        torch.testing.assert_close(fast.per_sample_norms, ref.per_sample_norms, rtol=1e-5, atol=0.0)
        for g, r in zip(_grads(model), ref_grads, strict=False):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * float(r.abs().max()))
    # Clipped to C: the one example's whole gradient has norm <= C (times 1/expected batch).
    dp_sgd_gradients(model, per_example_cross_entropy, x, y, 1e-3, 0.0, None, 1.0)
    total = math.sqrt(sum(float(g.double().square().sum()) for g in _grads(model)))
    assert total <= 1e-3 and total == pytest.approx(1e-3, rel=1e-5)


def test_seeded_noise_is_the_same_draws_as_the_reference() -> None:
    model, x, y = _model("cnn")
    sigma, clip, b = 1.3, 0.5, 12.0
    runs = {}
    for method in ("func", "ghost"):
        dp_sgd_gradients(model, per_example_cross_entropy, x, y, clip, 0.0, None, b, method=method)
        clean = _grads(model)
        dp_sgd_gradients(model, per_example_cross_entropy, x, y, clip, sigma, torch.Generator().manual_seed(11), b,
                         method=method)
        runs[method] = [g - c for g, c in zip(_grads(model), clean, strict=False)]
    std = sigma * clip / b
    for nf, ng in zip(runs["func"], runs["ghost"], strict=False):
        torch.testing.assert_close(ng, nf, rtol=0.0, atol=1e-5 * std)  # same draws up to float32 rounding


def test_noise_std_is_sigma_c_over_expected_batch_on_the_fast_path() -> None:
    torch.manual_seed(0)
    model = nn.Linear(200, 1000)
    x, y = torch.randn(4, 200), torch.randn(4, 1000)
    sigma, c, b = 1.3, 0.7, 16.0
    dp_sgd_gradients(model, nn.MSELoss(), x, y, c, 0.0, None, b)
    clean = _grads(model)
    stats = dp_sgd_gradients(model, nn.MSELoss(), x, y, c, sigma, torch.Generator().manual_seed(9), b)
    assert stats.method == "ghost"
    noise = torch.cat([(g - r).flatten() for g, r in zip(_grads(model), clean, strict=False)]).double()
    n, std = noise.numel(), sigma * c / b
    se = std / math.sqrt(2 * (n - 1))
    assert abs(float(noise.std()) - std) <= 4 * se <= 0.01 * std
    assert abs(float(noise.mean())) <= 4 * std / math.sqrt(n)


# --------------------------------------------------------------------------- fallback
class _WithEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(x).mean(1))


class _FunctionalReuse(nn.Module):
    """Uses fc.weight outside fc's forward: only the autograd graph reveals it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + F.linear(x, self.fc.weight)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _fallback_cases() -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor, bool]]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    y = torch.randint(0, 3, (6,), generator=gen)
    seq = nn.Sequential(nn.Linear(4, 5), nn.Flatten(), nn.Linear(15, 3))  # Linear on (B, 3, 4): per-row maths
    return [
        ("embedding", _WithEmbedding(), torch.randint(0, 10, (6, 5), generator=gen), y, True),
        ("tied", _Tied(), torch.randn(6, 4, generator=gen), torch.randint(0, 4, (6,), generator=gen), True),
        ("3-D linear input", seq, torch.randn(6, 3, 4, generator=gen), y, False),
        ("weight used outside its layer", _FunctionalReuse(), torch.randn(6, 4, generator=gen),
         torch.randint(0, 4, (6,), generator=gen), False),
    ]


@pytest.mark.parametrize("case", range(4), ids=[c[0] for c in _fallback_cases()])
def test_unsupported_models_fall_back_to_torch_func(case: int) -> None:
    _, model, x, y, static = _fallback_cases()[case]
    assert (unsupported_reason(model) is not None) == static
    ref = dp_sgd_gradients(model, per_example_cross_entropy, x, y, 0.5, 0.0, None, 6.0, method="func")
    ref_grads = _grads(model)
    auto = dp_sgd_gradients(model, per_example_cross_entropy, x, y, 0.5, 0.0, None, 6.0)
    assert auto.method == "func"
    assert torch.equal(auto.per_sample_norms, ref.per_sample_norms)
    assert all(torch.equal(g, r) for g, r in zip(_grads(model), ref_grads, strict=False))
    with pytest.raises(GhostUnsupportedError):
        dp_sgd_gradients(model, per_example_cross_entropy, x, y, 0.5, 0.0, None, 6.0, method="ghost")
    with pytest.raises(ValueError, match="method"):
        dp_sgd_gradients(model, per_example_cross_entropy, x, y, 0.5, 0.0, None, 6.0, method="opacus")  # type: ignore


# --------------------------------------------------------------------------- dropout
def test_dropout_uses_the_forward_masks_in_the_per_example_maths() -> None:
    """The hook path sees one batched forward: its dropout masks are the ones in the gradients.

    Reference: the same seeded batched forward (same masks), then one autograd.grad per example
    on that graph (examples do not interact), clipped and summed by hand.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 16), nn.Dropout(0.3),
                          nn.Tanh(), nn.Linear(16, 3)).train()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, 10, generator=gen) * torch.linspace(0.2, 4.0, 9).unsqueeze(1)
    y = torch.randint(0, 3, (9,), generator=gen)
    params = list(model.parameters())

    torch.manual_seed(123)
    out = model(x)
    per_example = [torch.autograd.grad(F.cross_entropy(out[i : i + 1], y[i : i + 1]), params, retain_graph=True)
                   for i in range(9)]
    norms = torch.tensor([math.sqrt(sum(float(g.double().square().sum()) for g in gs)) for gs in per_example],
                         dtype=torch.float64)
    ordered = norms.sort().values
    clip = float(ordered[4] + ordered[5]) / 2
    expected = [torch.zeros_like(p) for p in params]
    for gs, norm in zip(per_example, norms, strict=False):
        f = min(1.0, clip / float(norm))
        for e, g in zip(expected, gs, strict=False):
            e += f * g

    torch.manual_seed(123)
    stats = dp_sgd_gradients(model, per_example_cross_entropy, x, y, clip, 0.0, None, 1.0)
    assert stats.method == "ghost" and 0.0 < stats.fraction_clipped < 1.0
    torch.testing.assert_close(stats.per_sample_norms, norms, rtol=1e-5, atol=0.0)
    for p, e in zip(params, expected, strict=False):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))
