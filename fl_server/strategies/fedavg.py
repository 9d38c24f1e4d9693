"""FedAvg (McMahan et al. 2017): the sample-weighted mean of client deltas."""

from __future__ import annotations

import torch

from fl_common.protocol import TrainInstructions
from fl_server.strategies.base import (
    Aggregator,
    Strategy,
    WeightedMeanAggregator,
    with_mu,
)


class FedAvg(Strategy):
    name = "fedavg"

    def configure_client(self, base: TrainInstructions, client_id: int | str) -> TrainInstructions:
        # FedAvg never sends a proximal term, whatever proximal_mu is set to for FedProx.
        return with_mu(base, 0.0)

    def new_aggregator(self, round_number: int, global_vector: torch.Tensor) -> Aggregator:
        return WeightedMeanAggregator(global_vector.numel())
