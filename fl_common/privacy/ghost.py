"""Per-sample gradient norms and clipped sums from layer hooks ("ghost clipping", book-keeping).

Why: DP-SGD needs ‖g_i‖ for every example i and Σ_i f_i g_i (f_i the clip factor), never the
B x P tensor of per-sample gradients itself. For a layer z = W a (+ b), g_i(W) = Σ_t b_it a_itᵀ
with a the layer's input and b = ∂loss_i/∂z its output gradient, so both quantities follow
from what one ordinary forward and one backward pass already see (Goodfellow 2015; Li et al.
2021, "Large Language Models Can Be Strong Differentially Private Learners"; Bu et al. 2022,
"book-keeping"): forward hooks keep a and each output's autograd edge; one ``autograd.grad``
of Σ_i loss_i w.r.t. those edges gives b (a sum, so each row of b belongs to one example) and
forms no parameter gradient at all; an edge is taken at call time, so an in-place ReLU on the
output later does not change which gradient it receives. Then

* ``nn.Linear`` on a (B, d) input, called once: ‖g_i(W)‖² = ‖a_i‖²·‖b_i‖², ‖g_i(bias)‖² =
  ‖b_i‖², and Σ_i f_i g_i(W) = (f ⊙ b)ᵀ a: one matmul of the size of an ordinary backward.
* ``nn.Conv2d`` (any stride, padding, dilation, groups, padding mode) via im2col, a_i:
  (C_in k k, L): either the per-sample weight gradient b_i a_iᵀ is materialised (C_out x C_in k k
  per example) or its norm comes from the Gram matrices, ‖g_i‖² = Σ_st (a_iᵀa_i ⊙ b_iᵀb_i)_st
  ("ghost norm"), whichever costs fewer flops for that layer, as the book-keeping paper picks
  per layer. The McMahan CNN's two convolutions materialise (small: 800 and 51 200 values per
  example); its 1.6M-parameter fc layer never is.
* A ``nn.Linear`` called U > 1 times per forward is treated like a convolution with U positions.
* ``nn.GroupNorm`` / ``nn.LayerNorm`` (input exactly (B, *normalized_shape)) affine parameters:
  per-sample gradients are materialised (C values per example), from the normalised input
  recomputed from the captured input.

Anything else with trainable parameters (Embedding, BatchNorm, custom layers, tied weights,
a parameter used outside its layer's forward, inputs that are not batch-first of the plain
shape) raises :class:`GhostUnsupportedError`, and :func:`~.dpsgd.dp_sgd_gradients` then uses
its torch.func path for the whole model. Some checks are static (:func:`unsupported_reason`),
some happen after the forward (shapes, a parameter reached outside its layer: counted on the
autograd graph, an input modified in place after it was captured).

Float rounding, the same reasoning as :func:`.dpsgd._per_sample_norms`: norms are accumulated
in float64. The Linear closed form squares float32 values exactly in float64, so it is the norm
of the exact outer product b_i a_iᵀ to ~d·2^-53; materialised gradients are squared once in
their dtype (relative error ≤ 2^-24) and accumulated in float64, and the clipped sum uses those
very tensors, so the clip holds for the gradient actually computed; Gram matrices are computed
in float64 (their entries can cancel, so float32 would not do). All of these stay well inside
the ``_CLIP_SAFETY`` margin (2^-20) that :mod:`.dpsgd` applies to the clip factors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn import functional as F

from .losses import per_example_cross_entropy

__all__ = ["GhostUnsupportedError", "GhostClipping", "ghost_clipping", "unsupported_reason", "Strategy"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: Per-layer choice for Conv2d and multi-call Linear: "auto" picks by flops; tests force one.
Strategy = Literal["auto", "gram", "materialize"]

_BASES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)
# Float64 flops cost about twice float32 ones on CPU BLAS; the Gram route runs in float64.
_GRAM_FLOP_WEIGHT = 2.0


class GhostUnsupportedError(ValueError):
    """The fast path cannot compute exact per-sample norms for this model or batch (says why)."""


def _base_of(module: nn.Module) -> type[nn.Module] | None:
    """The supported base class whose maths applies, or None.

    A subclass counts only if it keeps the base's forward: an overridden forward may use the
    weight in another way, and the closed forms would then be wrong without any error.
    """
    for base in _BASES:
        if isinstance(module, base):
            same = type(module).forward is base.forward
            if base is nn.Conv2d:
                same = same and type(module)._conv_forward is nn.Conv2d._conv_forward
            return base if same else None
    return None


def _owners(model: nn.Module) -> tuple[dict[int, list[tuple[nn.Module, str]]], dict[int, str]]:
    """{id(param): [(module, attribute)]} over distinct modules, and {id(param): name} (trainable)."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():  # distinct module objects (a reused module appears once)
        for attr, p in module._parameters.items():
            if p is not None and id(p) in names:
                owners.setdefault(id(p), []).append((module, attr))
    return owners, names


def unsupported_reason(model: nn.Module) -> str | None:
    """Why :func:`ghost_clipping` cannot handle ``model`` (static checks), or None if it may.

    Every trainable parameter must be the ``weight`` or ``bias`` of exactly one module of a
    supported type (Linear, Conv2d, GroupNorm, LayerNorm with their own forward). Passing this
    check is necessary, not sufficient: the forward may still reveal an unsupported use.
    """
    owners, names = _owners(model)
    for pid, name in names.items():
        mods = owners.get(pid, [])
        if len(mods) != 1:
            return f"parameter {name} is shared by {len(mods)} modules (tied weights)"
        module, attr = mods[0]
        if _base_of(module) is None:
            return f"parameter {name} belongs to an unsupported layer ({type(module).__name__})"
        if attr not in ("weight", "bias"):
            return f"parameter {name} is not a layer's weight or bias"
    return None


@dataclass
class _Call:
    """One call of a supported layer during the forward."""

    inp: torch.Tensor  # detached; shares the version counter with the real input
    version: int
    edge: GradientEdge  # the output's (grad_fn, output_nr) at call time, before any in-place op on it
    grad: torch.Tensor | None = None  # ∂(Σ_i loss_i)/∂output


@dataclass
class _Layer:
    module: nn.Module
    base: type[nn.Module]
    calls: list[_Call] = field(default_factory=list)
    problem: str | None = None


@dataclass
class _Piece:
    """What one trainable parameter contributes: enough to form Σ_i f_i g_i on demand."""

    name: str
    param: nn.Parameter
    kind: Literal["materialized", "outer", "gram"]
    left: torch.Tensor  # materialized: (B, *shape); outer: b (B, p); gram: B-side (B, g, p, T)
    right: torch.Tensor | None = None  # outer: a (B, d); gram: A-side (B, g, d, T)

    def clipped_sum(self, factor: torch.Tensor) -> torch.Tensor:
        f = factor.to(self.left.dtype)
        if self.kind == "materialized":
            return torch.einsum("b,b...->...", f, self.left)
        if self.kind == "outer":
            assert self.right is not None
            return (self.left * f[:, None]).t() @ self.right
        assert self.right is not None
        return torch.einsum("bgpt,bgdt->gpd", self.left * f[:, None, None, None], self.right).reshape(self.param.shape)


@dataclass
class GhostClipping:
    """Per-sample norms of one batch, and the clipped sums once the clip factors are known."""

    norms: torch.Tensor  # (B,) float64: ‖g_i‖ over all trainable parameters
    pieces: list[_Piece]

    def clipped_sums(self, factor: torch.Tensor) -> dict[str, torch.Tensor]:
        """{param name: Σ_i factor_i g_i}; never materialises a (B, P) tensor for the big layers."""
        return {piece.name: piece.clipped_sum(factor) for piece in self.pieces}


# --------------------------------------------------------------------------- losses
def _per_example_losses(loss_fn: LossFn, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) losses, loss_i = loss_fn(out[i:i+1], y[i:i+1]) as the torch.func path defines them.

    Known losses are vectorised directly (for a batch of one, mean and sum reductions agree);
    any other loss is vmapped over single examples, or looped if vmap cannot trace it.
    """
    ce_like = loss_fn is per_example_cross_entropy or loss_fn is F.cross_entropy
    smoothing, ignore = 0.0, -100
    if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is None and loss_fn.reduction in ("mean", "sum"):
        ce_like, smoothing, ignore = True, loss_fn.label_smoothing, loss_fn.ignore_index
    # An ignored target makes the batch-of-one mean 0/0 in the reference: leave that case to vmap.
    if ce_like and out.dim() == 2 and (y.is_floating_point() or not bool((y == ignore).any())):
        return F.cross_entropy(out, y, reduction="none", label_smoothing=smoothing)
    if isinstance(loss_fn, nn.MSELoss) and loss_fn.reduction in ("mean", "sum") and out.shape == y.shape:
        sq = (out - y).square().reshape(out.shape[0], -1)
        return sq.mean(1) if loss_fn.reduction == "mean" else sq.sum(1)
    try:
        return torch.vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, y)
    except Exception:
        return torch.stack([loss_fn(out[i : i + 1], y[i : i + 1]) for i in range(out.shape[0])])


# --------------------------------------------------------------------------- graph checks
def _walk_graph(root: object) -> tuple[set[int], dict[int, int]]:
    """Ids of the autograd nodes reachable from ``root`` and, per leaf parameter, its number of uses."""
    seen: set[int] = set()
    uses: dict[int, int] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for nxt, _ in node.next_functions:  # type: ignore[attr-defined]
            if nxt is None:
                continue
            variable = getattr(nxt, "variable", None)
            if variable is not None:
                uses[id(variable)] = uses.get(id(variable), 0) + 1
            if id(nxt) not in seen:
                stack.append(nxt)
    return seen, uses


# --------------------------------------------------------------------------- per-layer maths
def _im2col(a: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """(B, C_in k_h k_w, L) patches in the weight's (c, i, j) order, as F.unfold but faster.

    A strided view of the padded input copied once measured ~4x faster than ``F.unfold`` on
    this CPU. Non-zero padding modes and string padding are applied the way Conv2d applies them.
    """
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        a = F.pad(a, conv._reversed_padding_repeated_twice, mode=mode)
    elif any(conv.padding):
        ph, pw = conv.padding
        a = F.pad(a, (pw, pw, ph, ph))
    a = a.contiguous()
    b, c, h, w = a.shape
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s = a.stride()
    patches = a.as_strided((b, c, kh, kw, ho, wo), (s[0], s[1], s[2] * dh, s[3] * dw, s[2] * sh, s[3] * sw))
    return patches.reshape(b, c * kh * kw, ho * wo)


def _sq_rows(t: torch.Tensor) -> torch.Tensor:
    """Σ of squares per example: squares rounded once in t's dtype, accumulated in float64."""
    return t.reshape(t.shape[0], -1).square().sum(1, dtype=torch.float64)


def _use_gram(strategy: Strategy, groups: int, d: int, p: int, t: int, batch: int) -> bool:
    """Gram ("ghost norm") iff it costs fewer flops than materialising g_i, per example.

    Materialising: g·T·d·p flops (float32), g·d·p values kept. Gram: g·T²·(d + p) flops in
    float64. For the McMahan CNN's convs materialising wins (T = 784, 196 positions); for deep
    convs on small maps (T = 16, d = 4608) the Gram route is ~15x cheaper and avoids GBs.
    """
    if strategy != "auto":
        return strategy == "gram"
    materialize = groups * t * d * p
    gram = _GRAM_FLOP_WEIGHT * groups * t * t * (d + p)
    return gram < materialize


def _weight_bias_pieces(layer: _Layer, names: dict[int, str], a_side: torch.Tensor, b_side: torch.Tensor,
                        strategy: Strategy, sq: torch.Tensor, pieces: list[_Piece]) -> None:
    """Conv2d / multi-call Linear: A (B, g, d, T), Bg (B, g, p, T); adds norms into ``sq``."""
    module = layer.module
    batch, groups, d, t = a_side.shape
    p = b_side.shape[2]
    weight, bias = module.weight, getattr(module, "bias", None)
    if weight.requires_grad:
        name = names[id(weight)]
        if _use_gram(strategy, groups, d, p, t, batch):
            a64, b64 = a_side.double(), b_side.double()
            gram_a = a64.transpose(-1, -2) @ a64  # (B, g, T, T)
            gram_b = b64.transpose(-1, -2) @ b64
            sq += (gram_a * gram_b).sum((1, 2, 3))
            pieces.append(_Piece(name, weight, "gram", b_side, a_side))
        else:
            per_sample = (b_side @ a_side.transpose(-1, -2)).reshape(batch, *weight.shape)  # (B, g, p, d)
            sq += _sq_rows(per_sample)
            pieces.append(_Piece(name, weight, "materialized", per_sample))
    if bias is not None and bias.requires_grad:
        per_sample = b_side.sum(-1).reshape(batch, *bias.shape)
        sq += _sq_rows(per_sample)
        pieces.append(_Piece(names[id(bias)], bias, "materialized", per_sample))


def _linear(layer: _Layer, names: dict[int, str], strategy: Strategy, sq: torch.Tensor, pieces: list[_Piece]) -> None:
    module = layer.module
    calls = layer.calls
    if len(calls) == 1 and strategy != "materialize":
        a, b = calls[0].inp, calls[0].grad
        assert b is not None
        b_sq = b.double().square().sum(1)  # exact squares of float32 values, float64 sums
        if module.weight.requires_grad:
            sq += a.double().square().sum(1) * b_sq
            pieces.append(_Piece(names[id(module.weight)], module.weight, "outer", b, a))
        if module.bias is not None and module.bias.requires_grad:
            sq += b_sq
            pieces.append(_Piece(names[id(module.bias)], module.bias, "materialized", b))
        return
    a_side = torch.stack([c.inp for c in calls], dim=-1).unsqueeze(1)  # (B, 1, d, U)
    b_side = torch.stack([c.grad for c in calls], dim=-1).unsqueeze(1)  # type: ignore[misc]
    _weight_bias_pieces(layer, names, a_side, b_side, strategy, sq, pieces)


def _conv(layer: _Layer, names: dict[int, str], strategy: Strategy, sq: torch.Tensor, pieces: list[_Piece]) -> None:
    conv = layer.module
    assert isinstance(conv, nn.Conv2d)
    g = conv.groups
    a_parts, b_parts = [], []
    for call in layer.calls:
        cols = _im2col(call.inp, conv)
        grad = call.grad
        assert grad is not None
        batch = grad.shape[0]
        if cols.shape[2] != grad.shape[2] * grad.shape[3]:
            raise GhostUnsupportedError(f"Conv2d output size {tuple(grad.shape[2:])} does not match its im2col")
        a_parts.append(cols.reshape(batch, g, cols.shape[1] // g, cols.shape[2]))
        b_parts.append(grad.reshape(batch, g, grad.shape[1] // g, -1))
    a_side = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, dim=-1)
    b_side = b_parts[0] if len(b_parts) == 1 else torch.cat(b_parts, dim=-1)
    _weight_bias_pieces(layer, names, a_side, b_side, strategy, sq, pieces)


def _norm_layer(layer: _Layer, names: dict[int, str], sq: torch.Tensor, pieces: list[_Piece]) -> None:
    """GroupNorm / LayerNorm: per-sample gradients of γ and β, materialised (C values per example)."""
    module = layer.module
    grads_w: torch.Tensor | None = None
    grads_b: torch.Tensor | None = None
    for call in layer.calls:
        b = call.grad
        assert b is not None
        batch = b.shape[0]
        if isinstance(module, nn.GroupNorm):
            x_hat = F.group_norm(call.inp, module.num_groups, None, None, module.eps)
            gw = (b * x_hat).reshape(batch, module.num_channels, -1).sum(2)
            gb = b.reshape(batch, module.num_channels, -1).sum(2)
        else:
            assert isinstance(module, nn.LayerNorm)
            x_hat = F.layer_norm(call.inp, module.normalized_shape, None, None, module.eps)
            gw, gb = b * x_hat, b
        grads_w = gw if grads_w is None else grads_w + gw
        grads_b = gb if grads_b is None else grads_b + gb
    for param, per_sample in ((module.weight, grads_w), (getattr(module, "bias", None), grads_b)):
        if param is not None and param.requires_grad and per_sample is not None:
            per_sample = per_sample.reshape(per_sample.shape[0], *param.shape)
            sq += _sq_rows(per_sample)
            pieces.append(_Piece(names[id(param)], param, "materialized", per_sample))


def _check_call_shape(layer: _Layer, inp: torch.Tensor, batch: int) -> str | None:
    """Only shapes whose dim 0 is the example and nothing else (so rows never mix examples)."""
    module = layer.module
    if inp.shape[:1] != (batch,):
        return f"{type(module).__name__} input has shape {tuple(inp.shape)}, not batch-first with {batch} rows"
    if layer.base is nn.Linear and inp.dim() != 2:
        return f"Linear input has {inp.dim()} dims (only (B, features) is supported)"
    if layer.base is nn.Conv2d and inp.dim() != 4:
        return f"Conv2d input has {inp.dim()} dims (only (B, C, H, W) is supported)"
    if layer.base is nn.LayerNorm and tuple(inp.shape[1:]) != tuple(module.normalized_shape):  # type: ignore[arg-type]
        return "LayerNorm input is not exactly (B, *normalized_shape)"
    return None


# --------------------------------------------------------------------------- entry point
def ghost_clipping(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
                   strategy: Strategy = "auto") -> GhostClipping:
    """One forward and one backward; returns exact per-sample norms and a clipped-sum builder.

    ``loss_fn`` has the torch.func path's contract (one example at a time, scalar); the
    per-example losses are summed so the output gradients are per-example. Parameters' ``.grad``
    are left untouched. Raises :class:`GhostUnsupportedError` when the model or this batch is
    outside what the closed forms cover (the caller falls back to torch.func).
    """
    reason = unsupported_reason(model)
    if reason is not None:
        raise GhostUnsupportedError(reason)
    batch = int(x.shape[0])
    owners, names = _owners(model)
    layers: dict[int, _Layer] = {}
    for mods in owners.values():
        module = mods[0][0]
        base = _base_of(module)
        assert base is not None
        layers.setdefault(id(module), _Layer(module, base))

    def forward_hook(layer: _Layer) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
            inp = args[0] if args else None
            if not isinstance(inp, torch.Tensor) or not isinstance(output, torch.Tensor):
                layer.problem = f"{type(module).__name__} called without a tensor input/output"
                return
            layer.problem = layer.problem or _check_call_shape(layer, inp, batch)
            if not output.requires_grad or output.grad_fn is None:
                return  # cannot influence the loss through this call
            layer.calls.append(_Call(inp.detach(), inp._version, get_gradient_edge(output)))

        return hook

    handles = [layer.module.register_forward_hook(forward_hook(layer)) for layer in layers.values()]
    try:
        with torch.enable_grad():
            out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(out, torch.Tensor) or out.shape[:1] != (batch,):
        raise GhostUnsupportedError("model output is not a (B, ...) tensor")
    for layer in layers.values():
        if layer.problem is not None:
            raise GhostUnsupportedError(layer.problem)
        for call in layer.calls:
            if call.inp._version != call.version:
                raise GhostUnsupportedError(f"the input of a {type(layer.module).__name__} was modified in place")

    with torch.enable_grad():
        losses = _per_example_losses(loss_fn, out, y)
    if losses.shape != (batch,):
        raise GhostUnsupportedError(f"per-example losses have shape {tuple(losses.shape)}, expected ({batch},)")
    loss = losses.sum()
    if loss.grad_fn is None:
        raise GhostUnsupportedError("the loss does not depend on the trainable parameters")
    reachable, uses = _walk_graph(loss.grad_fn)

    for layer in layers.values():
        layer.calls = [c for c in layer.calls if id(c.edge.node) in reachable]
        for attr in ("weight", "bias"):
            param = getattr(layer.module, attr, None)
            if isinstance(param, nn.Parameter) and param.requires_grad and uses.get(id(param), 0) != len(layer.calls):
                raise GhostUnsupportedError(
                    f"parameter {names[id(param)]} is used {uses.get(id(param), 0)} times in the graph but its "
                    f"{type(layer.module).__name__} is called {len(layer.calls)} times (used outside the layer?)")
    calls = [c for layer in layers.values() for c in layer.calls]
    if calls:
        # Gradients w.r.t. the outputs' edges as they were at call time (an in-place ReLU on an
        # output rewrites the tensor's grad_fn, not the edge), and nothing below them: no
        # parameter gradient is formed, and a layer's own backward node runs only if an
        # earlier layer needs its input gradient.
        grads = torch.autograd.grad(loss, [c.edge for c in calls], allow_unused=True)
        for call, grad in zip(calls, grads, strict=False):
            call.grad = grad

    sq = torch.zeros(batch, dtype=torch.float64, device=out.device)
    pieces: list[_Piece] = []
    with torch.no_grad():
        for layer in layers.values():
            if not layer.calls:
                continue  # no path to the loss: zero per-sample gradients, nothing to add
            if any(c.grad is None for c in layer.calls):
                raise GhostUnsupportedError(f"no output gradient reached a {type(layer.module).__name__}")
            if layer.base is nn.Linear:
                _linear(layer, names, strategy, sq, pieces)
            elif layer.base is nn.Conv2d:
                _conv(layer, names, strategy, sq, pieces)
            else:
                _norm_layer(layer, names, sq, pieces)
    order = {name: i for i, name in enumerate(names.values())}
    pieces.sort(key=lambda piece: order[piece.name])
    return GhostClipping(norms=sq.sqrt(), pieces=pieces)

