"""SCAFFOLD, the server side (Karimireddy et al. 2020, "Stochastic Controlled Averaging for FL").

The server holds the control variate c (the average of all clients' variates c_i, both zero at
the start) and sends it with the global model; each client trains with the corrected gradient
g - c_i + c and returns its model delta Delta y_i and its variate delta Delta c_i (client side:
``fl_common.training.scaffold``). With S the clients that reported and N = ``num_clients``:

    x <- x + eta_g (1/|S|) sum_{i in S} Delta y_i      (eta_g = ``server_learning_rate``)
    c <- c + (|S| / N) (1/|S|) sum_{i in S} Delta c_i

Both means are unweighted, as in the paper (c must stay the plain average of the N client
variates). Both are sums, so aggregation streams (memory O(model)), and the scheme is compatible
with secure aggregation once that exists. c is server state and is checkpointed; the clients'
c_i are the driver's (the simulation keeps them in the run folder, the daemon in its state dir).

Option II's variate assumes plain SGD, so the config refuses other optimizers and momentum; the
variate delta is not clipped or noised, so client-level DP is refused too (sample-level DP-SGD
is fine: the variates are post-processing of the DP-trained model).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from fl_common.protocol import ClientUpdate, TrainInstructions
from fl_server.strategies.base import (
    AggregateResult,
    Aggregator,
    Strategy,
    UpdateRejected,
    check_update,
)
from fl_server.strategies.common import LossMean


class ScaffoldAggregator(Aggregator):
    """Running unweighted sums of Delta y_i and Delta c_i (float64)."""

    def __init__(self, numel: int) -> None:
        self._numel = numel
        self._delta_sum = torch.zeros(numel, dtype=torch.float64)
        self._control_sum = torch.zeros(numel, dtype=torch.float64)
        self._count = 0
        self._weight = 0.0
        self._loss = LossMean()

    def add(self, update: ClientUpdate) -> None:
        check_update(update, self._numel)
        c = update.control_delta
        if not isinstance(c, torch.Tensor) or c.dim() != 1 or c.numel() != self._numel:
            raise UpdateRejected("missing_control_delta", f"update from client {update.client_id} lacks a control-variate "
                                 f"delta of shape ({self._numel},) (SCAFFOLD clients upload one with every update)")
        if not bool(torch.isfinite(c).all()):
            raise UpdateRejected("not_finite", f"control-variate delta from client {update.client_id} contains NaN or Inf")
        self._delta_sum.add_(update.delta.to(torch.float64))
        self._control_sum.add_(c.to(torch.float64))
        self._count += 1
        self._weight += float(update.num_samples)
        self._loss.add(update)

    @property
    def num_updates(self) -> int:
        return self._count

    def result(self) -> AggregateResult:
        if self._count == 0:
            raise ValueError("no updates to aggregate")
        return AggregateResult(delta=(self._delta_sum / self._count).to(torch.float32), total_weight=self._weight,
                               num_updates=self._count, train_loss=self._loss.value,
                               control_delta=(self._control_sum / self._count).to(torch.float32))


class Scaffold(Strategy):
    name = "scaffold"
    needs_client_state = True
    needs_plain_sgd = True

    def __init__(self, *, num_clients: int = 100, server_learning_rate: float = 1.0) -> None:
        """``num_clients`` is N in c <- c + (|S| / N) mean(Delta c_i)."""
        super().__init__(server_learning_rate=server_learning_rate)
        self.num_clients = num_clients
        self.control: torch.Tensor | None = None  # c; created (zeros) with the first round

    def configure_client(self, base: TrainInstructions, client_id: int | str) -> TrainInstructions:
        return replace(base, proximal_mu=0.0, scaffold=True)

    def new_aggregator(self, round_number: int, global_vector: torch.Tensor) -> Aggregator:
        if self.control is None:
            self.control = torch.zeros(global_vector.numel(), dtype=torch.float32)
        return ScaffoldAggregator(global_vector.numel())

    def server_control(self) -> torch.Tensor | None:
        return self.control

    def apply(self, global_vector: torch.Tensor, aggregate: AggregateResult) -> torch.Tensor:
        if aggregate.control_delta is None:
            raise RuntimeError("SCAFFOLD's aggregate has no control-variate delta (was the aggregator replaced, e.g. by "
                               "client-level DP?)")
        if self.control is None:
            self.control = torch.zeros_like(aggregate.control_delta)
        share = aggregate.num_updates / self.num_clients
        self.control = (self.control + share * aggregate.control_delta).to(torch.float32)
        return global_vector + self.server_learning_rate * aggregate.delta

    def state_dict(self) -> dict[str, Any]:
        return {} if self.control is None else {"control": self.control.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        c = state.get("control")
        self.control = None if c is None else c.to(torch.float32).clone()
