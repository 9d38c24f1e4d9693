"""Strategies built from the configuration at the edge: the built-in ones by ``aggregation_method``,
a plug-in by ``custom_strategy`` (``package.module:Class`` or an entry point of ``fl_hub.strategies``).

Each strategy gets the configuration keys its constructor names (``fl_common.plugins.config_kwargs``),
built-in or not, so the path a plug-in takes is the one every run takes.
"""

from __future__ import annotations

from fl_common.config import ConfigError, FLConfig
from fl_common.plugins import CUSTOM, STRATEGY_GROUP, PluginError, configured_class, instantiate
from fl_server.strategies.adaptive import FedAdagrad, FedAdam, FedYogi
from fl_server.strategies.base import Strategy
from fl_server.strategies.fedavg import FedAvg
from fl_server.strategies.fedavgm import FedAvgM
from fl_server.strategies.fedprox import FedProx
from fl_server.strategies.qfedavg import QFedAvg
from fl_server.strategies.robust import Krum, Median, MultiKrum, TrimmedMean
from fl_server.strategies.scaffold import Scaffold

__all__ = ["CUSTOM", "STRATEGIES", "build_strategy", "strategy_class", "strategy_label"]

#: the ``aggregation_method`` that names a plug-in through ``custom_strategy``

#: The built-in strategies by name; fl_common/config/schema.py's AGGREGATION_METHODS lists exactly
#: these plus "custom" (a test checks it).
STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, QFedAvg, Scaffold, Median, TrimmedMean, Krum, MultiKrum)
}


def strategy_label(cfg: FLConfig) -> str:
    """How messages name the configured strategy: by the key that chose it."""
    if cfg.aggregation_method == CUSTOM:
        return f"custom_strategy '{cfg.custom_strategy}'"
    return f"aggregation_method '{cfg.aggregation_method}'"


def _what(cfg: FLConfig) -> str:
    if cfg.aggregation_method == CUSTOM:
        return f"config key 'custom_strategy' ({cfg.custom_strategy!r})"
    return f"aggregation_method '{cfg.aggregation_method}'"


def strategy_class(cfg: FLConfig) -> type[Strategy]:
    """The configured strategy's class; a plug-in is imported and checked here (ConfigError, one line)."""
    try:
        return configured_class("aggregation_method", cfg.aggregation_method, STRATEGIES, custom_key="custom_strategy",
                                custom_value=cfg.custom_strategy, base=Strategy, group=STRATEGY_GROUP)
    except PluginError as exc:
        raise ConfigError(str(exc)) from None


def build_strategy(cfg: FLConfig) -> Strategy:
    """The configured strategy, given the configuration keys its constructor names."""
    cls = strategy_class(cfg)
    try:
        return instantiate(cls, cfg, what=_what(cfg))
    except PluginError as exc:
        raise ConfigError(str(exc)) from None
