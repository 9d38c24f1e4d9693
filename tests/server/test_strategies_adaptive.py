"""FedAvgM, FedAdam, FedYogi and FedAdagrad against steps computed by hand (Reddi et al. 2021, Algorithm 2)."""

from __future__ import annotations

import math

import pytest
import torch

from fl_common.config import config_from_dict
from fl_common.protocol import ClientUpdate
from fl_common.tensors import ParamSpec
from fl_common.tensors.flat import ParamEntry
from fl_server.coordinator import Coordinator
from fl_server.strategies import build_strategy
from fl_server.strategies.base import AggregateResult

OFF = {"differential_privacy": False, "secure_aggregation": False}


def _agg(values: list[float]) -> AggregateResult:
    return AggregateResult(delta=torch.tensor(values, dtype=torch.float32), total_weight=1.0, num_updates=1, train_loss=None)


def _strategy(method: str, **keys: float):
    return build_strategy(config_from_dict({"aggregation_method": method, **OFF, **keys}))


def test_fedavgm_accumulates_server_momentum() -> None:
    s = _strategy("fedavgm", server_momentum=0.5, server_learning_rate=1.0)
    x = torch.tensor([1.0, 1.0])
    x = s.apply(x, _agg([1.0, 2.0]))  # v = [1, 2]
    assert torch.allclose(x, torch.tensor([2.0, 3.0]))
    x = s.apply(x, _agg([1.0, 0.0]))  # v = 0.5 [1, 2] + [1, 0] = [1.5, 1]
    assert torch.allclose(x, torch.tensor([3.5, 4.0]))


def test_fedavgm_with_zero_momentum_is_fedavg() -> None:
    s = _strategy("fedavgm", server_momentum=0.0, server_learning_rate=0.5)
    x = s.apply(torch.zeros(2), _agg([2.0, -2.0]))
    x = s.apply(x, _agg([2.0, 4.0]))
    assert torch.allclose(x, torch.tensor([2.0, 1.0]))


BETA1, BETA2, TAU, ETA = 0.9, 0.99, 0.1, 0.5


def _adaptive(method: str):
    return _strategy(method, server_beta1=BETA1, server_beta2=BETA2, server_tau=TAU, server_learning_rate=ETA)


def _expected_step(m: list[float], v: list[float]) -> torch.Tensor:
    return torch.tensor([ETA * mi / (math.sqrt(vi) + TAU) for mi, vi in zip(m, v, strict=False)])


def test_fedadam_one_step_by_hand() -> None:
    s = _adaptive("fedadam")
    x = s.apply(torch.zeros(3), _agg([1.0, -2.0, 0.0]))
    # m = 0.1 Delta; v_{-1} = tau^2 = 0.01, v = 0.99 * 0.01 + 0.01 * Delta^2
    m = [0.1, -0.2, 0.0]
    v = [0.0099 + 0.01, 0.0099 + 0.04, 0.0099]
    assert torch.allclose(x, _expected_step(m, v), atol=1e-6)


def test_fedyogi_two_steps_by_hand() -> None:
    s = _adaptive("fedyogi")
    x = s.apply(torch.zeros(3), _agg([1.0, -2.0, 0.0]))
    # v = v0 - 0.01 Delta^2 sign(v0 - Delta^2), v0 = 0.01: signs (-, -, +) on Delta^2 = (1, 4, 0)
    m1 = [0.1, -0.2, 0.0]
    v1 = [0.02, 0.05, 0.01]
    assert torch.allclose(x, _expected_step(m1, v1), atol=1e-6)
    x2 = s.apply(x, _agg([0.0, 0.5, 0.0]))
    # Delta^2 = (0, 0.25, 0): signs of v1 - Delta^2 are (+, -, +)
    m2 = [0.9 * 0.1, 0.9 * -0.2 + 0.1 * 0.5, 0.0]
    v2 = [0.02, 0.05 + 0.01 * 0.25, 0.01]
    assert torch.allclose(x2 - x, _expected_step(m2, v2), atol=1e-6)


def test_fedyogi_differs_from_fedadam_where_adam_forgets() -> None:
    yogi, adam = _adaptive("fedyogi"), _adaptive("fedadam")
    for s in (yogi, adam):
        s.apply(torch.zeros(1), _agg([3.0]))
        s.apply(torch.zeros(1), _agg([0.0]))
    # Adam decays v multiplicatively; Yogi only moves it by (1 - beta2) Delta^2 = 0 here
    assert float(yogi.v[0]) == pytest.approx(0.01 + 0.01 * 9.0)
    assert float(adam.v[0]) == pytest.approx(0.99 * (0.99 * 0.01 + 0.01 * 9.0))


def test_fedadagrad_one_step_by_hand() -> None:
    s = _adaptive("fedadagrad")
    x = s.apply(torch.zeros(3), _agg([1.0, -2.0, 0.0]))
    m = [0.1, -0.2, 0.0]
    v = [0.01 + 1.0, 0.01 + 4.0, 0.01]
    assert torch.allclose(x, _expected_step(m, v), atol=1e-6)


@pytest.mark.parametrize("method", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_server_state_survives_a_checkpoint_exactly(method: str) -> None:
    deltas = [[1.0, -2.0, 0.5], [0.5, 0.25, -1.0], [-1.0, 1.0, 2.0]]
    straight = _adaptive(method)
    x = torch.zeros(3)
    for d in deltas:
        x = straight.apply(x, _agg(d))
    first = _adaptive(method)
    y = first.apply(torch.zeros(3), _agg(deltas[0]))
    state = first.state_dict()
    assert state, "momenta must be checkpointed"
    resumed = _adaptive(method)
    resumed.load_state_dict(state)
    for d in deltas[1:]:
        y = resumed.apply(y, _agg(d))
    assert torch.equal(x, y)


def test_coordinator_checkpoint_carries_the_moments() -> None:
    cfg = config_from_dict({"aggregation_method": "fedyogi", "num_clients": 2, "client_selection_ratio": 1.0,
                            "server_learning_rate": 0.1, **OFF})
    spec = ParamSpec((ParamEntry("w", (3,), "float32"),))

    def one_round(coord: Coordinator, values: list[float]) -> None:
        plan = coord.plan_round([0, 1])
        for cid in plan.selected:
            coord.submit(ClientUpdate(cid, plan.round, torch.tensor(values), 10))
        coord.close_round()

    a = Coordinator(cfg, torch.zeros(3), spec)
    for v in ([1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]):
        one_round(a, v)
    b = Coordinator(cfg, torch.zeros(3), spec)
    one_round(b, [1.0, 2.0, 3.0])
    c = Coordinator(cfg, torch.zeros(3), spec)
    c.load_state_dict(b.state_dict())
    one_round(c, [-1.0, 0.5, 0.0])
    assert torch.equal(a.global_vector, c.global_vector)
