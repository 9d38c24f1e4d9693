"""SCAFFOLD's client side (Karimireddy et al. 2020, Algorithm 1, option II), free of any transport.

A SCAFFOLD client holds its own control variate ``c_i`` between rounds and receives the server's
``c`` with the global model. Every local step uses the corrected gradient ``g - c_i + c``, which
removes (an estimate of) the client's drift away from the global objective; after ``K`` local
steps with learning rate ``lr`` the client's new variate is, by option II,

    c_i+ = c_i - c + (x - y_i) / (K lr)

where ``x`` is the global model and ``y_i`` the local one. The client uploads its model delta and
``Δc_i = c_i+ - c_i = (x - y_i) / (K lr) - c``, and stores ``c_i + Δc_i``.

Who keeps ``c_i`` is the driver's business: the simulation keeps one per client in the run
folder, the client daemon in its state directory. These functions take and return flat tensors
only, so both call exactly the same maths.

Option II's ``(x - y_i) / (K lr)`` is the mean corrected gradient only for plain SGD steps: with
momentum (or Adam/Adagrad) the displacement is not ``K lr`` times a mean gradient, and the
variates would come out wrongly scaled. So SCAFFOLD requires ``optimizer: sgd`` and
``momentum: 0`` (the config refuses anything else, and so does :func:`check_scaffold_instructions`).
Weight decay is allowed: it is part of every client's local objective and enters ``c`` and
``c_i`` alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fl_common.protocol import TrainInstructions
from fl_common.tensors import ParamSpec


@dataclass
class ControlVariates:
    """The two variates one SCAFFOLD client trains with, as flat float32 model-sized vectors."""

    server: torch.Tensor  #: c, sent by the server with the global model
    client: torch.Tensor  #: c_i, kept by the client (zeros before its first round)

    def check(self, numel: int) -> None:
        for name, t in (("server", self.server), ("client", self.client)):
            if t.dim() != 1 or t.numel() != numel:
                raise ValueError(f"SCAFFOLD {name} control variate has shape {tuple(t.shape)}, expected ({numel},)")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"SCAFFOLD {name} control variate is not finite")

    def correction(self) -> torch.Tensor:
        """``c - c_i``, added to every local gradient."""
        return self.server.to(torch.float32) - self.client.to(torch.float32)


def check_scaffold_instructions(instr: TrainInstructions) -> None:
    """Refuse the local optimisers for which option II's variate would be wrong (see the module doc)."""
    if instr.optimizer != "sgd" or instr.momentum != 0.0:
        raise ValueError(f"SCAFFOLD's option-II control variate assumes plain SGD steps; got optimizer "
                         f"{instr.optimizer!r} with momentum {instr.momentum:g} (use optimizer sgd, momentum 0)")


def control_delta(server_control: torch.Tensor, global_vector: torch.Tensor, local_vector: torch.Tensor,
                  steps: int, learning_rate: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``Δc_i = c_i+ - c_i = (x - y_i) / (K lr) - c`` (option II).

    ``mask`` (True on trainable-parameter coordinates) zeroes the coordinates of buffers such as
    BatchNorm statistics, which no gradient moves and which therefore have no variate."""
    if steps < 1:
        raise ValueError(f"SCAFFOLD needs at least one local step to estimate a variate, got {steps}")
    if not learning_rate > 0:
        raise ValueError(f"SCAFFOLD needs a positive learning rate, got {learning_rate}")
    x = global_vector.to(torch.float64)
    y = local_vector.to(torch.float64)
    delta = (x - y) / (steps * learning_rate) - server_control.to(torch.float64)
    if mask is not None:
        delta = delta * mask.to(torch.float64)
    return delta.to(torch.float32)


def updated_client_control(client_control: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The variate the client keeps for its next round: ``c_i + Δc_i``."""
    return (client_control.to(torch.float32) + delta.to(torch.float32)).contiguous()


def parameter_mask(model: nn.Module, spec: ParamSpec) -> torch.Tensor:
    """A bool vector over the flat state: True where a coordinate belongs to a trainable parameter."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return torch.cat([torch.full((e.numel,), e.name in trainable, dtype=torch.bool) for e in spec.entries]) \
        if spec.entries else torch.zeros(0, dtype=torch.bool)


def parameter_views(model: nn.Module, spec: ParamSpec, flat: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Pairs (parameter, the matching slice of ``flat`` shaped like it), for trainable parameters."""
    offsets: dict[str, tuple[int, int]] = {}
    offset = 0
    for e in spec.entries:
        offsets[e.name] = (offset, e.numel)
        offset += e.numel
    pairs = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            start, n = offsets[name]
            pairs.append((p, flat[start : start + n].view(p.shape)))
    return pairs
