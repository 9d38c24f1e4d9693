"""Aggregation strategies, one module per family, built by ``build_strategy`` from the configuration.

``aggregation_method`` names a built-in strategy (``STRATEGIES``) or ``custom``, a plug-in named by
``custom_strategy`` (see ``factory`` and examples/plugins/). fl_common/config/schema.py's
AGGREGATION_METHODS must list exactly the built-in names plus ``custom`` (a test checks it). What a
strategy can be combined with is checked by ``check_strategy_features`` (``features``).
"""

from __future__ import annotations

from fl_server.strategies.adaptive import FedAdagrad, FedAdam, FedYogi
from fl_server.strategies.base import (
    AggregateResult,
    Aggregator,
    Strategy,
    UpdateRejected,
    WeightedMeanAggregator,
    check_update,
)
from fl_server.strategies.common import IndividualUpdatesAggregator
from fl_server.strategies.factory import STRATEGIES, build_strategy, strategy_class, strategy_label
from fl_server.strategies.features import DRIVER_FEATURES, check_components, check_strategy_features
from fl_server.strategies.fedavg import FedAvg
from fl_server.strategies.fedavgm import FedAvgM
from fl_server.strategies.fedprox import FedProx
from fl_server.strategies.qfedavg import QFedAvg
from fl_server.strategies.robust import Krum, Median, MultiKrum, TrimmedMean
from fl_server.strategies.scaffold import Scaffold

__all__ = [
    "DRIVER_FEATURES",
    "STRATEGIES",
    "AggregateResult",
    "Aggregator",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "IndividualUpdatesAggregator",
    "Krum",
    "Median",
    "MultiKrum",
    "QFedAvg",
    "Scaffold",
    "Strategy",
    "TrimmedMean",
    "UpdateRejected",
    "WeightedMeanAggregator",
    "build_strategy",
    "check_components",
    "check_strategy_features",
    "check_update",
    "strategy_class",
    "strategy_label",
]
