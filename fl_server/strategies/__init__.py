"""Aggregation strategies, one module per family, looked up by ``aggregation_method``.

fl_common/config/schema.py's AGGREGATION_METHODS must list exactly these names (a test checks it).
"""

from __future__ import annotations

from fl_common.config import FLConfig
from fl_server.strategies.adaptive import FedAdagrad, FedAdam, FedYogi
from fl_server.strategies.base import (
    AggregateResult,
    Aggregator,
    Strategy,
    UpdateRejected,
    WeightedMeanAggregator,
)
from fl_server.strategies.fedavg import FedAvg
from fl_server.strategies.fedavgm import FedAvgM
from fl_server.strategies.fedprox import FedProx
from fl_server.strategies.qfedavg import QFedAvg
from fl_server.strategies.robust import Krum, Median, MultiKrum, TrimmedMean
from fl_server.strategies.scaffold import Scaffold

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, QFedAvg, Scaffold, Median, TrimmedMean, Krum, MultiKrum)
}


def make_strategy(cfg: FLConfig) -> Strategy:
    try:
        return STRATEGIES[cfg.aggregation_method](cfg)
    except KeyError:
        raise ValueError(f"unknown aggregation_method {cfg.aggregation_method!r}: allowed {', '.join(STRATEGIES)}") from None


__all__ = [
    "STRATEGIES",
    "AggregateResult",
    "Aggregator",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "Krum",
    "Median",
    "MultiKrum",
    "QFedAvg",
    "Scaffold",
    "Strategy",
    "TrimmedMean",
    "UpdateRejected",
    "WeightedMeanAggregator",
    "make_strategy",
]
