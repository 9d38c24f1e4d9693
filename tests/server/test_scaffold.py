"""SCAFFOLD (Karimireddy et al. 2020, option II): the client's corrected steps and variate update on
a model small enough to compute by hand, the server's update, the refusals, and exact resume of the
simulation with the clients' variates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from fl_common.config import ConfigError, config_from_dict
from fl_common.protocol import ClientUpdate, TrainInstructions
from fl_common.tensors import ParamSpec
from fl_common.tensors.flat import ParamEntry
from fl_common.training import (
    ControlVariates,
    LocalTrainer,
    control_delta,
    updated_client_control,
)
from fl_server.coordinator import Coordinator
from fl_server.simulation import Simulation
from fl_server.simulation.client_state import ClientVariates
from fl_server.strategies import DRIVER_FEATURES, UpdateRejected, build_strategy, check_components
from fl_server.strategies.base import AggregateResult

OFF = {"differential_privacy": False, "secure_aggregation": False}
SIM = {"dataset": "synthetic", "model_type": "mlp", "hidden_size": 64, "num_clients": 6, "client_selection_ratio": 0.5,
       "num_rounds": 4, "local_epochs": 1, "batch_size": 16, "learning_rate": 0.1, "momentum": 0.0,
       "max_train_samples": 600, "max_test_samples": 300, "aggregation_method": "scaffold", "compression": False,
       "seed": 5, "workers": 0, **OFF}


# --------------------------------------------------------------------------- the client, by hand


def _reference(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor, ci: torch.Tensor,
               lr: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K full-batch steps of softmax regression with the corrected gradient g - c_i + c, in float64,
    with the gradient written out: d CE / d logits = (softmax - onehot) / B. Returns (y_i, mean raw g)."""
    w, b, x = w.double(), b.double(), x.reshape(len(x), -1).double()
    c, ci = c.double(), ci.double()
    nw = w.numel()
    onehot = torch.nn.functional.one_hot(y, w.shape[0]).double()
    grads = []
    for _ in range(steps):
        g_logits = (torch.softmax(x @ w.T + b, dim=1) - onehot) / len(x)
        g = torch.cat([(g_logits.T @ x).reshape(-1), g_logits.sum(0)])
        grads.append(g)
        corrected = g - ci + c
        w = w - lr * corrected[:nw].view_as(w)
        b = b - lr * corrected[nw:]
    return torch.cat([w.reshape(-1), b]), torch.stack(grads).mean(0)


def test_client_steps_and_variate_match_the_paper_by_hand() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    trainer = LocalTrainer(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 1, 2, 2, generator=gen)
    y = torch.randint(0, 3, (12,), generator=gen)
    global_vec = trainer.vector().clone()
    c = 0.1 * torch.randn(15, generator=gen)
    ci = 0.1 * torch.randn(15, generator=gen)
    lr, steps = 0.3, 4
    instr = TrainInstructions(round=1, epochs=steps, batch_size=12, learning_rate=lr, seed=9, scaffold=True)
    update = trainer.train(global_vec, x, y, instr, control=ControlVariates(server=c, client=ci))
    assert update.metrics["steps"] == steps

    w0, b0 = global_vec[:12].view(3, 4), global_vec[12:]
    y_ref, mean_grad = _reference(w0, b0, x, y, c, ci, lr, steps)
    assert torch.allclose(update.delta.double(), y_ref - global_vec.double(), atol=1e-6)
    # option II: c_i+ = c_i - c + (x - y_i) / (K lr), so Delta c_i = (x - y_i) / (K lr) - c
    ci_plus = ci.double() - c.double() + (global_vec.double() - y_ref) / (steps * lr)
    assert torch.allclose(update.control_delta.double(), ci_plus - ci.double(), atol=1e-5)
    assert torch.allclose(updated_client_control(ci, update.control_delta).double(), ci_plus, atol=1e-5)
    # ...which under plain SGD is exactly the mean raw gradient along the local trajectory
    assert torch.allclose(ci_plus, mean_grad, atol=1e-5)


def test_zero_variates_train_exactly_like_fedavg() -> None:
    torch.manual_seed(0)
    trainer = LocalTrainer(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 1, 2, 2, generator=gen), torch.randint(0, 3, (20,), generator=gen)
    w = trainer.vector().clone()
    base = {"round": 1, "epochs": 2, "batch_size": 8, "learning_rate": 0.1, "seed": 4}
    plain = trainer.train(w, x, y, TrainInstructions(**base))
    zero = ControlVariates(server=torch.zeros(15), client=torch.zeros(15))
    corrected = trainer.train(w, x, y, TrainInstructions(**base, scaffold=True), control=zero)
    assert torch.equal(plain.delta, corrected.delta)


def test_control_delta_formula_and_buffer_mask() -> None:
    c = torch.tensor([1.0, 2.0, 3.0])
    x = torch.tensor([0.0, 0.0, 5.0])
    y = torch.tensor([-1.0, 2.0, 5.0])
    # (x - y) / (K lr) - c with K = 2, lr = 0.25: (1, -2, 0) / 0.5 - c = (2 - 1, -4 - 2, 0 - 3)
    assert torch.allclose(control_delta(c, x, y, 2, 0.25), torch.tensor([1.0, -6.0, -3.0]))
    mask = torch.tensor([True, True, False])
    assert torch.allclose(control_delta(c, x, y, 2, 0.25, mask=mask), torch.tensor([1.0, -6.0, 0.0]))
    with pytest.raises(ValueError, match="at least one local step"):
        control_delta(c, x, y, 0, 0.1)


def test_buffers_get_no_variate() -> None:
    torch.manual_seed(0)
    trainer = LocalTrainer(nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)))
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 1, 2, 2, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    n = trainer.spec.numel
    instr = TrainInstructions(round=1, epochs=1, batch_size=8, learning_rate=0.1, scaffold=True)
    update = trainer.train(trainer.vector(), x, y, instr, control=ControlVariates(torch.zeros(n), torch.zeros(n)))
    offset = 0
    for e in trainer.spec.entries:
        part = update.control_delta[offset : offset + e.numel]
        if e.name.startswith("2.running") or e.name.endswith("num_batches_tracked"):
            assert torch.equal(part, torch.zeros_like(part)), e.name
        offset += e.numel
    assert float(update.control_delta.abs().sum()) > 0


@pytest.mark.parametrize(("instr", "control", "match"), [
    ({"scaffold": True}, None, "need control variates"),
    ({}, "zeros", "need SCAFFOLD instructions"),
    ({"scaffold": True, "momentum": 0.9}, "zeros", "plain SGD"),
    ({"scaffold": True, "optimizer": "adam"}, "zeros", "plain SGD"),
    ({"scaffold": True, "update_clip": 1.0}, "zeros", "client-level DP does not cover it"),
])
def test_trainer_refuses_inconsistent_scaffold_requests(instr: dict, control: str | None, match: str) -> None:
    trainer = LocalTrainer(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))
    cv = ControlVariates(torch.zeros(15), torch.zeros(15)) if control else None
    with pytest.raises(ValueError, match=match):
        trainer.train(trainer.vector(), torch.randn(8, 1, 2, 2), torch.zeros(8, dtype=torch.long),
                      TrainInstructions(round=1, epochs=1, batch_size=8, learning_rate=0.1, **instr), control=cv)


# --------------------------------------------------------------------------- the server, by hand


def test_server_update_by_hand() -> None:
    strategy = build_strategy(config_from_dict({"aggregation_method": "scaffold", "num_clients": 10, **OFF}))
    agg = strategy.new_aggregator(1, torch.zeros(2))
    assert torch.equal(strategy.server_control(), torch.zeros(2))
    agg.add(ClientUpdate(0, 1, torch.tensor([1.0, 2.0]), 10, {"train_loss": 1.0}, control_delta=torch.tensor([0.5, 0.0])))
    agg.add(ClientUpdate(1, 1, torch.tensor([3.0, -2.0]), 30, {"train_loss": 1.0}, control_delta=torch.tensor([-0.1, 0.4])))
    x = strategy.apply(torch.tensor([1.0, 1.0]), agg.result())
    # x + eta_g * unweighted mean(Delta y) = (1, 1) + (2, 0); c = 0 + |S|/N mean(Delta c) = 0.2 * (0.2, 0.2)
    assert torch.allclose(x, torch.tensor([3.0, 1.0]))
    assert torch.allclose(strategy.server_control(), torch.tensor([0.04, 0.04]))
    state = strategy.state_dict()
    again = build_strategy(config_from_dict({"aggregation_method": "scaffold", "num_clients": 10, **OFF}))
    again.load_state_dict(state)
    assert torch.equal(again.server_control(), strategy.server_control())


def test_server_learning_rate_scales_only_the_model_step() -> None:
    strategy = build_strategy(config_from_dict({"aggregation_method": "scaffold", "num_clients": 2,
                                               "server_learning_rate": 0.5, **OFF}))
    strategy.new_aggregator(1, torch.zeros(1))
    agg = AggregateResult(torch.tensor([2.0]), 1.0, 2, None, control_delta=torch.tensor([1.0]))
    assert torch.allclose(strategy.apply(torch.zeros(1), agg), torch.tensor([1.0]))
    assert torch.allclose(strategy.server_control(), torch.tensor([1.0]))  # |S|/N = 1


def test_an_update_without_a_variate_delta_is_refused() -> None:
    strategy = build_strategy(config_from_dict({"aggregation_method": "scaffold", **OFF}))
    agg = strategy.new_aggregator(1, torch.zeros(3))
    for bad in (None, torch.zeros(2)):
        with pytest.raises(UpdateRejected) as err:
            agg.add(ClientUpdate(0, 1, torch.zeros(3), 5, control_delta=bad))
        assert err.value.reason == "missing_control_delta"
    with pytest.raises(UpdateRejected) as err:
        agg.add(ClientUpdate(0, 1, torch.zeros(3), 5, control_delta=torch.tensor([0.0, float("nan"), 0.0])))
    assert err.value.reason == "not_finite"
    assert agg.num_updates == 0


def test_clients_are_told_to_run_scaffold() -> None:
    strategy = build_strategy(config_from_dict({"aggregation_method": "scaffold", **OFF}))
    instr = strategy.configure_client(TrainInstructions(round=1, epochs=1, batch_size=8, learning_rate=0.1, proximal_mu=0.3), 0)
    assert instr.scaffold and instr.proximal_mu == 0.0
    assert TrainInstructions.from_json({**instr.to_json(), "future_key": 1}).scaffold


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("keys", "match"), [
    ({"momentum": 0.9}, "needs plain local SGD .* momentum 0.9"),
    ({"optimizer": "adam"}, "needs plain local SGD .*'adam'"),
    ({"differential_privacy": True, "dp_mode": "client", "num_clients": 1000}, "neither clips nor noises"),
])
def test_configurations_scaffold_cannot_run_are_refused(keys: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_components(config_from_dict({"aggregation_method": "scaffold", **OFF, **keys}), DRIVER_FEATURES)


def test_a_driver_without_client_state_refuses_scaffold() -> None:
    cfg = config_from_dict({"aggregation_method": "scaffold", **OFF})
    spec = ParamSpec((ParamEntry("w", (2,), "float32"),))
    with pytest.raises(ConfigError, match="does not carry yet"):
        Coordinator(cfg, torch.zeros(2), spec)  # as the REST server builds it
    Coordinator(cfg, torch.zeros(2), spec, driver_features=("control_variates",))


# --------------------------------------------------------------------------- the simulation


def _all_variates(store: ClientVariates, n: int) -> torch.Tensor:
    return torch.stack([store.get(cid) for cid in range(n)])


def test_server_variate_stays_the_mean_of_all_client_variates() -> None:
    with Simulation(SIM, progress=False) as sim:
        sim.train()
        c = sim.coordinator.strategy.server_control()
        clients = _all_variates(sim._variates, SIM["num_clients"])
    assert float(clients.abs().sum()) > 0
    # c_0 = 0 = mean(c_i) and c += (1/N) sum_S Delta c_i keeps c = (1/N) sum_i c_i
    assert torch.allclose(c, clients.mean(0), atol=1e-6)


def test_resume_after_a_checkpoint_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    with Simulation(SIM, tmp_path / "full", progress=False) as full:
        full.train()
        want_x, want_c = full.coordinator.global_vector.clone(), full.coordinator.server_control.clone()
        want_ci = _all_variates(full._variates, SIM["num_clients"])
        want_hist = [(r.test_accuracy, r.test_loss, r.train_loss) for r in full.history]
    with Simulation(SIM, tmp_path / "cut", progress=False) as first:
        first.train(rounds=2)
    # a round interrupted after some clients wrote their new variates, before its checkpoint
    orphan = tmp_path / "cut" / "client_state" / "client0-round3.pt"
    torch.save(torch.full((want_x.numel(),), 7.0), orphan)
    with Simulation(SIM, tmp_path / "cut", resume=True, progress=False) as second:
        assert not orphan.exists()
        second.train()
        assert [(r.test_accuracy, r.test_loss, r.train_loss) for r in second.history] == want_hist
        assert torch.equal(second.coordinator.global_vector, want_x)
        assert torch.equal(second.coordinator.server_control, want_c)
        assert torch.equal(_all_variates(second._variates, SIM["num_clients"]), want_ci)
    # one file per client that has trained, the version the checkpoint names
    names = sorted(p.name for p in (tmp_path / "cut" / "client_state").iterdir())
    assert len(names) == len({n.split("-")[0] for n in names}) <= SIM["num_clients"]


def test_worker_pool_carries_the_variates_like_in_process_training() -> None:
    torch.set_num_threads(1)  # the single-threaded workers' arithmetic
    try:
        with Simulation({**SIM, "num_rounds": 3}, progress=False) as seq:
            a = seq.train()
            ca = seq.coordinator.server_control.clone()
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    with Simulation({**SIM, "num_rounds": 3, "workers": 2}, progress=False) as par:
        b = par.train()
        cb = par.coordinator.server_control.clone()
    assert [(r.test_accuracy, r.test_loss, r.train_loss) for r in a] == [(r.test_accuracy, r.test_loss, r.train_loss) for r in b]
    assert torch.equal(ca, cb)


def test_scaffold_counts_the_variate_traffic() -> None:
    with Simulation({**SIM, "num_rounds": 1}, progress=False) as sim:
        record = sim.train()[0]
        model_bytes = 4 * sim.spec.numel
    clients = record.clients
    # per client: model + c down, delta + Delta c up
    assert record.bytes == clients * 4 * model_bytes
