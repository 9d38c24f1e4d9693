"""Differential privacy through the coordinator and the simulation: calibration, clipping, the
server's noise, the budget stop, the ledger in history.csv, and resumption."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from fl_common.config import ConfigError, config_from_dict
from fl_common.privacy import make_accountant
from fl_common.privacy.client_dp import sample_level_schedule
from fl_common.protocol import ClientUpdate
from fl_common.tensors import spec_of
from fl_server.coordinator import Coordinator, RoundPlan
from fl_server.privacy import BudgetExhausted
from fl_server.simulation import Simulation
from fl_server.strategies import UpdateRejected

DELTA = 1e-5


def _coordinator(numel: int = 4, client_sizes: dict | None = None, **cfg) -> Coordinator:
    config = config_from_dict({"num_clients": 20, "client_selection_ratio": 0.25, "num_rounds": 10, "differential_privacy": True,
                               "secure_aggregation": False, "dp_mode": "client", "dp_accountant": "rdp", "dp_delta": DELTA, **cfg})
    return Coordinator(config, torch.zeros(numel), spec_of({"w": torch.zeros(numel)}), client_sizes=client_sizes,
                       privacy_seeded_noise=True)


def _zero_round(coord: Coordinator, submit: int | None = None) -> RoundPlan:
    """Plans a round and submits zero updates (with the DP metrics a real client reports)."""
    plan = coord.plan_round(list(range(coord.cfg.num_clients)))
    for cid in plan.selected[:submit]:
        instr = plan.instructions[cid]
        metrics = {"dp_sample_rate": instr.dp_sample_rate, "dp_steps": float(instr.dp_steps)} if instr.dp_sample_level else {}
        coord.submit(ClientUpdate(cid, plan.round, torch.zeros(coord.spec.numel), 10, metrics))
    coord.close_round()
    return plan


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _dp_sim_config(small_config: dict, **over) -> dict:
    # the MLP keeps per-sample gradients cheap; a larger learning rate offsets DP-SGD's noise
    return {**small_config, "model_type": "mlp", "differential_privacy": True, "dp_accountant": "rdp", "workers": 0,
            "learning_rate": 0.1, **over}


# --------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_client_level_calibration_round_trip(accountant: str) -> None:
    coord = _coordinator(num_clients=100, client_selection_ratio=0.1, num_rounds=20, dp_epsilon=2.0, dp_accountant=accountant)
    z = coord.privacy.noise_multiplier
    eps = make_accountant(accountant, [(z, 0.1, 20)]).epsilon(DELTA)
    assert 0.99 * 2.0 <= eps <= 2.0
    assert coord.privacy.expected_epsilon == pytest.approx(eps, rel=1e-12)
    if accountant == "rdp":  # run every round: what was spent is what calibration promised, and it all fits
        for _ in range(20):
            _zero_round(coord)
        assert coord.finished and coord.stop_reason is None
        assert coord.privacy.epsilon_spent() == pytest.approx(eps, rel=1e-9)
        assert [r.epsilon for r in coord.history] == [rec.epsilon for rec in coord.privacy.ledger.records]


def test_uniform_sample_level_calibration_covers_the_worst_client() -> None:
    sizes = {0: 40, 1: 75, 2: 120, 3: 300, 4: 1000, 5: 64, 6: 500, 7: 90}
    coord = _coordinator(client_sizes=sizes, num_clients=8, client_selection_ratio=0.5, num_rounds=10, dp_mode="sample",
                         dp_epsilon=3.0, batch_size=16, local_epochs=2, dp_noise_calibration="uniform")
    engine = coord.privacy
    planned = math.ceil(10 * 4 / 8)
    assert engine.planned_rounds == planned == 5
    eps = {cid: make_accountant("rdp", [(engine.noise_multiplier, q, s * planned)]).epsilon(DELTA)
           for cid, (q, s) in ((c, sample_level_schedule(n, 16, 2)) for c, n in sizes.items())}
    assert max(eps.values()) <= 3.0 and max(eps.values()) >= 0.99 * 3.0
    assert engine.expected_epsilon == pytest.approx(max(eps.values()), rel=1e-12)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_per_client_calibration_gives_every_client_the_budget_for_its_own_q_and_steps(accountant: str) -> None:
    sizes = {0: 40, 1: 75, 2: 120, 3: 300, 4: 1000, 5: 64, 6: 500, 7: 90}
    coord = _coordinator(client_sizes=sizes, num_clients=8, client_selection_ratio=0.5, num_rounds=10, dp_mode="sample",
                         dp_epsilon=3.0, batch_size=16, local_epochs=2, dp_accountant=accountant)
    engine = coord.privacy
    assert engine.calibration == "per_client" and engine.planned_rounds == 5
    uniform = _coordinator(client_sizes=sizes, num_clients=8, client_selection_ratio=0.5, num_rounds=10, dp_mode="sample",
                           dp_epsilon=3.0, batch_size=16, local_epochs=2, dp_accountant=accountant,
                           dp_noise_calibration="uniform").privacy.noise_multiplier
    sigmas = {cid: engine.client_noise_multiplier(cid) for cid in sizes}
    for cid, n in sizes.items():  # each client, alone, spends the budget (within the 1 % tolerance) over 5 rounds
        q, s = sample_level_schedule(n, 16, 2)
        eps = make_accountant(accountant, [(sigmas[cid], q, 5 * s)]).epsilon(DELTA)
        assert 0.99 * 3.0 <= eps <= 3.0, (n, sigmas[cid], eps)
        assert sigmas[cid] <= uniform * (1 + 1e-9), "no client needs more noise than the worst-off client"
    assert sigmas[4] < 0.7 * sigmas[0], "the 1000-record shard (q = 0.016) takes far less noise than the 40-record one"
    assert engine.noise_multiplier == max(sigmas.values()) == pytest.approx(uniform, rel=0.02)
    # what a selected client is told, and charged, is its own sigma
    plan = _zero_round(coord)
    for cid in plan.selected:
        assert plan.instructions[cid].dp_noise_multiplier == sigmas[cid]
        assert engine.client_records[cid][-1][1] == sigmas[cid]
    # a checkpoint keeps the per-size table; a fresh engine restored from it uses the same noise
    state = json.loads(json.dumps(engine.state_dict()))
    fresh = _coordinator(client_sizes=sizes, num_clients=8, client_selection_ratio=0.5, num_rounds=10, dp_mode="sample",
                         dp_epsilon=3.0, batch_size=16, local_epochs=2, dp_accountant=accountant).privacy
    fresh.load_state_dict(state)
    assert fresh.sigma_by_size == engine.sigma_by_size and fresh.epsilon_spent() == engine.epsilon_spent()
    summary = engine.summary()
    assert summary["noise_calibration"] == "per_client"
    assert dict(summary["noise_multiplier_by_size"]) == {sizes[c]: sigmas[c] for c in sizes}


def test_a_uniform_checkpoint_resumes_with_one_sigma() -> None:
    """A checkpoint written before per-client calibration existed (no table) keeps its single σ."""
    sizes = dict(enumerate([40, 300, 1000, 90]))
    kw = dict(client_sizes=sizes, num_clients=4, client_selection_ratio=0.5, num_rounds=10, dp_mode="sample", dp_epsilon=3.0,
              batch_size=16)
    coord = _coordinator(**kw, dp_noise_calibration="uniform")
    _zero_round(coord)
    old = coord.privacy
    state = old.state_dict()
    del state["noise_calibration"], state["sigma_by_size"]
    engine = _coordinator(**kw).privacy
    engine.load_state_dict(state)
    assert engine.calibration == "uniform" and engine.client_records == old.client_records
    assert {engine.client_noise_multiplier(c) for c in sizes} == {old.noise_multiplier}
    assert engine.epsilon_spent() == old.epsilon_spent() > 0


def test_delta_must_be_below_one_over_the_records_and_models_must_suit_dp_sgd(small_config: dict) -> None:
    with pytest.raises(ConfigError, match=r"'dp_delta' has value 0.0001: it must be below 1/20000 = 5e-05 for 20000 training"):
        _coordinator(client_sizes=dict.fromkeys(range(20), 1000), dp_mode="sample", dp_delta=1e-4)
    _coordinator(client_sizes=dict.fromkeys(range(20), 100), dp_mode="sample", dp_delta=1e-4)  # 2000 records: fine
    with pytest.raises(ConfigError, match="needs every client's number of records"):
        _coordinator(dp_mode="sample")
    # a BatchNorm model that slipped past the config check (as a custom model can) is refused before training
    cfg = config_from_dict(_dp_sim_config(small_config, model_type="resnet", resnet_norm="batch"), check=False)
    with pytest.raises(ConfigError, match="Replace it with GroupNorm"):
        Simulation(cfg, progress=False)


# --------------------------------------------------------------------------- the server's noise
def test_central_noise_has_the_stated_std_on_a_zero_update_round() -> None:
    z, clip, numel = 1.3, 0.7, 40_000
    coord = _coordinator(numel=numel, dp_noise_multiplier=z, clip_grad_norm=clip, dp_epsilon=10.0)
    plan = _zero_round(coord)
    m = len(plan.selected)
    noise = coord.global_vector.double() * m  # server_learning_rate 1: global = (0 + noise) / m
    sd_error = 1 / math.sqrt(2 * numel)  # relative standard error of a sample std
    assert float(noise.std()) == pytest.approx(z * clip, rel=5 * sd_error)
    assert abs(float(noise.mean())) < 5 * z * clip / math.sqrt(numel)
    assert coord.history[0].epsilon == pytest.approx(make_accountant("rdp", [(z, 5 / 20, 1)]).epsilon(DELTA))


def test_distributed_noise_server_tops_up_the_share_of_missing_clients() -> None:
    """The top-up itself, on the clear sum: the configuration refuses distributed noise without secure
    aggregation (each update would be nearly in the clear), which the secure drivers add around this."""
    z, clip, numel = 2.0, 0.5, 40_000
    central = config_from_dict({"num_clients": 20, "client_selection_ratio": 0.25, "num_rounds": 10, "differential_privacy": True,
                                "secure_aggregation": False, "dp_mode": "client", "dp_accountant": "rdp", "dp_delta": DELTA,
                                "dp_noise_multiplier": z, "clip_grad_norm": clip, "dp_epsilon": 10.0})
    with pytest.raises(ConfigError, match="'dp_noise' has value 'distributed' but secure_aggregation is false"):
        config_from_dict({**central.to_dict(), "dp_noise": "distributed"})
    config = dataclasses.replace(central, dp_noise="distributed")  # the mechanism alone, past the refusal
    coord = Coordinator(config, torch.zeros(numel), spec_of({"w": torch.zeros(numel)}), privacy_seeded_noise=True)
    plan = _zero_round(coord, submit=2)  # 5 selected, 2 arrive with zero (so here noise-free) updates
    instr = plan.instructions[plan.selected[0]]
    assert instr.update_clip == clip and instr.update_noise_std == pytest.approx(z * clip / math.sqrt(5))
    noise = coord.global_vector.double() * 5
    assert float(noise.std()) == pytest.approx(z * clip * math.sqrt(3 / 5), rel=5 / math.sqrt(2 * numel))


# --------------------------------------------------------------------------- the budget
def test_the_budget_stops_a_run_at_the_right_round(small_config: dict, tmp_path: Path) -> None:
    z, q, k = 2.0, 0.5, 3
    eps = [make_accountant("rdp", [(z, q, n)]).epsilon(DELTA) for n in (k, k + 1)]
    budget = round((eps[0] + eps[1]) / 2, 6)  # k rounds fit, k + 1 do not
    cfg = _dp_sim_config(small_config, dp_mode="client", dp_noise_multiplier=z, dp_epsilon=budget, clip_grad_norm=0.5,
                         num_rounds=8, max_train_samples=1000, evaluation_frequency=2)
    seen: list[torch.Tensor] = []
    with Simulation(cfg, tmp_path / "run", progress=False) as sim:
        submit = sim.coordinator.submit
        sim.coordinator.submit = lambda u: (seen.append(u.delta.clone()), submit(u))[1]
        history = sim.train()
        summary = sim.save_results()
        ledger = sim.coordinator.privacy.ledger
    assert len(history) == k and len(_rows(tmp_path / "run")) == k
    assert "round 4 would take epsilon" in summary["stop_reason"] and "ends after 3 rounds" in summary["stop_reason"]
    assert summary["privacy"]["stop_reason"] == summary["stop_reason"] and summary["rounds_completed"] == k
    assert summary["privacy"]["rounds_within_budget"] == k
    # round 3 is not an evaluation round (every 2nd), but it is the last: its model is evaluated and is the final one
    assert [r["test_accuracy"] != "" for r in _rows(tmp_path / "run")] == [False, True, True]
    assert summary["final_accuracy"] == float(_rows(tmp_path / "run")[-1]["test_accuracy"])
    with Simulation(cfg, tmp_path / "run", resume=True, progress=False) as again:  # the evaluation was checkpointed
        assert again.coordinator.history[-1].test_accuracy == summary["final_accuracy"]
    # history.csv's epsilon is the ledger's, exactly, and the last one is within the budget
    assert [float(r["epsilon"]) for r in _rows(tmp_path / "run")] == [rec.epsilon for rec in ledger.records]
    assert ledger.epsilon_spent() == pytest.approx(eps[0], rel=1e-12) and eps[0] <= budget
    assert all(r["train_loss"] == "" for r in _rows(tmp_path / "run")), "training loss is not private: never reported"
    # client-level clipping held on every real update, and it did clip
    norms = [float(torch.linalg.vector_norm(d.double())) for d in seen]
    # Poisson client sampling: the rounds' counts vary, every drawn client's update reached the aggregate
    assert len(norms) == sum(r.clients for r in history) and max(norms) <= 0.5
    assert sum(n > 0.5 * (1 - 1e-4) for n in norms) >= len(norms) // 2


def test_sample_level_clients_drop_out_at_their_own_budget() -> None:
    sizes = dict(enumerate([32, 48, 64, 96, 128, 200, 320, 640]))
    coord = _coordinator(client_sizes=sizes, num_clients=8, client_selection_ratio=0.5, num_rounds=40, dp_mode="sample",
                         dp_epsilon=4.0, dp_noise_multiplier=1.1, batch_size=16, local_epochs=1, min_clients=2)
    with pytest.raises(BudgetExhausted, match="fewer than min_clients=2"):
        while not coord.finished:
            _zero_round(coord)
    engine = coord.privacy
    eps = engine.client_epsilons()
    assert max(eps.values()) <= 4.0 and coord.history[-1].epsilon == max(eps.values())
    assert coord.stop_reason is not None and coord.finished and len(coord.history) >= 5
    # each client's epsilon is recomputable from its own participation: q_k = 16/n_k, steps = rounds x round(n_k/16)
    could_go_on = []
    for cid, n in sizes.items():
        q, s = sample_level_schedule(n, 16, 1)
        rounds = len(engine.client_records.get(cid, []))
        assert eps[cid] == pytest.approx(make_accountant("rdp", [(1.1, q, s * rounds)]).epsilon(DELTA) if rounds else 0.0)
        if make_accountant("rdp", [(1.1, q, s * (rounds + 1))]).epsilon(DELTA) <= 4.0:
            could_go_on.append(cid)
    assert len(could_go_on) < 2, "the run ends only when fewer than min_clients could take another round"
    q0, s0 = sample_level_schedule(32, 16, 1)
    assert make_accountant("rdp", [(1.1, q0, s0)]).epsilon(DELTA) > 4.0 and eps[0] == 0.0, \
        "a client whose first round alone would cross the budget is never selected"
    rounds = {cid: len(engine.client_records.get(cid, [])) for cid in sizes}
    assert rounds[7] >= rounds[5] > rounds[3] > 0, "larger clients (smaller q) take part in more rounds"
    with pytest.raises(BudgetExhausted):
        coord.plan_round(list(range(8)))


def test_sample_level_update_with_wrong_steps_is_rejected_but_charged() -> None:
    coord = _coordinator(client_sizes=dict.fromkeys(range(20), 100), dp_mode="sample", dp_epsilon=5.0)
    plan = coord.plan_round(list(range(20)))
    cid = plan.selected[0]
    with pytest.raises(UpdateRejected) as err:
        coord.submit(ClientUpdate(cid, 1, torch.zeros(4), 100, {"dp_sample_rate": 0.32, "dp_steps": 1.0}))
    assert err.value.reason == "dp_mismatch"
    assert coord.privacy.client_epsilon(cid) > 0, "the server saw its update: it is charged"


# --------------------------------------------------------------------------- adaptive clipping
@pytest.mark.parametrize(("norm", "grows"), [(50.0, True), (1e-3, False)])
def test_adaptive_clipping_follows_the_update_norms(norm: float, grows: bool) -> None:
    coord = _coordinator(numel=10, dp_noise_multiplier=1.0, dp_epsilon=10.0, dp_adaptive_clipping=True, clip_grad_norm=1.0)
    clips = []
    for _ in range(8):
        plan = coord.plan_round(list(range(20)))
        clip = plan.instructions[plan.selected[0]].update_clip
        clips.append(clip)
        for cid in plan.selected:
            delta = torch.full((10,), norm / math.sqrt(10))
            bit = float(norm <= clip)
            coord.submit(ClientUpdate(cid, plan.round, delta * min(1.0, clip / norm), 10, {"dp_unclipped": bit}))
        coord.close_round()
    assert (coord.privacy.clip_norm > 1.5) if grows else (coord.privacy.clip_norm < 0.7), clips
    plan = coord.plan_round(list(range(20)))
    with pytest.raises(UpdateRejected, match="clipping bit"):
        coord.submit(ClientUpdate(plan.selected[0], plan.round, torch.zeros(10), 10, {}))


# --------------------------------------------------------------------------- persistence
def test_state_dict_and_round_restore_keep_the_ledger() -> None:
    coord = _coordinator(numel=6, dp_noise_multiplier=1.5, dp_epsilon=10.0)
    _zero_round(coord)
    state = coord.state_dict()
    json.dumps(state["privacy"])  # plain data: a REST store can keep it as JSON
    plan = coord.plan_round(list(range(20)))

    other = _coordinator(numel=6, dp_noise_multiplier=1.5, dp_epsilon=10.0)
    other.load_state_dict(state)
    assert other.privacy.epsilon_spent() == coord.privacy.epsilon_spent() > 0
    with pytest.raises(ValueError, match="RoundPlan.privacy"):
        other.restore_round(RoundPlan(plan.round, plan.selected, plan.instructions))
    other.restore_round(RoundPlan(plan.round, plan.selected, plan.instructions, privacy=json.loads(json.dumps(plan.privacy))))
    for c in (coord, other):
        for cid in plan.selected:
            c.submit(ClientUpdate(cid, plan.round, torch.zeros(6), 10))
        c.close_round()
    assert torch.equal(coord.global_vector, other.global_vector)  # same (seeded) noise, same round
    assert other.history[-1].epsilon == coord.history[-1].epsilon
    without = _coordinator(numel=6, dp_noise_multiplier=1.5, dp_epsilon=10.0)
    with pytest.raises(ValueError, match="no privacy ledger"):
        without.load_state_dict({**state, "privacy": None})


# --------------------------------------------------------------------------- real training
def test_sample_level_dp_training_learns_and_history_matches_the_ledger(small_config: dict, tmp_path: Path) -> None:
    cfg = _dp_sim_config(small_config, dp_epsilon=10.0, num_rounds=3)
    with Simulation(cfg, tmp_path / "run", progress=False) as sim:
        history = sim.train()
        summary = sim.save_results()
        engine = sim.coordinator.privacy
    assert history[-1].test_accuracy > 0.3, f"10 classes: chance is 0.1, got {[r.test_accuracy for r in history]}"
    rows = _rows(tmp_path / "run")
    assert list(rows[0])[-1] == "epsilon"
    assert [float(r["epsilon"]) for r in rows] == [engine.round_epsilons[r] for r in (1, 2, 3)]
    stored = json.loads((tmp_path / "run" / "summary.json").read_text())["privacy"]
    assert stored["mode"] == "sample" and stored["delta"] == DELTA and stored["accountant"] == "rdp"
    assert stored["epsilon_spent"] == float(rows[-1]["epsilon"]) == stored["per_client_epsilon"]["max"] <= 10.0
    assert stored["per_client_epsilon"]["median"] <= stored["per_client_epsilon"]["max"]
    assert stored["noise_multiplier"] == engine.noise_multiplier and "Poisson" in stored["sampling"]
    assert summary["privacy"]["expected_final_epsilon"] <= 10.0


def test_a_resumed_dp_run_keeps_its_epsilon(small_config: dict, tmp_path: Path) -> None:
    cfg = _dp_sim_config(small_config, dp_epsilon=8.0, num_rounds=3, max_train_samples=1000)
    with Simulation(cfg, tmp_path / "full", progress=False) as full:
        full.train()
    with Simulation(cfg, tmp_path / "part", progress=False) as first:
        first.train(rounds=2)
        spent = first.coordinator.privacy.epsilon_spent()
    with Simulation(cfg, tmp_path / "part", resume=True, progress=False) as second:
        assert second.coordinator.privacy.epsilon_spent() == spent > 0
        assert second.coordinator.privacy.client_records == first.coordinator.privacy.client_records
        second.train()
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(_rows(tmp_path / "part")) == strip(_rows(tmp_path / "full"))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_that_diverges_ends_with_its_reason_and_keeps_the_last_finite_model(tmp_path: Path, workers: int) -> None:
    """Heavy client-level noise blows the model up: that is a result to record, not a crash to lose."""
    cfg = {"dataset": "synthetic", "model_type": "mlp", "hidden_size": 64, "num_clients": 10, "client_selection_ratio": 0.5,
           "num_rounds": 4, "local_epochs": 1, "batch_size": 16, "learning_rate": 0.5, "momentum": 0.9, "seed": 1,
           "differential_privacy": True, "dp_mode": "client", "dp_noise_multiplier": 1000.0, "dp_delta": 1e-5,
           "secure_aggregation": False, "compression": False, "workers": workers, "evaluation_frequency": 5}
    with Simulation(cfg, tmp_path / "run", progress=False) as sim:
        sim.train()
        summary = sim.save_results()
        assert bool(torch.isfinite(sim.coordinator.global_vector).all())
        kept = sim.evaluate()
    # round 1 was not an evaluation round, but its model is the one the run ends with: it is evaluated
    assert summary["final_accuracy"] == kept.accuracy and _rows(tmp_path / "run")[0]["test_accuracy"] != ""
    assert summary["stop_reason"].startswith("training diverged in round 2: client ") and "raise" not in summary["stop_reason"]
    assert summary["rounds_completed"] == 1 and json.loads((tmp_path / "run" / "summary.json").read_text())["stop_reason"]


def test_an_update_decrypted_then_refused_after_its_round_closed_is_still_charged() -> None:
    coord = _coordinator(client_sizes=dict.fromkeys(range(20), 100), dp_mode="sample", dp_epsilon=5.0)
    engine = coord.privacy
    plan = _zero_round(coord, submit=2)  # 5 selected, 2 arrive before the round closes
    late, unselected = plan.selected[2], next(c for c in range(20) if c not in plan.selected)
    assert engine.client_epsilon(late) == 0.0
    # the late client's upload was decrypted by the server, then refused: its round had closed
    assert coord.charge_refused_update(late, plan.round) is True
    q, steps = plan.instructions[late].dp_sample_rate, plan.instructions[late].dp_steps
    assert engine.client_records[late] == [(plan.round, engine.client_noise_multiplier(late), q, steps)]
    assert engine.client_epsilon(late) == pytest.approx(engine.client_epsilon(plan.selected[0]))
    assert coord.charge_refused_update(late, plan.round) is False  # once per round
    assert coord.charge_refused_update(unselected, plan.round) is False  # not in the plan: it trained nothing
    for _ in range(2):
        _zero_round(coord, submit=1)
    assert coord.charge_refused_update(plan.selected[3], plan.round) is False  # too old: no plan kept
