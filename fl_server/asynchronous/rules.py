"""The two asynchronous server rules, as plain tensor maths (no clocks, no clients, no I/O).

FedAsync (Xie et al. 2019, Algorithm 1): every accepted update is mixed in at once,

    x_t = (1 - alpha_t) x_{t-1} + alpha_t x_new,   alpha_t = alpha * s(t - tau),

where x_new = x_tau + delta is the client's local model (it trained from version tau and sent
delta = local - x_tau). Because x_new is built from x_tau, the server keeps the model versions
that clients are still training on.

FedBuff (Nguyen et al. 2022, Algorithm 1): deltas are buffered, each scaled by s(staleness);
after K of them the server steps x <- x + eta_g * (1/K) sum_i s(tau_i) delta_i and empties the
buffer. Deltas are averaged uniformly as in the paper (not weighted by sample counts), and the
buffer is a float64 running sum, so memory is O(model) whatever K is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from fl_server.asynchronous.staleness import StalenessFunction

__all__ = ["AsyncRule", "FedAsyncRule", "FedBuffRule", "RuleStep"]


@dataclass
class RuleStep:
    """What one accepted update did: its weight, and the new global model if the server stepped."""

    weight: float
    new_global: torch.Tensor | None = None
    updates: int = 0  # client updates folded into this server step (0: none happened)
    train_loss: float | None = None


class AsyncRule(ABC):
    name: str

    def __init__(self, staleness: StalenessFunction) -> None:
        self.staleness = staleness

    @property
    def pending(self) -> int:
        """Accepted updates not yet applied to the global model."""
        return 0

    @abstractmethod
    def receive(self, global_vector: torch.Tensor, base_vector: torch.Tensor | None, delta: torch.Tensor,
                staleness: int, train_loss: float | None = None) -> RuleStep: ...

    @property
    def needs_base(self) -> bool:
        """Whether :meth:`receive` needs the model the client trained on (FedAsync does)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class FedAsyncRule(AsyncRule):
    name = "fedasync"

    def __init__(self, staleness: StalenessFunction, alpha: float) -> None:
        super().__init__(staleness)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"fedasync alpha must be in (0, 1], got {alpha}")
        self.alpha = float(alpha)

    @property
    def needs_base(self) -> bool:
        return True

    def mixing_weight(self, staleness: int) -> float:
        return self.alpha * self.staleness(staleness)

    def receive(self, global_vector: torch.Tensor, base_vector: torch.Tensor | None, delta: torch.Tensor,
                staleness: int, train_loss: float | None = None) -> RuleStep:
        if base_vector is None:
            raise ValueError("fedasync needs the model version the client trained on")
        a = self.mixing_weight(staleness)
        x = global_vector.to(torch.float64)
        x_new = base_vector.to(torch.float64) + delta.to(torch.float64)
        mixed = ((1.0 - a) * x + a * x_new).to(torch.float32)
        return RuleStep(weight=a, new_global=mixed, updates=1, train_loss=train_loss)


class FedBuffRule(AsyncRule):
    name = "fedbuff"

    def __init__(self, staleness: StalenessFunction, buffer_size: int, server_lr: float = 1.0) -> None:
        super().__init__(staleness)
        if buffer_size < 1:
            raise ValueError(f"fedbuff buffer size K must be >= 1, got {buffer_size}")
        self.k = int(buffer_size)
        self.server_lr = float(server_lr)
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._loss_sum = 0.0
        self._loss_count = 0

    @property
    def pending(self) -> int:
        return self._count

    def receive(self, global_vector: torch.Tensor, base_vector: torch.Tensor | None, delta: torch.Tensor,
                staleness: int, train_loss: float | None = None) -> RuleStep:
        w = self.staleness(staleness)
        if self._sum is None:
            self._sum = torch.zeros(delta.numel(), dtype=torch.float64)
        self._sum.add_(delta.to(torch.float64), alpha=w)
        self._count += 1
        if train_loss is not None:
            self._loss_sum += float(train_loss)
            self._loss_count += 1
        if self._count < self.k:
            return RuleStep(weight=w)
        step = (global_vector.to(torch.float64) + self.server_lr * self._sum / self.k).to(torch.float32)
        loss = self._loss_sum / self._loss_count if self._loss_count else None
        updates = self._count
        self._sum, self._count, self._loss_sum, self._loss_count = None, 0, 0.0, 0
        return RuleStep(weight=w, new_global=step, updates=updates, train_loss=loss)

    def state_dict(self) -> dict[str, Any]:
        return {"sum": None if self._sum is None else self._sum.clone(), "count": self._count,
                "loss_sum": self._loss_sum, "loss_count": self._loss_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sum = None if state.get("sum") is None else state["sum"].to(torch.float64).clone()
        self._count = int(state.get("count", 0))
        self._loss_sum = float(state.get("loss_sum", 0.0))
        self._loss_count = int(state.get("loss_count", 0))
