"""Sample-level DP-SGD (Abadi et al. 2016): per-sample clipping by layer hooks, torch.func as reference.

Two ways to the same per-sample norms and clipped sums, chosen per model by
:func:`dp_sgd_gradients` (``method="auto"``):

* :mod:`.ghost` (default whenever every trainable parameter is the weight/bias of a Linear,
  Conv2d, GroupNorm or LayerNorm it handles, as in the ``cnn``, ``mlp`` and GroupNorm
  ``resnet`` models): one forward and one backward pass, the norms in closed form (Linear:
  ‖a_i‖·‖b_i‖) or from small per-sample gradients (convolutions, norm affines), and the clipped
  sum as one matmul per layer. It never forms the B x 1.6M per-sample gradients of the CNN's
  fc layer that made torch.func slow.
* torch.func (functional_call + vmap + grad): works for any functional forward, so it is
  the fallback for everything else (Embedding, custom layers, tied weights...) and the
  reference the tests hold the hook path to (norms and sums within float32 rounding).

Measured with ``python benchmarks/bench_per_sample.py`` (McMahan CNN, full DP step:
norms, clip, sum, noise, SGD update; medians of 15 interleaved runs; torch 2.14.1, opacus
1.6.0) on a 2-core machine shared with other jobs (load average 10-15 during the runs, so
absolute times are inflated several-fold; the ratios are the finding). Seconds per step:

=====================  =========  ==========  =========  ===========  =========================
threads, batch         plain SGD  hook path   torch.func Opacus GSM   Opacus ghost clipping
=====================  =========  ==========  =========  ===========  =========================
1 thread, batch 32     0.091      **0.152**   0.681      0.884        0.225
1 thread, batch 128    0.322      **0.666**   2.605      3.164        0.828
2 threads, batch 32    0.437      **0.747**   2.732      1.408        0.736
2 threads, batch 128   0.871      **1.491**   8.104      5.084        2.472
=====================  =========  ==========  =========  ===========  =========================

The hook path is 3.7-5.4x faster than torch.func, 1.9-5.8x faster than Opacus'
GradSampleModule, and on par with (2 threads, batch 32) to 1.7x faster than Opacus' own ghost
clipping (which needs a second backward pass), at 1.7-2.1x the cost of a non-private step.
One client's round through the real ``LocalTrainer`` (600 Fashion-MNIST records, batch 32,
19 steps, ``--trainer-round``, medians of 3): torch.func 7.73 s vs hook path 1.66 s with 1
thread (4.7x), 37.1 s vs 13.2 s with 2 threads under heavier load (2.8x); the two paths'
updates differ by 1.7e-7 (relative max) from the same seeded batches and noise: the same
mechanism.

One step, exactly as the accountant assumes (Poisson-subsampled Gaussian mechanism):
the batch was drawn by :func:`poisson_batches` (each record independently with probability
q); every example's *whole* gradient is clipped to L2 ≤ C; the clipped gradients are summed;
N(0, (σC)²) is added to every coordinate; the result is divided by the *expected* batch size
q·n, not the realised one, because dividing by the realised size would make the output's
scale depend on whether a record is present.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .ghost import GhostUnsupportedError, ghost_clipping, unsupported_reason
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
    "GhostUnsupportedError",
]

_log = logging.getLogger(__name__)

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
    method: str = "func"  # "ghost" (hook path) or "func" (torch.func): which one computed the norms


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
ClippedSums = Callable[[torch.Tensor], dict[str, torch.Tensor]]


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


Method = Literal["auto", "ghost", "func"]


def _func_clipping(model: nn.Module, loss_fn: LossFn, x: torch.Tensor,
                   y: torch.Tensor) -> tuple[torch.Tensor, ClippedSums]:
    """The reference path: (B, P) per-sample gradients from torch.func, norms, then Σ factor_i g_i."""
    grads = per_sample_gradients(model, loss_fn, x, y)
    batch = int(x.shape[0])
    norms = _per_sample_norms(list(grads.values()), batch, next(iter(grads.values())).device)

    def sums(factor: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: torch.einsum("b,b...->...", factor.to(g.dtype), g) for name, g in grads.items()}

    return norms, sums


def _ghost_clipping(model: nn.Module, loss_fn: LossFn, x: torch.Tensor,
                    y: torch.Tensor) -> tuple[torch.Tensor, ClippedSums]:
    """The hook path (:mod:`.ghost`): norms now, clipped sums once the factors are known."""
    result = ghost_clipping(model, loss_fn, x, y)
    return result.norms, result.clipped_sums


def dp_sgd_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    max_grad_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | None,
    expected_batch_size: float,
    *,
    method: Method = "auto",
) -> DPSGDStepStats:
    """Writes the DP-SGD gradient into ``p.grad`` for every trainable parameter.

    ``.grad = (Σ_i clip_C(g_i) + N(0, (σC)² I)) / expected_batch_size`` with clip over the
    concatenation of all of example i's parameter gradients. ``noise_multiplier = 0`` gives
    clipped, noise-free gradients (for tests; not private). ``expected_batch_size`` = q·n.
    ``generator`` must live on the parameters' device; ``None`` seeds one from the OS CSPRNG.
    ``loss_fn(output, target)`` receives one example at a time (batch of 1), see
    :func:`per_sample_gradients`. Returns diagnostics (:class:`DPSGDStepStats`).

    ``method``: ``"auto"`` (default) uses the hook path of :mod:`.ghost` (one forward, one
    backward, no per-sample gradient of the big layers) when every trainable parameter belongs
    to a Linear, Conv2d, GroupNorm or LayerNorm it can handle, else torch.func for the whole
    model; ``"ghost"`` forces the hook path (``ValueError`` if unsupported), ``"func"`` the
    torch.func reference. Both give the same mechanism, and draw the noise in the same order
    (parameters in ``named_parameters`` order), so a seeded generator gives identical noise.
    Dropout: the hook path uses the masks of its one batched forward (independent per element,
    hence per example); torch.func draws per-example masks; both are valid draws.
    """
    check_dp_compatible(model)
    c = check_clip_norm(max_grad_norm)
    sigma = check_noise_multiplier(noise_multiplier)
    if not (expected_batch_size > 0 and math.isfinite(expected_batch_size)):
        raise ValueError(f"expected_batch_size must be a finite number > 0 (q * n); got {expected_batch_size!r}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same batch size; got {x.shape[0]} and {y.shape[0]}")
    if method not in ("auto", "ghost", "func"):
        raise ValueError(f"method must be 'auto', 'ghost' or 'func'; got {method!r}")

    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    batch = int(x.shape[0])
    used = "func"
    if method != "func":
        reason = unsupported_reason(model)
        if reason is None:
            used = "ghost"
        elif method == "ghost":
            raise GhostUnsupportedError(f"ghost clipping cannot handle this model: {reason}")
    if not named or batch == 0:
        norms = torch.zeros(batch, dtype=torch.float64)

        def sums(factor: torch.Tensor) -> dict[str, torch.Tensor]:
            return {name: torch.zeros_like(p) for name, p in named.items()}
    elif used == "ghost":
        try:
            norms, sums = _ghost_clipping(model, loss_fn, x, y)
        except GhostUnsupportedError as exc:
            if method == "ghost":
                raise
            _log.debug("ghost clipping unavailable (%s); using torch.func", exc)
            used = "func"
            norms, sums = _func_clipping(model, loss_fn, x, y)
    else:
        norms, sums = _func_clipping(model, loss_fn, x, y)
    if not bool(torch.isfinite(norms).all()):
        raise ValueError("a per-sample gradient is non-finite (inf/NaN); check the loss and the learning rate")
    clipped_mask = norms > c
    factor = torch.where(clipped_mask, c / norms.clamp_min(1e-300) * _CLIP_SAFETY, torch.ones_like(norms))

    summed_all = sums(factor)
    std = sigma * c
    gen = generator
    for name, param in named.items():  # noise in named_parameters order, whichever path ran
        summed = summed_all[name]
        if std > 0:
            if gen is None:
                gen = secure_generator(param.device)
            summed = summed + torch.randn(summed.shape, generator=gen, dtype=summed.dtype, device=summed.device) * std
        param.grad = (summed / expected_batch_size).detach().to(param.dtype)
    fraction = float(clipped_mask.to(torch.float64).mean()) if batch else 0.0
    return DPSGDStepStats(batch_size=batch, per_sample_norms=norms.detach(), fraction_clipped=fraction, method=used)
