"""FedAvg and FedProx against hand-computed results, and the update checks every strategy relies on."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from fl_common.config import FLConfig, config_from_dict
from fl_common.config.schema import AGGREGATION_METHODS
from fl_common.protocol import ClientUpdate, TrainInstructions
from fl_server.strategies import STRATEGIES, UpdateRejected, build_strategy

OFF = {"differential_privacy": False, "secure_aggregation": False}


def _u(cid: int, values: list[float], n: int, loss: float = 1.0) -> ClientUpdate:
    return ClientUpdate(cid, 1, torch.tensor(values, dtype=torch.float32), n, {"train_loss": loss})


def test_config_choices_match_the_strategy_registry() -> None:
    assert set(AGGREGATION_METHODS) == set(STRATEGIES) | {"custom"}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_each_strategy_takes_config_keys_with_the_schemas_defaults(name: str) -> None:
    """Constructor parameters are named after config keys (the factory passes exactly those) and
    default to the schema's defaults, so a strategy built by hand behaves as one built from a config."""
    defaults = {f.name: f.default for f in dataclasses.fields(FLConfig)}
    params = inspect.signature(STRATEGIES[name]).parameters.values()
    assert params and all(p.kind is p.KEYWORD_ONLY for p in params)
    assert {p.name: p.default for p in params} == {p.name: defaults[p.name] for p in params}


def test_fedavg_is_the_sample_weighted_mean() -> None:
    strategy = build_strategy(config_from_dict({"aggregation_method": "fedavg", **OFF}))
    global_vec = torch.tensor([1.0, -1.0, 0.5])
    agg = strategy.new_aggregator(1, global_vec)
    agg.add(_u(0, [1.0, 2.0, 3.0], 10, loss=2.0))
    agg.add(_u(1, [-2.0, 0.0, 1.0], 30, loss=1.0))
    agg.add(_u(2, [0.0, 4.0, -1.0], 60, loss=0.5))
    result = agg.result()
    # by hand: (10*[1,2,3] + 30*[-2,0,1] + 60*[0,4,-1]) / 100 = [-0.5, 2.6, 0.0]
    assert torch.allclose(result.delta, torch.tensor([-0.5, 2.6, 0.0]), atol=1e-6)
    assert result.total_weight == 100 and result.num_updates == 3
    assert result.train_loss == pytest.approx((10 * 2.0 + 30 * 1.0 + 60 * 0.5) / 100)
    assert torch.allclose(strategy.apply(global_vec, result), torch.tensor([0.5, 1.6, 0.5]), atol=1e-6)


def test_server_learning_rate_scales_the_step() -> None:
    strategy = build_strategy(config_from_dict({"server_learning_rate": 0.5, **OFF}))
    agg = strategy.new_aggregator(1, torch.zeros(2))
    agg.add(_u(0, [2.0, -2.0], 5))
    assert torch.allclose(strategy.apply(torch.zeros(2), agg.result()), torch.tensor([1.0, -1.0]))


def test_fedprox_sends_mu_and_fedavg_does_not() -> None:
    base = TrainInstructions(round=1, epochs=1, batch_size=32, learning_rate=0.1)
    prox = build_strategy(config_from_dict({"aggregation_method": "fedprox", "proximal_mu": 0.3, **OFF}))
    avg = build_strategy(config_from_dict({"aggregation_method": "fedavg", "proximal_mu": 0.3, **OFF}))
    assert prox.configure_client(base, 4).proximal_mu == 0.3
    assert avg.configure_client(base, 4).proximal_mu == 0.0


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        (ClientUpdate(0, 1, torch.zeros(4), 5), "bad_shape"),
        (ClientUpdate(0, 1, torch.tensor([0.0, float("nan"), 0.0]), 5), "not_finite"),
        (ClientUpdate(0, 1, torch.tensor([0.0, float("inf"), 0.0]), 5), "not_finite"),
        (ClientUpdate(0, 1, torch.zeros(3), 0), "bad_weight"),
    ],
)
def test_bad_updates_never_touch_the_aggregate(update: ClientUpdate, reason: str) -> None:
    agg = build_strategy(config_from_dict(OFF)).new_aggregator(1, torch.zeros(3))
    agg.add(_u(1, [1.0, 1.0, 1.0], 2))
    with pytest.raises(UpdateRejected) as err:
        agg.add(update)
    assert err.value.reason == reason
    assert agg.num_updates == 1
    assert torch.equal(agg.result().delta, torch.ones(3))
