"""The client-level DP aggregate: the unweighted sum of clipped updates plus Gaussian noise, over m.

Why its own module: secure aggregation feeds this aggregator from the unmasked sum
(fl_server/secagg/aggregator.py tells it apart from the strategies' aggregators), so it is
imported on its own, without the DP classes that create it.
"""

from __future__ import annotations

import math

import torch

from fl_common.privacy import gaussian_noise
from fl_common.privacy.client_dp import clip_update
from fl_common.protocol import ClientUpdate
from fl_server.strategies.base import AggregateResult, Aggregator, UpdateRejected, check_update

__all__ = ["DPFedAvgAggregator"]


class DPFedAvgAggregator(Aggregator):
    """Sum of clipped updates + N(0, σ_sum²), divided by the fixed denominator m (client-level DP).

    ``noise_std`` is the std the *server* adds per coordinate when all m clients arrive (zC
    for central noise, 0 for distributed noise); with distributed noise each missing client's
    share (zC)²/m is added here so the sum always carries (zC)².
    """

    def __init__(self, numel: int, clip_norm: float, full_noise_std: float, denominator: int, *, distributed: bool,
                 clip_on_server: bool, generator: torch.Generator, collect_bits: bool) -> None:
        self._sum = torch.zeros(numel, dtype=torch.float64)
        self._count = 0
        self.clip_norm = clip_norm
        self.full_noise_std = full_noise_std
        self.denominator = denominator
        self.distributed = distributed
        self.clip_on_server = clip_on_server
        self.generator = generator
        self.collect_bits = collect_bits
        self.bits: list[float] = []
        self.server_noise_std: float | None = None

    def add(self, update: ClientUpdate) -> None:
        check_update(update, self._sum.numel())
        delta = update.delta
        if self.collect_bits:
            bit = update.metrics.get("dp_unclipped")
            if bit not in (0.0, 1.0):
                raise UpdateRejected("dp_mismatch", f"update from client {update.client_id} lacks its clipping bit "
                                     f"(metrics['dp_unclipped'] must be 0 or 1 under adaptive clipping)")
            self.bits.append(float(bit))
        if self.clip_on_server:
            delta, _ = clip_update(delta, self.clip_norm)
        self._sum.add_(delta.to(torch.float64))
        self._count += 1

    @property
    def num_updates(self) -> int:
        return self._count

    def noise_std_to_add(self) -> float:
        """Std of the noise this aggregator adds to the sum, given who arrived."""
        if not self.distributed:
            return self.full_noise_std
        missing = max(0, self.denominator - self._count)
        return self.full_noise_std * math.sqrt(missing / self.denominator)

    def result(self) -> AggregateResult:
        """Runs with no update too: under Poisson client sampling a round releases its noise whatever
        the draw gave (skipping empty rounds would make the release depend on who was drawn)."""
        std = self.noise_std_to_add()
        self.server_noise_std = std
        noisy = self._sum + gaussian_noise(self._sum.shape, std, self.generator, dtype=torch.float64)
        return AggregateResult(delta=(noisy / self.denominator).to(torch.float32), total_weight=float(self._count),
                               num_updates=self._count, train_loss=None)
