"""FedAdam, FedYogi and FedAdagrad (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).

Clients run plain local SGD; the server treats the sample-weighted mean client delta Delta_t as a
pseudo-gradient and takes an adaptive step:

    m_t = beta1 m_{t-1} + (1 - beta1) Delta_t
    v_t = Adam:    beta2 v_{t-1} + (1 - beta2) Delta_t^2
          Yogi:    v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)
          Adagrad: v_{t-1} + Delta_t^2
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

with m_{-1} = 0 and v_{-1} = tau^2 as in the paper's initialisation (no bias correction, as in
Algorithm 2). Keys: ``server_learning_rate`` (eta), ``server_beta1``, ``server_beta2``,
``server_tau``. The step is roughly eta per coordinate whatever the scale of Delta, so eta must
be far below FedAvg's 1.0 (the paper tunes it in 10^-3..10^0; 10^-2..10^-1 is a good start).
m and v are server state: checkpointed, so a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from fl_common.protocol import TrainInstructions
from fl_server.strategies.base import (
    AggregateResult,
    Aggregator,
    Strategy,
    WeightedMeanAggregator,
    with_mu,
)
from fl_server.strategies.common import (
    adagrad_second_moment,
    adam_second_moment,
    adaptive_step,
    first_moment,
    yogi_second_moment,
)

SecondMoment = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


class AdaptiveServerOptimizer(Strategy):
    """The family's shared body; a subclass names itself and its second-moment rule."""

    second_moment: ClassVar[SecondMoment]

    def __init__(self, *, server_learning_rate: float = 1.0, server_beta1: float = 0.9, server_beta2: float = 0.99,
                 server_tau: float = 1e-3) -> None:
        super().__init__(server_learning_rate=server_learning_rate)
        self.server_beta1 = server_beta1
        self.server_beta2 = server_beta2
        self.server_tau = server_tau
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def configure_client(self, base: TrainInstructions, client_id: int | str) -> TrainInstructions:
        return with_mu(base, 0.0)

    def new_aggregator(self, round_number: int, global_vector: torch.Tensor) -> Aggregator:
        return WeightedMeanAggregator(global_vector.numel())

    def apply(self, global_vector: torch.Tensor, aggregate: AggregateResult) -> torch.Tensor:
        delta = aggregate.delta.to(torch.float32)
        if self.m is None or self.v is None:
            self.m = torch.zeros_like(delta)
            self.v = torch.full_like(delta, self.server_tau**2)
        rule = type(self).second_moment
        self.m = first_moment(self.m, delta, self.server_beta1)
        self.v = rule(self.v, delta, self.server_beta2)
        return global_vector + adaptive_step(self.m, self.v, self.server_learning_rate, self.server_tau)

    def state_dict(self) -> dict[str, Any]:
        if self.m is None or self.v is None:
            return {}
        return {"m": self.m.clone(), "v": self.v.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "m" in state:
            self.m = state["m"].to(torch.float32).clone()
            self.v = state["v"].to(torch.float32).clone()
        else:
            self.m = self.v = None


class FedAdam(AdaptiveServerOptimizer):
    name = "fedadam"
    second_moment = staticmethod(adam_second_moment)


class FedYogi(AdaptiveServerOptimizer):
    name = "fedyogi"
    second_moment = staticmethod(yogi_second_moment)


class FedAdagrad(AdaptiveServerOptimizer):
    name = "fedadagrad"
    second_moment = staticmethod(adagrad_second_moment)
