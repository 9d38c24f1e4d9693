"""q-FedAvg (Li, Sanjabi, Beirami, Smith 2020, "Fair Resource Allocation in Federated Learning").

q-FFL minimises sum_k p_k F_k^{q+1} / (q + 1): the larger q, the more weight clients with a high
loss get, trading average accuracy for a more uniform one. One round of q-FedAvg, with the
Lipschitz estimate L = 1 / lr (lr = the round's client learning rate):

    Delta w_k = L (w^t - w_k^{t+1})                     (w_k^{t+1}: the client's local model)
    Delta_k   = F_k(w^t)^q Delta w_k
    h_k       = q F_k(w^t)^{q-1} ||Delta w_k||^2 + L F_k(w^t)^q
    w^{t+1}   = w^t - sum_k Delta_k / sum_k h_k

F_k(w^t) is the loss of the *global* model on client k's training data before it trains, which
the client reports as ``metrics["pre_train_loss"]`` when its instructions say
``report_pre_train_loss`` (an update without it is refused). As in the paper's code, 1e-10 is
added to F_k so that q < 1 never divides by zero. Everything is a running sum, so aggregation
streams (memory O(model)); ``server_learning_rate`` scales the step as for FedAvg (1 = the paper).

At q = 0: Delta_k = Delta w_k and h_k = L, so w^{t+1} = w^t + (1/|S|) sum_k (w_k - w^t), the
*unweighted* mean of the client deltas. That is FedAvg exactly when the selected clients hold the
same number of samples (the q-FFL paper instead samples clients with probability n_k / n, which
makes the unweighted mean FedAvg's expectation); with unequal sizes it is the equal-weight mean.

Privacy: F_k is a statistic of the client's data sent in the clear, so q-FedAvg is refused with
differential privacy (and with secure aggregation, since the server weighs each update itself).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from fl_common.protocol import ClientUpdate, TrainInstructions
from fl_common.training import learning_rate_at
from fl_server.strategies.base import (
    AggregateResult,
    Aggregator,
    Strategy,
    UpdateRejected,
    check_update,
    with_mu,
)
from fl_server.strategies.common import LossMean

PRE_TRAIN_LOSS = "pre_train_loss"
LOSS_EPSILON = 1e-10


class QFedAvgAggregator(Aggregator):
    """Running sums of Delta_k and h_k (float64)."""

    def __init__(self, numel: int, q: float, lipschitz: float) -> None:
        if not lipschitz > 0:
            raise ValueError(f"q-FedAvg needs a positive Lipschitz estimate, got {lipschitz}")
        self.q = q
        self.lipschitz = lipschitz
        self._numel = numel
        self._delta_sum = torch.zeros(numel, dtype=torch.float64)
        self._h_sum = 0.0
        self._count = 0
        self._loss = LossMean()

    def add(self, update: ClientUpdate) -> None:
        check_update(update, self._numel)
        loss = update.metrics.get(PRE_TRAIN_LOSS)
        if loss is None or not math.isfinite(loss) or loss < 0:
            raise UpdateRejected("missing_pre_train_loss", f"update from client {update.client_id} lacks a finite, non-negative "
                                 f"metrics['{PRE_TRAIN_LOSS}'] (q-FedAvg weighs each update by its client's loss)")
        q, lip = self.q, self.lipschitz
        f = float(loss) + LOSS_EPSILON
        dw = -lip * update.delta.to(torch.float64)  # L (w^t - w_k), with delta = w_k - w^t
        fq = f**q
        h = q * f ** (q - 1.0) * float(dw.dot(dw)) + lip * fq
        self._delta_sum.add_(dw, alpha=fq)
        self._h_sum += h
        self._count += 1
        self._loss.add(update)

    @property
    def num_updates(self) -> int:
        return self._count

    def result(self) -> AggregateResult:
        if self._count == 0:
            raise ValueError("no updates to aggregate")
        delta = -(self._delta_sum / self._h_sum)
        return AggregateResult(delta=delta.to(torch.float32), total_weight=self._h_sum, num_updates=self._count,
                               train_loss=self._loss.value)


class QFedAvg(Strategy):
    name = "qfedavg"
    needs_client_loss = True

    def __init__(self, *, qffl_q: float = 1.0, learning_rate: float = 0.01, lr_schedule: str = "constant",
                 lr_decay: float = 0.99, lr_step_size: int = 10, num_rounds: int = 100,
                 server_learning_rate: float = 1.0) -> None:
        """The client learning-rate schedule's keys give the Lipschitz estimate L = 1 / lr of each round."""
        super().__init__(server_learning_rate=server_learning_rate)
        self.qffl_q = qffl_q
        self.learning_rate = learning_rate
        self.lr_schedule = lr_schedule
        self.lr_decay = lr_decay
        self.lr_step_size = lr_step_size
        self.num_rounds = num_rounds

    def configure_client(self, base: TrainInstructions, client_id: int | str) -> TrainInstructions:
        return replace(with_mu(base, 0.0), report_pre_train_loss=True)

    def lipschitz(self, round_number: int) -> float:
        """L = 1 / lr, with the same (possibly scheduled) client learning rate the round sends."""
        lr = learning_rate_at(round_number, self.learning_rate, self.lr_schedule, decay=self.lr_decay,
                              step_size=self.lr_step_size, total_rounds=self.num_rounds)
        return 1.0 / lr

    def new_aggregator(self, round_number: int, global_vector: torch.Tensor) -> Aggregator:
        return QFedAvgAggregator(global_vector.numel(), self.qffl_q, self.lipschitz(round_number))
