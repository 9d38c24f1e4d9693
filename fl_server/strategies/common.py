"""The maths strategies share: means, robust statistics and the server-optimiser update rules.

Everything here takes and returns flat tensors and holds no state, so each rule can be checked
against a hand computation on three-element vectors (tests/server/test_strategies_*.py) and reused
by any strategy. Sums and order statistics are taken in float64, so the result barely depends on
the order in which updates arrived; results are handed back in float32 like every model vector.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from fl_common.protocol import ClientUpdate
from fl_server.strategies.base import AggregateResult, Aggregator, check_update

# --------------------------------------------------------------------------- means


def stack(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """The updates as rows of one (n, d) float64 matrix."""
    if not deltas:
        raise ValueError("no updates to aggregate")
    return torch.stack([d.to(torch.float64) for d in deltas])


def weighted_mean(rows: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    w = torch.tensor(list(weights), dtype=torch.float64)
    if bool((w <= 0).any()):
        raise ValueError("weights must be positive")
    return (w[:, None] * rows).sum(0) / w.sum()


# --------------------------------------------------------------------------- robust statistics


def coordinate_median(rows: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median (Yin et al. 2018); the mean of the two middle values when n is even
    (``torch.median`` would return the lower one, biasing every coordinate downwards)."""
    n = rows.shape[0]
    ordered = rows.sort(dim=0).values
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trim_count(n: int, ratio: float) -> int:
    """Updates dropped from *each* end of every coordinate: floor(ratio x n)."""
    return math.floor(ratio * n + 1e-9)


def trimmed_mean(rows: torch.Tensor, ratio: float) -> torch.Tensor:
    """Coordinate-wise beta-trimmed mean (Yin et al. 2018): per coordinate, drop the floor(beta n)
    largest and smallest values and average the rest."""
    n = rows.shape[0]
    k = trim_count(n, ratio)
    if 2 * k >= n:
        raise ValueError(f"trim_ratio {ratio:g} trims {k} of {n} updates from each end, leaving none to average")
    ordered = rows.sort(dim=0).values
    return ordered[k : n - k].mean(0)


def pairwise_sq_distances(rows: torch.Tensor) -> torch.Tensor:
    """(n, n) squared Euclidean distances, computed as differences (not via the Gram matrix, which
    cancels catastrophically when updates are close)."""
    n = rows.shape[0]
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        d = ((rows[i + 1 :] - rows[i]) ** 2).sum(1)
        out[i, i + 1 :] = d
        out[i + 1 :, i] = d
    return out


def krum_scores(rows: torch.Tensor, f: int) -> torch.Tensor:
    """Krum's score of each update (Blanchard et al. 2017): the sum of squared distances to its
    n - f - 2 nearest other updates. Needs n > 2f + 2."""
    n = rows.shape[0]
    if n <= 2 * f + 2:
        raise ValueError(f"Krum with krum_byzantine={f} needs more than 2f + 2 = {2 * f + 2} updates, got {n}")
    dist = pairwise_sq_distances(rows)
    dist.fill_diagonal_(float("inf"))
    nearest = dist.sort(dim=1).values[:, : n - f - 2]
    return nearest.sum(1)


def krum_select(rows: torch.Tensor, f: int, m: int) -> list[int]:
    """Indices of the m updates with the lowest Krum scores (ties broken by arrival order)."""
    scores = krum_scores(rows, f)
    order = sorted(range(rows.shape[0]), key=lambda i: (float(scores[i]), i))
    return order[:m]


# --------------------------------------------------------------------------- server optimisers
# Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2, with the aggregated client
# delta as the pseudo-gradient (it points downhill: x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)).


def first_moment(m: torch.Tensor, delta: torch.Tensor, beta1: float) -> torch.Tensor:
    """m_t = beta1 m_{t-1} + (1 - beta1) Delta_t."""
    return beta1 * m + (1.0 - beta1) * delta


def adam_second_moment(v: torch.Tensor, delta: torch.Tensor, beta2: float) -> torch.Tensor:
    """FedAdam: v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2."""
    return beta2 * v + (1.0 - beta2) * delta**2


def yogi_second_moment(v: torch.Tensor, delta: torch.Tensor, beta2: float) -> torch.Tensor:
    """FedYogi: v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2) (additive, so v
    cannot collapse after one large step as Adam's can)."""
    sq = delta**2
    return v - (1.0 - beta2) * sq * torch.sign(v - sq)


def adagrad_second_moment(v: torch.Tensor, delta: torch.Tensor, beta2: float) -> torch.Tensor:
    """FedAdagrad: v_t = v_{t-1} + Delta_t^2 (beta2 unused)."""
    return v + delta**2


def adaptive_step(m: torch.Tensor, v: torch.Tensor, eta: float, tau: float) -> torch.Tensor:
    """eta m_t / (sqrt(v_t) + tau): the change to the global model."""
    return eta * m / (torch.sqrt(v) + tau)


# --------------------------------------------------------------------------- aggregators


class LossMean:
    """The sample-weighted mean of the clients' reported ``train_loss`` (None when none report it)."""

    def __init__(self) -> None:
        self._sum = 0.0
        self._weight = 0.0

    def add(self, update: ClientUpdate) -> None:
        loss = update.metrics.get("train_loss")
        if loss is not None:
            self._sum += float(update.num_samples) * float(loss)
            self._weight += float(update.num_samples)

    @property
    def value(self) -> float | None:
        return self._sum / self._weight if self._weight else None


Combine = Callable[[torch.Tensor, list[int]], torch.Tensor]


class IndividualUpdatesAggregator(Aggregator):
    """Keeps every accepted update, then combines them with ``combine(rows, num_samples)``.

    The robust rules (median, trimmed mean, Krum) are functions of the whole set of updates, so
    they cannot stream: server memory is O(clients x model) for the round, e.g. 10 updates of
    the 1.66 M-parameter CNN hold 66 MB (plus a float64 copy of the same size while combining)."""

    def __init__(self, numel: int, combine: Combine) -> None:
        self._numel = numel
        self._combine = combine
        self._deltas: list[torch.Tensor] = []
        self._samples: list[int] = []
        self._loss = LossMean()

    def add(self, update: ClientUpdate) -> None:
        check_update(update, self._numel)
        self._deltas.append(update.delta.detach().to(torch.float32).contiguous())
        self._samples.append(int(update.num_samples))
        self._loss.add(update)

    @property
    def num_updates(self) -> int:
        return len(self._deltas)

    def result(self) -> AggregateResult:
        rows = stack(self._deltas)
        delta = self._combine(rows, list(self._samples))
        return AggregateResult(delta=delta.to(torch.float32), total_weight=float(sum(self._samples)),
                               num_updates=len(self._deltas), train_loss=self._loss.value)
