"""Sample-level DP-SGD (Abadi et al. 2016) with per-sample gradients from ``torch.func``.

Why torch.func (functional_call + vmap + grad) rather than Opacus' GradSampleModule hooks:
it works for any module whose forward is functional (no per-layer grad-sampler needed), it
needs no model wrapping, and it measured faster: on the McMahan CNN, batch 32, 2 CPU cores,
torch 2.14.1 / opacus 1.6.0, per-sample gradients took 0.10 s vs 0.18 s (Opacus 1.8x slower)
and a full DP step (clip, sum, noise, SGD update) 0.15 s vs 0.20 s (Opacus 1.3x slower);
medians of 15 interleaved runs, three runs agreeing within 5 %. Rerun with
``python -m fl_common.privacy.bench_per_sample``.

One step, exactly as the accountant assumes (Poisson-subsampled Gaussian mechanism):
the batch was drawn by :func:`poisson_batches` (each record independently with probability
q); every example's *whole* gradient is clipped to L2 ≤ C; the clipped gradients are summed;
N(0, (σC)²) is added to every coordinate; the result is divided by the *expected* batch size
q·n, not the realised one, because dividing by the realised size would make the output's
scale depend on whether a record is present.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .mechanisms import secure_generator
from .validation import check_clip_norm, check_noise_multiplier, check_num_records, check_sample_rate

__all__ = [
    "DPIncompatibleModelError",
    "DPSGDStepStats",
    "check_dp_compatible",
    "convert_batchnorm_to_groupnorm",
    "poisson_batches",
    "per_sample_gradients",
    "dp_sgd_gradients",
]

# Relative shrink applied to active clip factors (≈ 1e-6): absorbs the norm's rounding error
# (< 1e-7, see _per_sample_norms) and the clip factor's own float32 rounding, so that
# ‖factor_i · g_i‖ ≤ C holds for the float32 gradient actually computed, not only on paper.
_CLIP_SAFETY = 1.0 - 2.0**-20


class DPIncompatibleModelError(ValueError):
    """The model has a layer that breaks per-sample privacy (e.g. BatchNorm)."""


@dataclass(frozen=True)
class DPSGDStepStats:
    """Diagnostics of one step. The norms are NOT private: log them locally, never release them."""

    batch_size: int
    per_sample_norms: torch.Tensor
    fraction_clipped: float


def _offending_norm_layers(model: nn.Module) -> list[str]:
    bad = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            bad.append(f"{name or '<root>'} ({type(module).__name__})")
        elif isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
            bad.append(f"{name or '<root>'} ({type(module).__name__} with track_running_stats=True)")
    return bad


def check_dp_compatible(model: nn.Module) -> None:
    """Raises :class:`DPIncompatibleModelError` if the model mixes examples or their statistics.

    BatchNorm normalises each example with statistics of the whole batch, so one record
    changes every other record's output: a per-sample gradient does not exist and clipping
    it bounds nothing. Its running mean/variance buffers also carry un-noised batch data into
    the released model. Running-stat instance norms leak through their buffers likewise.
    """
    bad = _offending_norm_layers(model)
    if bad:
        raise DPIncompatibleModelError(
            "model is not compatible with DP-SGD: "
            + ", ".join(bad)
            + ". BatchNorm mixes examples within a batch (so per-sample gradients and their clipping "
            "bound nothing) and its running statistics store un-noised data. Replace it with GroupNorm: "
            "model = convert_batchnorm_to_groupnorm(model) (and, for InstanceNorm, track_running_stats=False)."
        )


def _groupnorm_for(bn: nn.modules.batchnorm._BatchNorm, max_groups: int) -> nn.GroupNorm:
    channels = bn.num_features
    groups = math.gcd(channels, max_groups)  # must divide the channel count
    ref = bn.weight if bn.weight is not None else bn.running_mean
    kwargs = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    return nn.GroupNorm(groups, channels, eps=bn.eps, affine=bn.affine, **kwargs)


def convert_batchnorm_to_groupnorm(model: nn.Module, max_groups: int = 32) -> nn.Module:
    """Replaces every BatchNorm{1,2,3}d with a GroupNorm over the same channels (in place).

    GroupNorm normalises each example on its own, so per-sample gradients exist and no
    running statistics are kept. Groups = gcd(channels, ``max_groups``) (32 as in Wu & He
    2018 and Opacus' ModuleValidator.fix, adjusted to divide the channel count). Returns the
    model (a new GroupNorm if the model itself was a BatchNorm). Fresh affine parameters.
    """
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        return _groupnorm_for(model, max_groups)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, _groupnorm_for(child, max_groups))
        else:
            convert_batchnorm_to_groupnorm(child, max_groups)
    return model


def poisson_batches(
    n: int,
    sample_rate: float,
    generator: torch.Generator | None = None,
    num_batches: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yields ``num_batches`` index tensors, each record included independently with prob. q.

    Why Poisson sampling: it is the sampling the subsampled-Gaussian accountant analyses;
    fixed-size shuffled batches would need a different (and weaker) analysis. Batches can be
    empty and are still yielded: skipping them would change the mechanism. Default
    ``num_batches`` is round(1/q), one expected pass over the data.
    """
    n = check_num_records(n, "n")
    q = check_sample_rate(sample_rate)
    count = max(1, round(1.0 / q)) if num_batches is None else int(num_batches)
    if count < 0:
        raise ValueError(f"num_batches must be >= 0; got {num_batches!r}")
    gen = generator if generator is not None else secure_generator()
    for _ in range(count):
        mask = torch.rand(n, generator=gen, device=gen.device) < q
        yield torch.nonzero(mask, as_tuple=False).flatten()


def _per_sample_norms(grads: list[torch.Tensor], batch: int, device: torch.device) -> torch.Tensor:
    """‖g_i‖ over all parameters, with a rigorous error bound at float32 speed.

    Each square is rounded once in the gradient's dtype (relative error ≤ 2^-24 for float32)
    and the squares are accumulated in float64 (error ≈ n·2^-53), so the relative error of
    the norm is < 1e-7, well inside the clip safety margin. ``torch.linalg.vector_norm`` in
    float32 was measured 2.6e-5 off on a 1.6M-parameter layer (too loose for the margin),
    and a float64 copy of the whole (B, P) gradient costs more time than computing it.
    Rows are reduced one example at a time: contiguous 1-D reductions are the fast path.
    """
    sq = torch.zeros(batch, dtype=torch.float64, device=device)
    for g in grads:
        flat = g.reshape(batch, -1)
        sq += torch.stack([row.square().sum(dtype=torch.float64) for row in flat])
    return sq.sqrt()


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_sample_gradients(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """{param name: tensor of shape (B, *param.shape)}, one gradient per example.

    ``loss_fn(output, target)`` gets a batch of ONE example and must return a scalar.
    Dropout draws an independent mask per example (vmap randomness="different").
    """
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    if x.shape[0] == 0:
        return {k: torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device) for k, p in params.items()}

    def sample_loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, b), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    return vmap(grad(sample_loss), in_dims=(None, None, 0, 0), randomness="different")(params, buffers, x, y)


def dp_sgd_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    max_grad_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | None,
    expected_batch_size: float,
) -> DPSGDStepStats:
    """Writes the DP-SGD gradient into ``p.grad`` for every trainable parameter.

    ``.grad = (Σ_i clip_C(g_i) + N(0, (σC)² I)) / expected_batch_size`` with clip over the
    concatenation of all of example i's parameter gradients. ``noise_multiplier = 0`` gives
    clipped, noise-free gradients (for tests; not private). ``expected_batch_size`` = q·n.
    ``generator`` must live on the parameters' device; ``None`` seeds one from the OS CSPRNG.
    ``loss_fn(output, target)`` receives one example at a time (batch of 1), see
    :func:`per_sample_gradients`. Returns diagnostics (:class:`DPSGDStepStats`).
    """
    check_dp_compatible(model)
    c = check_clip_norm(max_grad_norm)
    sigma = check_noise_multiplier(noise_multiplier)
    if not (expected_batch_size > 0 and math.isfinite(expected_batch_size)):
        raise ValueError(f"expected_batch_size must be a finite number > 0 (q * n); got {expected_batch_size!r}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same batch size; got {x.shape[0]} and {y.shape[0]}")

    grads = per_sample_gradients(model, loss_fn, x, y)
    batch = int(x.shape[0])
    if grads and batch > 0:
        device = next(iter(grads.values())).device
        norms = _per_sample_norms(list(grads.values()), batch, device)
    else:
        norms = torch.zeros(batch, dtype=torch.float64)
    if not bool(torch.isfinite(norms).all()):
        raise ValueError("a per-sample gradient is non-finite (inf/NaN); check the loss and the learning rate")
    clipped_mask = norms > c
    factor = torch.where(clipped_mask, c / norms.clamp_min(1e-300) * _CLIP_SAFETY, torch.ones_like(norms))

    named = dict(model.named_parameters())
    std = sigma * c
    gen = generator
    for name, g in grads.items():
        param = named[name]
        summed = torch.einsum("b,b...->...", factor.to(g.dtype), g) if batch else torch.zeros_like(param)
        if std > 0:
            if gen is None:
                gen = secure_generator(param.device)
            summed = summed + torch.randn(summed.shape, generator=gen, dtype=summed.dtype, device=summed.device) * std
        param.grad = (summed / expected_batch_size).detach().to(param.dtype)
    fraction = float(clipped_mask.to(torch.float64).mean()) if batch else 0.0
    return DPSGDStepStats(batch_size=batch, per_sample_norms=norms.detach(), fraction_clipped=fraction)
