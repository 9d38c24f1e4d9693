"""Several small clients trained at once: one vectorised step for all of them (torch.func.vmap).

On one GPU a client of the reference experiment (600 records, batch 32, a 1.66 M-parameter CNN)
launches ~20 tiny kernels per step and leaves the device mostly idle; stacking C clients' weights
and batches turns C small steps into one large one. The arithmetic is the one-client-at-a-time
:meth:`LocalTrainer.train`'s, client by client: the same seeded shuffle per client (``instr.seed``),
the same batches, mean cross-entropy per batch, and torch's SGD update (weight decay, then
momentum with dampening 0, then ``p -= lr * buf``); tests/common/test_training_batched.py checks
the deltas against LocalTrainer to 1e-5 on the CPU.

What it covers: plain SGD local epochs (momentum and weight decay allowed) on models without
buffers (no BatchNorm), for clients with the same number of records and the same instructions
apart from the seed. DP-SGD, FedProx, SCAFFOLD, Adam / Adagrad and q-FedAvg's pre-training loss
are refused (:func:`batchable`): callers train those clients one at a time. It is a building block:
the simulation's executors do not call it yet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fl_common.protocol import TrainInstructions

__all__ = ["batchable", "train_clients_batched"]


def batchable(model: nn.Module, instrs: Sequence[TrainInstructions], sizes: Sequence[int]) -> str | None:
    """None when these clients can be trained together; otherwise the reason they cannot."""
    if not instrs:
        return "no clients"
    if any(True for _ in model.buffers()):
        return "the model has buffers (BatchNorm statistics)"
    first = dataclasses.replace(instrs[0], seed=0)
    if any(dataclasses.replace(i, seed=0) != first for i in instrs[1:]):
        return "the clients' instructions differ beyond their seeds"
    if len(set(sizes)) != 1:
        return "the clients hold different numbers of records"
    i = instrs[0]
    if i.optimizer != "sgd":
        return f"optimizer {i.optimizer!r} (only sgd)"
    if i.dp_sample_level or i.update_clip > 0 or i.update_noise_std > 0:
        return "differential privacy"
    if i.proximal_mu > 0 or i.scaffold or i.report_pre_train_loss:
        return "FedProx, SCAFFOLD or q-FedAvg"
    return None


def train_clients_batched(model: nn.Module, clients: Sequence[tuple[torch.Tensor, torch.Tensor]],
                          instrs: Sequence[TrainInstructions]) -> tuple[torch.Tensor, torch.Tensor]:
    """Train ``model``'s current weights on every client at once; return (deltas [C, numel] in the
    model's state_dict order, mean training loss per client [C])."""
    why = batchable(model, instrs, [int(y.shape[0]) for _, y in clients])
    if why is not None:
        raise ValueError(f"these clients cannot be trained together: {why}")
    instr = instrs[0]
    device = next(model.parameters()).device
    names = [name for name, _ in model.named_parameters()]
    start = {name: p.detach() for name, p in model.named_parameters()}
    count = len(clients)
    params = {name: p.unsqueeze(0).repeat(count, *([1] * p.dim())).clone() for name, p in start.items()}
    momentum = {name: torch.zeros_like(p) for name, p in params.items()} if instr.momentum else None
    xs = torch.stack([x.to(device) for x, _ in clients])
    ys = torch.stack([y.to(device) for _, y in clients])
    n, bs = int(ys.shape[1]), instr.batch_size
    gens = [torch.Generator().manual_seed(i.seed) for i in instrs]

    def loss_fn(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = F.cross_entropy(functional_call(model, p, (xb,)), yb)
        return loss, loss.detach()

    step_grads = vmap(grad(loss_fn, has_aux=True))
    total = torch.zeros(count, dtype=torch.float64, device=device)
    first_step = True
    for _ in range(instr.epochs):
        orders = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(device)
        for begin in range(0, n, bs):
            idx = orders[:, begin : begin + bs]
            xb = torch.stack([xs[c].index_select(0, idx[c]) for c in range(count)])
            yb = torch.stack([ys[c].index_select(0, idx[c]) for c in range(count)])
            grads, losses = step_grads(params, xb, yb)
            total += losses.double() * idx.shape[1]
            with torch.no_grad():
                for name in names:
                    d = grads[name]
                    if instr.weight_decay:
                        d = d.add(params[name], alpha=instr.weight_decay)
                    if momentum is not None:
                        buf = momentum[name]
                        if first_step:
                            buf.copy_(d)
                        else:
                            buf.mul_(instr.momentum).add_(d)
                        d = buf
                    params[name] = params[name] - instr.learning_rate * d
            first_step = False
    deltas = torch.cat([(params[name] - start[name].unsqueeze(0)).reshape(count, -1) for name in names], dim=1)
    return deltas.float().cpu(), (total / (n * instr.epochs)).float().cpu()
