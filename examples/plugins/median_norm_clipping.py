"""An example aggregation plug-in: FedAvg with every update clipped to the round's median norm.

Why: a few clients sending huge updates (faulty, or poisoning the model on purpose) drag FedAvg's
mean arbitrarily far. Bounding each update's L2 norm is the classic defence (Sun et al. 2019,
"Can You Really Backdoor Federated Learning?"), but a fixed bound must be tuned to the model and
the round. The median of the round's norms tunes itself: as long as fewer than half of the
updates are outsized, the bound is an honest update's norm, so no attacker can move the model
further than an honest client could. Each update is scaled down to at most that norm, then the
clipped updates are averaged with the usual sample weights:

    tau = median_k ||Delta_k||,   Delta = sum_k n_k min(1, tau / ||Delta_k||) Delta_k / sum_k n_k

The median needs every update's norm before any of them can be scaled, so the strategy keeps
the round's updates (``needs_individual_updates``): the server refuses it with secure
aggregation or client-level DP, which release only a sum, before the first round.

Run it::

    python -m fl_server simulate --set aggregation_method=custom \\
        --set custom_strategy=examples.plugins.median_norm_clipping:MedianNormClipping ...
"""

from __future__ import annotations

import torch

from fl_common.protocol import TrainInstructions
from fl_server.strategies import Aggregator, IndividualUpdatesAggregator, Strategy


def median_norm_clipped_mean(rows: torch.Tensor, num_samples: list[int]) -> torch.Tensor:
    """The sample-weighted mean of the rows (one update each, float64), each clipped to the median
    row norm (the mean of the two middle norms when there is an even number of rows)."""
    norms = rows.norm(dim=1)
    ordered = norms.sort().values
    n = len(ordered)
    tau = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    scale = torch.where(norms > tau, tau / norms.clamp_min(1e-300), torch.ones_like(norms))
    w = torch.tensor(num_samples, dtype=rows.dtype)
    return (w[:, None] * scale[:, None] * rows).sum(0) / w.sum()


class MedianNormClipping(Strategy):
    name = "median_norm_clipping"
    needs_individual_updates = True

    def __init__(self, *, server_learning_rate: float) -> None:
        """Configuration keys arrive as keyword parameters named after them; this one reads only
        the server step size (the step itself is the base class's: w + eta * Delta)."""
        super().__init__(server_learning_rate=server_learning_rate)

    def configure_client(self, base: TrainInstructions, client_id: int | str) -> TrainInstructions:
        return base  # clients train as for FedAvg

    def new_aggregator(self, round_number: int, global_vector: torch.Tensor) -> Aggregator:
        return IndividualUpdatesAggregator(global_vector.numel(), median_norm_clipped_mean)
