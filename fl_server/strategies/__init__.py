"""Aggregation strategies, one module each, looked up by ``aggregation_method``."""

from __future__ import annotations

from fl_common.config import FLConfig
from fl_server.strategies.base import AggregateResult, Aggregator, Strategy, UpdateRejected, WeightedMeanAggregator
from fl_server.strategies.fedavg import FedAvg
from fl_server.strategies.fedprox import FedProx

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, FedProx)}


def make_strategy(cfg: FLConfig) -> Strategy:
    try:
        return STRATEGIES[cfg.aggregation_method](cfg)
    except KeyError:
        raise ValueError(f"unknown aggregation_method {cfg.aggregation_method!r}: allowed {', '.join(STRATEGIES)}") from None


__all__ = ["AggregateResult", "Aggregator", "Strategy", "UpdateRejected", "WeightedMeanAggregator",
           "FedAvg", "FedProx", "STRATEGIES", "make_strategy"]
