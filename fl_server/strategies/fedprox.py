"""FedProx (Li et al. 2020): FedAvg's aggregation, with clients minimising
F_k(w) + mu/2 ||w - w_t||^2 so that heterogeneous clients drift less from the global model."""

from __future__ import annotations

import torch

from fl_common.protocol import TrainInstructions
from fl_server.strategies.base import (
    Aggregator,
    Strategy,
    WeightedMeanAggregator,
    with_mu,
)


class FedProx(Strategy):
    name = "fedprox"

    def __init__(self, *, proximal_mu: float = 0.01, server_learning_rate: float = 1.0) -> None:
        super().__init__(server_learning_rate=server_learning_rate)
        self.proximal_mu = proximal_mu

    def configure_client(self, base: TrainInstructions, client_id: int | str) -> TrainInstructions:
        return with_mu(base, self.proximal_mu)

    def new_aggregator(self, round_number: int, global_vector: torch.Tensor) -> Aggregator:
        return WeightedMeanAggregator(global_vector.numel())
