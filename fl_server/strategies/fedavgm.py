"""FedAvgM (Hsu et al. 2019): FedAvg's weighted mean, applied with server momentum.

v_t = beta v_{t-1} + Delta_t and x_{t+1} = x_t + eta v_t, with Delta_t the sample-weighted mean
client delta, beta = ``server_momentum`` and eta = ``server_learning_rate``. Momentum on the
server smooths the round-to-round swings that non-IID client cohorts cause; beta = 0 is FedAvg.
The momentum buffer is server state: it is checkpointed, so a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from fl_common.protocol import TrainInstructions
from fl_server.strategies.base import (
    AggregateResult,
    Aggregator,
    Strategy,
    WeightedMeanAggregator,
    with_mu,
)


class FedAvgM(Strategy):
    name = "fedavgm"

    def __init__(self, *, server_momentum: float = 0.9, server_learning_rate: float = 1.0) -> None:
        super().__init__(server_learning_rate=server_learning_rate)
        self.server_momentum = server_momentum
        self.velocity: torch.Tensor | None = None

    def configure_client(self, base: TrainInstructions, client_id: int | str) -> TrainInstructions:
        return with_mu(base, 0.0)

    def new_aggregator(self, round_number: int, global_vector: torch.Tensor) -> Aggregator:
        return WeightedMeanAggregator(global_vector.numel())

    def apply(self, global_vector: torch.Tensor, aggregate: AggregateResult) -> torch.Tensor:
        delta = aggregate.delta.to(torch.float32)
        if self.velocity is None:
            self.velocity = torch.zeros_like(delta)
        self.velocity = self.server_momentum * self.velocity + delta
        return global_vector + self.server_learning_rate * self.velocity

    def state_dict(self) -> dict[str, Any]:
        return {} if self.velocity is None else {"velocity": self.velocity.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        v = state.get("velocity")
        self.velocity = None if v is None else v.to(torch.float32).clone()
