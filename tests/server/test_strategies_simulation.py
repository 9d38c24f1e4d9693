"""Every strategy in the real Simulation (synthetic data, small MLP), the simulated attack, and the
driver-only features the REST server must refuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fl_common.config import ConfigError, config_from_dict, replace_config
from fl_common.protocol import ClientUpdate
from fl_common.tensors import ParamSpec
from fl_common.tensors.flat import ParamEntry
from fl_server.coordinator import Coordinator
from fl_server.simulation import Simulation
from fl_server.simulation.attacks import attacker_ids, make_attack
from fl_server.strategies import STRATEGIES

BASE = {"dataset": "synthetic", "model_type": "mlp", "hidden_size": 64, "num_clients": 10, "client_selection_ratio": 0.5,
        "num_rounds": 2, "local_epochs": 1, "batch_size": 32, "learning_rate": 0.05, "max_train_samples": 1000,
        "max_test_samples": 500, "differential_privacy": False, "secure_aggregation": False, "compression": False,
        "seed": 3, "workers": 0}
#: what each strategy needs beyond BASE to be a valid configuration
EXTRA = {"fedadam": {"server_learning_rate": 0.01}, "fedyogi": {"server_learning_rate": 0.01},
         "fedadagrad": {"server_learning_rate": 0.01}, "krum": {"min_clients": 5}, "multikrum": {"min_clients": 5}}


@pytest.mark.parametrize("method", sorted(set(STRATEGIES) - {"fedavg", "fedprox"}))
def test_each_strategy_runs_two_rounds_in_the_simulation(method: str, tmp_path: Path) -> None:
    with Simulation({**BASE, "aggregation_method": method, **EXTRA.get(method, {})}, tmp_path / method,
                    progress=False) as sim:
        history = sim.train()
        assert torch.isfinite(sim.coordinator.global_vector).all()
        sim.save_results()
    assert [r.round for r in history] == [1, 2]
    assert all(r.clients == 5 and r.test_accuracy is not None and r.train_loss is not None for r in history)
    assert (tmp_path / method / "checkpoint.pt").is_file()


def test_qfedavg_at_q0_follows_fedavg_with_equal_client_sizes() -> None:
    # IID split of 1000 samples over 10 clients: 100 each, so FedAvg's weights are equal too
    with Simulation({**BASE, "aggregation_method": "fedavg"}, progress=False) as a:
        a.train()
        assert len({len(p) for p in a.partitions}) == 1
        wa = a.coordinator.global_vector.clone()
    with Simulation({**BASE, "aggregation_method": "qfedavg", "qffl_q": 0.0}, progress=False) as b:
        b.train()
        wb = b.coordinator.global_vector.clone()
    assert torch.allclose(wa, wb, atol=1e-6)


def test_summary_reports_the_worst_clients_accuracy(tmp_path: Path) -> None:
    cfg = {**BASE, "aggregation_method": "qfedavg", "data_distribution": "dirichlet", "non_iid_alpha": 0.5}
    with Simulation(cfg, tmp_path / "q", progress=False) as sim:
        sim.train()
        summary = sim.save_results()
        accs = sorted(r["accuracy"] for r in sim.evaluate_clients())
    fair = summary["client_accuracy"]
    assert fair["clients"] == 10 and fair["worst_10pct"] == pytest.approx(accs[0])  # 10 % of 10 clients = 1
    assert fair["min"] <= fair["worst_10pct"] <= fair["mean"] <= fair["max"]
    assert json.loads((tmp_path / "q" / "summary.json").read_text())["client_accuracy"] == pytest.approx(fair)


def test_adaptive_server_optimizer_resumes_exactly(tmp_path: Path) -> None:
    cfg = {**BASE, "aggregation_method": "fedyogi", "server_learning_rate": 0.01, "num_rounds": 3}
    with Simulation(cfg, tmp_path / "full", progress=False) as full:
        full.train()
        want = full.coordinator.global_vector.clone()
    with Simulation(cfg, tmp_path / "cut", progress=False) as first:
        first.train(rounds=1)
    with Simulation(cfg, tmp_path / "cut", resume=True, progress=False) as second:
        second.train()
        assert torch.equal(second.coordinator.global_vector, want)


# --------------------------------------------------------------------------- attacks


def test_attackers_are_a_fixed_seeded_subset() -> None:
    cfg = config_from_dict({**BASE, "attack": "gaussian_noise", "attack_fraction": 0.2})
    a = attacker_ids(cfg)
    assert len(a) == 2 and a == attacker_ids(cfg) and a <= set(range(10))
    assert len(attacker_ids(replace_config(cfg, seed=4))) == 2
    assert attacker_ids(replace_config(cfg, attack="none")) == frozenset()


def test_only_attackers_send_noise_and_it_is_reproducible() -> None:
    cfg = config_from_dict({**BASE, "attack": "gaussian_noise", "attack_fraction": 0.3, "attack_noise_std": 2.0})
    attack = make_attack(cfg)
    assert attack is not None
    bad = next(iter(attack.attackers))
    good = next(c for c in range(10) if c not in attack.attackers)
    honest = ClientUpdate(good, 4, torch.ones(1000), 10)
    assert not attack.apply(honest) and torch.equal(honest.delta, torch.ones(1000))
    u1, u2 = ClientUpdate(bad, 4, torch.ones(1000), 10), ClientUpdate(bad, 4, torch.zeros(1000), 10)
    assert attack.apply(u1) and attack.apply(u2)
    assert torch.equal(u1.delta, u2.delta)  # depends on (seed, round, client) only
    assert float(u1.delta.std()) == pytest.approx(2.0, rel=0.1)


def test_median_resists_the_attack_that_breaks_fedavg() -> None:
    attacked = {**BASE, "num_rounds": 3, "attack": "gaussian_noise", "attack_fraction": 0.2, "attack_noise_std": 1.0}
    results = {}
    for method in ("fedavg", "median"):
        with Simulation({**attacked, "aggregation_method": method}, progress=False) as sim:
            results[method] = sim.train()[-1].test_accuracy
        with Simulation({**BASE, "num_rounds": 3, "aggregation_method": method}, progress=False) as clean:
            results[method + "_clean"] = clean.train()[-1].test_accuracy
    assert results["median"] >= results["median_clean"] - 0.05, results
    assert results["fedavg"] < results["fedavg_clean"] - 0.05, results


def test_the_summary_counts_the_attackers_each_round_held() -> None:
    cfg = {**BASE, "num_rounds": 4, "aggregation_method": "median", "attack": "gaussian_noise", "attack_fraction": 0.3}
    with Simulation(cfg, progress=False) as sim:
        sim.train()
        block = sim.summary()["attack"]
        attackers = attacker_ids(sim.cfg)
        arrived = [(r, c) for r, c, _, got, _ in sim.coordinator.participation.rows if got]
    assert block["attackers"] == sorted(attackers) and len(attackers) == 3
    per_round = {r: sum(1 for rr, c in arrived if rr == r and c in attackers) for r in range(1, 5)}
    expected: dict[str, int] = {}
    for count in per_round.values():
        expected[str(count)] = expected.get(str(count), 0) + 1
    assert block["rounds_by_attackers"] == dict(sorted(expected.items())) and sum(expected.values()) == 4
    assert block["max_attackers_in_a_round"] == max(per_round.values())
    assert per_round[block["first_round_with_max"]] == max(per_round.values())
    assert all(per_round[r] < max(per_round.values()) for r in range(1, block["first_round_with_max"]))


def test_attack_with_no_attacker_is_refused() -> None:
    with pytest.raises(ConfigError, match="0 attackers"):
        config_from_dict({**BASE, "attack": "gaussian_noise", "attack_fraction": 0.01})


def test_a_driver_without_attacks_refuses_them() -> None:
    cfg = config_from_dict({**BASE, "attack": "gaussian_noise"})
    spec = ParamSpec((ParamEntry("w", (2,), "float32"),))
    with pytest.raises(ConfigError, match="simulated attacks exist only in the simulation"):
        Coordinator(cfg, torch.zeros(2), spec)  # as the REST server builds it
