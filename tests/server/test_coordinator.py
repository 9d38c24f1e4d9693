"""The round state machine: selection is seeded by round, updates are checked, rounds close cleanly."""

from __future__ import annotations

import pytest
import torch

from fl_common.config import config_from_dict
from fl_common.protocol import ClientUpdate
from fl_common.tensors import spec_of
from fl_common.training import EvalResult
from fl_server.coordinator import Coordinator
from fl_server.strategies import UpdateRejected

OFF = {"differential_privacy": False, "secure_aggregation": False}


def _coordinator(**cfg) -> Coordinator:
    state = {"w": torch.zeros(4)}
    config = config_from_dict({"num_clients": 20, "client_selection_ratio": 0.25, "num_rounds": 3, **OFF, **cfg})
    return Coordinator(config, torch.zeros(4), spec_of(state), evaluator=lambda v: EvalResult(float(v.sum()), 0.5, 10))


def test_selection_is_a_function_of_seed_and_round() -> None:
    a, b = _coordinator(seed=1), _coordinator(seed=1)
    plan_a, plan_b = a.plan_round(list(range(20))), b.plan_round(list(range(20)))
    assert plan_a.selected == plan_b.selected and len(plan_a.selected) == 5
    assert len(set(plan_a.selected)) == 5
    c = _coordinator(seed=2)
    assert c.plan_round(list(range(20))).selected != plan_a.selected
    seeds = {i.seed for i in plan_a.instructions.values()}
    assert len(seeds) == 5, "each client trains with its own derived seed"


def test_round_lifecycle_and_rejections() -> None:
    coord = _coordinator()
    plan = coord.plan_round(list(range(20)))
    chosen = plan.selected[0]
    outsider = next(c for c in range(20) if c not in plan.selected)
    with pytest.raises(UpdateRejected) as e:
        coord.submit(ClientUpdate(outsider, 1, torch.ones(4), 3))
    assert e.value.reason == "not_selected"
    with pytest.raises(UpdateRejected) as e:
        coord.submit(ClientUpdate(chosen, 2, torch.ones(4), 3))
    assert e.value.reason == "wrong_round"
    coord.submit(ClientUpdate(chosen, 1, torch.ones(4), 3))
    with pytest.raises(UpdateRejected) as e:
        coord.submit(ClientUpdate(chosen, 1, torch.ones(4), 3))
    assert e.value.reason == "duplicate"
    with pytest.raises(RuntimeError, match="still open"):
        coord.plan_round(list(range(20)))
    record = coord.close_round()
    assert record.round == 1 and record.clients == 1
    assert torch.equal(coord.global_vector, torch.ones(4))
    assert record.test_loss == 4.0  # the evaluator saw the new global model


def test_min_clients_blocks_an_empty_close_and_finished_runs_stop() -> None:
    coord = _coordinator(num_rounds=1)
    coord.plan_round(list(range(20)))
    with pytest.raises(RuntimeError, match="fewer than min_clients"):
        coord.close_round()
    coord.abort_round()
    plan = coord.plan_round(list(range(20)))
    coord.submit(ClientUpdate(plan.selected[0], 1, torch.ones(4), 1))
    coord.close_round()
    assert coord.finished
    with pytest.raises(RuntimeError, match="finished"):
        coord.plan_round(list(range(20)))


def test_state_dict_round_trip() -> None:
    coord = _coordinator()
    plan = coord.plan_round(list(range(20)))
    coord.submit(ClientUpdate(plan.selected[0], 1, torch.full((4,), 2.0), 1))
    coord.close_round()
    other = _coordinator()
    other.load_state_dict(coord.state_dict())
    assert other.completed_rounds == 1 and torch.equal(other.global_vector, coord.global_vector)
    assert other.plan_round(list(range(20))).selected == coord.plan_round(list(range(20))).selected
