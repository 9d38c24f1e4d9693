"""Byzantine-robust aggregation: coordinate-wise median, trimmed mean, Krum and Multi-Krum.

Each replaces FedAvg's weighted mean by a statistic that a minority of arbitrary (faulty or
malicious) updates cannot drag far:

- ``median``: the coordinate-wise median (Yin et al. 2018).
- ``trimmed_mean``: per coordinate, drop the floor(``trim_ratio`` x n) largest and smallest values
  and average the rest (Yin et al. 2018).
- ``krum``: the one update whose n - f - 2 nearest neighbours are closest (Blanchard et al. 2017),
  f = ``krum_byzantine``; needs n > 2f + 2.
- ``multikrum``: the mean of the ``multikrum_m`` updates with the best Krum scores (default
  n - f, never more than n - f at run time).

All of them weigh clients equally: a sample count is a client's own claim, and a Byzantine client
could inflate it to win a weighted mean. They need every update on its own, so they keep them
(``needs_individual_updates``: memory O(clients x model) per round) and cannot run behind secure
aggregation or client-level DP, which only release a sum; the config refuses both combinations.
"""

from __future__ import annotations

import torch

from fl_common.protocol import TrainInstructions
from fl_server.strategies.base import Aggregator, Strategy, with_mu
from fl_server.strategies.common import (
    IndividualUpdatesAggregator,
    coordinate_median,
    krum_select,
    trimmed_mean,
)


class RobustStrategy(Strategy):
    needs_individual_updates = True

    def configure_client(self, base: TrainInstructions, client_id: int | str) -> TrainInstructions:
        return with_mu(base, 0.0)

    def combine(self, rows: torch.Tensor, num_samples: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def new_aggregator(self, round_number: int, global_vector: torch.Tensor) -> Aggregator:
        return IndividualUpdatesAggregator(global_vector.numel(), self.combine)


class Median(RobustStrategy):
    name = "median"

    def combine(self, rows: torch.Tensor, num_samples: list[int]) -> torch.Tensor:
        return coordinate_median(rows)


class TrimmedMean(RobustStrategy):
    name = "trimmed_mean"

    def __init__(self, *, trim_ratio: float = 0.2, server_learning_rate: float = 1.0) -> None:
        super().__init__(server_learning_rate=server_learning_rate)
        self.trim_ratio = trim_ratio

    def combine(self, rows: torch.Tensor, num_samples: list[int]) -> torch.Tensor:
        return trimmed_mean(rows, self.trim_ratio)


class MultiKrum(RobustStrategy):
    name = "multikrum"

    def __init__(self, *, krum_byzantine: int = 1, multikrum_m: int | None = None, server_learning_rate: float = 1.0) -> None:
        super().__init__(server_learning_rate=server_learning_rate)
        self.krum_byzantine = krum_byzantine
        self.multikrum_m = multikrum_m

    def selection_size(self, n: int) -> int:
        f = self.krum_byzantine
        m = self.multikrum_m if self.multikrum_m is not None else n - f
        return max(1, min(m, n - f))

    def combine(self, rows: torch.Tensor, num_samples: list[int]) -> torch.Tensor:
        chosen = krum_select(rows, self.krum_byzantine, self.selection_size(rows.shape[0]))
        return rows[chosen].mean(0)


class Krum(MultiKrum):
    name = "krum"

    def __init__(self, *, krum_byzantine: int = 1, server_learning_rate: float = 1.0) -> None:
        super().__init__(krum_byzantine=krum_byzantine, server_learning_rate=server_learning_rate)

    def selection_size(self, n: int) -> int:
        return 1
