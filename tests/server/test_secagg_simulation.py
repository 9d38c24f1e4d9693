"""Secure aggregation through the coordinator and the simulation: the same model as without it up to
the fixed-point rounding (bounded), with FedAvg, SCAFFOLD and client-level DP; dropouts; refusals."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from fl_common.config import ConfigError, config_from_dict, replace_config
from fl_common.protocol import ClientUpdate
from fl_common.secagg import SecAggAborted
from fl_common.tensors import spec_of
from fl_server.coordinator import Coordinator
from fl_server.secagg import MaskedUpdate, quantization_bound, secagg_mode
from fl_server.simulation import Simulation
from fl_server.simulation.secagg import SIMULATION_FEATURES, SecAggSimulation
from fl_server.strategies import Strategy, UpdateRejected, WeightedMeanAggregator
from fl_server.strategies.qfedavg import QFedAvgAggregator

NUMEL = 300


def _cfg(**over):
    return config_from_dict({"num_clients": 12, "client_selection_ratio": 0.5, "num_rounds": 3, "differential_privacy": False,
                             "secure_aggregation": True, "compression": False, "seed": 3, **over})


def _size(cid: int) -> int:
    """Each test client's sample count (the coordinators' client_sizes, the updates' num_samples)."""
    return 10 + 7 * cid


def _coordinator(cfg, driver: SecAggSimulation | None = None, **kw) -> Coordinator:
    driver = driver or SecAggSimulation(cfg)
    sizes = {cid: _size(cid) for cid in range(cfg.num_clients)}
    return Coordinator(cfg, torch.zeros(NUMEL), spec_of({"w": torch.zeros(NUMEL)}), client_sizes=sizes,
                       driver_features=("control_variates", *SIMULATION_FEATURES), secagg_verifiers=driver.verifier,
                       privacy_seeded_noise=True, **kw)


def _updates(coord: Coordinator, plan, cids, scale: float = 0.05):
    """Deterministic synthetic client updates (what local training would return)."""
    for cid in cids:
        g = torch.Generator().manual_seed(1000 * plan.round + cid)
        delta = torch.randn(NUMEL, generator=g) * scale
        instr = plan.instructions[cid]
        metrics = {"train_loss": 0.5 + 0.01 * cid}
        if instr.update_clip > 0:
            norm = float(delta.norm())
            if norm > instr.update_clip:
                delta = delta * (instr.update_clip / norm)
            metrics = {"dp_unclipped": float(norm <= instr.update_clip)}
            if instr.update_noise_std > 0:
                delta = delta + torch.randn(NUMEL, generator=g) * instr.update_noise_std
        control = torch.randn(NUMEL, generator=g) * scale if instr.scaffold else None
        yield ClientUpdate(cid, plan.round, delta, _size(cid), metrics, control_delta=control)


def _plain_twin(cfg, **kw) -> Coordinator:
    """The same run without secure aggregation (same seeds, same selection). A reference computation:
    distributed DP noise without masking is refused as a configuration, so it is built past the schema."""
    plain = (dataclasses.replace(cfg, secure_aggregation=False, **kw) if cfg.dp_noise == "distributed"
             else replace_config(cfg, secure_aggregation=False, **kw))
    sizes = {cid: _size(cid) for cid in range(cfg.num_clients)}
    return Coordinator(plain, torch.zeros(NUMEL), spec_of({"w": torch.zeros(NUMEL)}), client_sizes=sizes,
                       driver_features=("control_variates",), privacy_seeded_noise=True)


def _plain_round(coord: Coordinator, cids=None) -> None:
    plan = coord.plan_round(list(range(coord.cfg.num_clients)))
    for u in _updates(coord, plan, plan.selected if cids is None else cids):
        coord.submit(u)
    coord.close_round()


# --------------------------------------------------------------------------- through the coordinator
@pytest.mark.parametrize("method", ["fedavg", "fedprox", "fedadam"])
def test_weighted_strategies_give_the_plain_result_up_to_rounding(method: str) -> None:
    cfg = _cfg(aggregation_method=method, **({"server_learning_rate": 0.05} if method == "fedadam" else {}))
    driver = SecAggSimulation(cfg)
    secure, plain = _coordinator(cfg, driver), _plain_twin(cfg)
    for _ in range(2):
        plan = secure.plan_round(list(range(cfg.num_clients)))
        params = secure.secagg.params
        assert params.weighted and params.weight_bound == max(10 + 7 * c for c in plan.selected)
        record, summed = driver.secure_round(secure, plan, lambda cids, plan=plan: _updates(secure, plan, cids))
        assert summed == set(plan.selected)
        _plain_round(plain)
        weights = [10 + 7 * c for c in plan.selected]
        bound = quantization_bound(params, weights) * cfg.server_learning_rate
        if method != "fedadam":  # adaptive steps are not linear in the mean: checked loosely below
            assert float((secure.global_vector - plain.global_vector).abs().max()) <= bound + 1e-6
        assert record.clients == len(plan.selected)
        assert record.train_loss == pytest.approx(plain.history[-1].train_loss, abs=1e-3)
    assert torch.allclose(secure.global_vector, plain.global_vector, atol=1e-3)


def test_dropouts_at_every_phase_still_give_the_survivors_mean() -> None:
    cfg = _cfg(num_clients=20, client_selection_ratio=0.5, secagg_dropout_rate=0.12)
    driver = SecAggSimulation(cfg)
    secure = _coordinator(cfg, driver)
    for attempt in range(10):
        plan = secure.plan_round(list(range(cfg.num_clients)))
        params = secure.secagg.params
        before = secure.global_vector.clone()
        record, summed = driver.secure_round(secure, plan, lambda cids, plan=plan: _updates(secure, plan, cids),
                                             attempt=attempt)
        if record is None:
            continue
        # the plain weighted mean over exactly the clients whose inputs are in the sum
        ups = list(_updates(secure, plan, sorted(summed)))
        total = sum(u.num_samples for u in ups)
        want = sum(u.delta.double() * u.num_samples for u in ups) / total
        bound = quantization_bound(params, [u.num_samples for u in ups])
        assert float((secure.global_vector - before - want.float()).abs().max()) <= bound + 1e-6
        if secure.completed_rounds == 3:
            break
    assert secure.completed_rounds == 3
    dropped = sum(sum(r.drops.values()) for r in driver.rounds)
    assert dropped > 0, "the seeded dropout draws should hit at least one client in three rounds"


def test_scaffold_means_and_variates_match_the_plain_run() -> None:
    cfg = _cfg(aggregation_method="scaffold")
    driver = SecAggSimulation(cfg)
    secure, plain = _coordinator(cfg, driver), _plain_twin(cfg)
    plan = secure.plan_round(list(range(cfg.num_clients)))
    assert secagg_mode(secure.secagg.inner) == "scaffold" and secure.secagg.params.segment("control") is not None
    driver.secure_round(secure, plan, lambda cids: _updates(secure, plan, cids))
    _plain_round(plain)
    unit = 2.0 ** -cfg.secagg_scale_bits
    assert float((secure.global_vector - plain.global_vector).abs().max()) <= unit + 1e-6
    assert float((secure.strategy.control - plain.strategy.control).abs().max()) <= unit + 1e-6


@pytest.mark.parametrize("noise", ["distributed", "central"])
def test_client_level_dp_gets_the_same_noisy_mean(noise: str) -> None:
    dp = dict(num_clients=40, client_selection_ratio=0.2, differential_privacy=True, dp_mode="client", dp_noise=noise,
              dp_accountant="rdp", dp_delta=1e-5, dp_noise_multiplier=1.0, clip_grad_norm=0.5, dp_epsilon=10.0)
    cfg = _cfg(**dp)
    driver = SecAggSimulation(cfg)
    secure, plain = _coordinator(cfg, driver), _plain_twin(cfg)
    plan = secure.plan_round(list(range(cfg.num_clients)))
    seg = secure.secagg.params.segment("delta")
    if noise == "distributed":  # the clients' noise is already in: no re-clip, a bound 10 sigma wider
        assert seg.l2_clip is None and seg.bound > 0.5
    else:
        assert seg.l2_clip == 0.5 and seg.bound == 0.5
    record, _ = driver.secure_round(secure, plan, lambda cids: _updates(secure, plan, cids, scale=0.1))
    _plain_round(plain)
    # unweighted sum / m: each of the m inputs is within 2^-s, the mean within 2^-s
    assert float((secure.global_vector - plain.global_vector).abs().max()) <= 2.0 ** -cfg.secagg_scale_bits + 1e-6
    assert record.epsilon == pytest.approx(plain.history[-1].epsilon)  # accounted exactly as without it


def test_adaptive_clipping_sees_only_the_count_of_unclipped_updates() -> None:
    cfg = _cfg(num_clients=40, client_selection_ratio=0.2, differential_privacy=True, dp_mode="client", dp_noise="distributed",
               dp_accountant="rdp", dp_delta=1e-5, dp_noise_multiplier=1.0, clip_grad_norm=0.5, dp_adaptive_clipping=True,
               dp_epsilon=10.0)
    driver = SecAggSimulation(cfg)
    secure, plain = _coordinator(cfg, driver), _plain_twin(cfg)
    plan = secure.plan_round(list(range(cfg.num_clients)))
    assert secure.secagg.params.segment("unclipped") is not None
    driver.secure_round(secure, plan, lambda cids: _updates(secure, plan, cids, scale=0.04))
    _plain_round(plain)
    assert secure.privacy.clip_norm == pytest.approx(plain.privacy.clip_norm)
    assert secure.privacy.clip_norm != 0.5


def test_an_aborted_round_releases_nothing_and_the_next_plan_starts_clean() -> None:
    cfg = _cfg()
    driver = SecAggSimulation(cfg)
    coord = _coordinator(cfg, driver)
    plan = coord.plan_round(list(range(cfg.num_clients)))
    t = coord.secagg.params.threshold
    record, summed = driver.secure_round(coord, plan, lambda cids: _updates(coord, plan, cids[: t - 1]))
    assert record is None and summed == set() and coord.secagg is None and coord.completed_rounds == 0
    assert torch.equal(coord.global_vector, torch.zeros(NUMEL))
    assert "fewer than the threshold" in driver.aborted[-1].aborted
    plan2 = coord.plan_round(list(range(cfg.num_clients)))
    assert plan2.round == 1 and plan2.secagg["session"] != plan.secagg["session"]
    record, _ = driver.secure_round(coord, plan2, lambda cids: _updates(coord, plan2, cids))
    assert record is not None and coord.completed_rounds == 1


def test_the_coordinator_refuses_plain_updates_and_closing_before_unmasking() -> None:
    cfg = _cfg()
    coord = _coordinator(cfg)
    plan = coord.plan_round(list(range(cfg.num_clients)))
    cid = plan.selected[0]
    with pytest.raises(UpdateRejected) as err:
        coord.submit(ClientUpdate(cid, plan.round, torch.zeros(NUMEL), 10))
    assert err.value.reason == "not_masked"
    with pytest.raises(RuntimeError, match="not done"):
        coord.secagg.result()
    coord.abort_round()
    with pytest.raises(RuntimeError, match="cannot be restored"):  # its keys and masked sum lived in memory
        coord.restore_round(plan)


def test_masked_updates_carry_no_plain_statistics() -> None:
    from fl_common.secagg import MaskedInput

    masked = MaskedInput(1, b"\0" * 9, (), b"s" * 64)
    u = MaskedUpdate.wrap(4, 1, masked, metrics={"train_loss": 0.3, "dp_unclipped": 1.0, "dp_steps": 5.0, "train_accuracy": 0.9})
    assert u.metrics == {"dp_steps": 5.0} and u.delta.numel() == 0 and u.wire_bytes == masked.wire_size()


# --------------------------------------------------------------------------- refusals
def test_drivers_without_the_protocol_refuse_secure_aggregation() -> None:
    cfg = _cfg()
    with pytest.raises(ConfigError, match="does not run the secure aggregation protocol"):
        Coordinator(cfg, torch.zeros(4), spec_of({"w": torch.zeros(4)}))  # the REST server's coordinator, today
    with pytest.raises(ConfigError, match="simulated dropouts exist only in the simulation"):
        Coordinator(_cfg(secagg_dropout_rate=0.1), torch.zeros(4), spec_of({"w": torch.zeros(4)}),
                    driver_features=("secure_aggregation",))
    with pytest.raises(ConfigError, match="registered no client keys"):
        c = Coordinator(cfg, torch.zeros(4), spec_of({"w": torch.zeros(4)}), driver_features=("secure_aggregation",),
                        client_sizes=dict.fromkeys(range(12), 5))
        c.plan_round(list(range(12)))


@pytest.mark.parametrize("method", ["median", "trimmed_mean", "krum", "multikrum", "qfedavg"])
def test_strategies_that_need_individual_updates_are_refused(method: str) -> None:
    with pytest.raises(ConfigError, match="secure aggregation"):
        _coordinator(_cfg(aggregation_method=method, num_clients=20, client_selection_ratio=0.5, min_clients=5))


def test_a_new_strategy_needing_individual_updates_is_refused_by_the_coordinator() -> None:
    class Mode(Strategy):
        name = "mode"
        needs_individual_updates = True

        def new_aggregator(self, round_number, global_vector):  # pragma: no cover - never reached
            return WeightedMeanAggregator(global_vector.numel())

    cfg = _cfg()
    with pytest.raises(ConfigError, match="needs individual updates"):
        _coordinator(cfg, strategy=Mode())
    with pytest.raises(ConfigError, match="cannot feed QFedAvgAggregator"):
        secagg_mode(QFedAvgAggregator(4, 1.0, 10.0))


def test_config_keys_of_secure_aggregation_are_checked() -> None:
    with pytest.raises(ConfigError, match="secagg_scale_bits.*secure_aggregation is false"):
        config_from_dict({"secure_aggregation": False, "differential_privacy": False, "secagg_scale_bits": 20})
    with pytest.raises(ConfigError, match="sparsification cannot run under secure aggregation"):
        _cfg(compression=True, codec="topk:0.1")
    with pytest.raises(ConfigError, match="must be even"):
        _cfg(num_clients=40, secagg_graph_degree=5)
    with pytest.raises(ConfigError, match="secagg_dropout_phase"):
        _cfg(secagg_dropout_phase="unmask")
    with pytest.raises(ConfigError, match="at least 3 clients"):
        _cfg(num_clients=4, client_selection_ratio=0.5)
    with pytest.raises(ConfigError, match="secagg_threshold"):
        _cfg(secagg_threshold=0.5)


def test_an_explicit_threshold_and_degree_are_used() -> None:
    for fraction, t in ((0.7, math.ceil(0.7 * 9)), (0.99, 8)):  # 9 holders; t <= 8 neighbours (rebuild a dropped key)
        cfg = _cfg(num_clients=60, client_selection_ratio=0.5, secagg_graph_degree=8, secagg_threshold=fraction)
        coord = _coordinator(cfg)
        coord.plan_round(list(range(60)))
        p = coord.secagg.params
        assert (p.degree, p.threshold) == (8, t)


# --------------------------------------------------------------------------- the simulation
def _sim_config(small_config: dict, **over) -> dict:
    return {**small_config, "model_type": "mlp", "hidden_size": 64, "num_rounds": 2, "workers": 0, "max_train_samples": 1000,
            "max_test_samples": 300, **over}


def test_simulation_with_secure_aggregation_matches_the_plain_run(small_config: dict, tmp_path) -> None:
    cfg = _sim_config(small_config, num_rounds=1)
    with Simulation({**cfg, "secure_aggregation": False}, progress=False) as plain:
        plain.train()
        want = plain.coordinator.global_vector.clone()
    with Simulation({**cfg, "secure_aggregation": True}, output_dir=tmp_path / "run", progress=False) as sim:
        sim.train()
        got = sim.coordinator.global_vector.clone()
        summary = sim.save_results()
        summed = [cid for r, cid, _, arrived, _ in sim.coordinator.participation.rows if arrived]
        weights = [len(sim.partitions[cid]) for cid in summed]
    params = sim.secagg.rounds[-1].params
    assert params["clients"] == len(summed)
    # each client's (n_k / W) x delta is within 2^-s: the weighted mean is within n W 2^-s / sum(n_k)
    bound = len(weights) * max(weights) * 2.0 ** -cfg.get("secagg_scale_bits", 16) / sum(weights)
    assert float((got - want).abs().max()) <= bound + 1e-6
    assert float((got - want).abs().max()) > 0  # it did go through the fixed point
    sa = summary["secure_aggregation"]
    assert sa["enabled"] and sa["rounds_completed"] == 1 and sa["aborted_attempts"] == 0
    assert set(sa["bytes_per_client_per_phase"]) == {"advertise_keys", "share_keys", "masked_input", "consistency_check",
                                                     "unmask"}
    up = sa["bytes_per_client_per_phase"]["masked_input"]["up"]
    assert up == pytest.approx(params["vector_length"] * params["bytes_per_value"], rel=0.01)
    assert summary["codec"].startswith("secagg fixed point")


def test_simulation_with_dropouts_completes(small_config: dict) -> None:
    cfg = _sim_config(small_config, num_clients=10, client_selection_ratio=0.8, secure_aggregation=True,
                      secagg_dropout_rate=0.1, num_rounds=3)
    with Simulation(cfg, progress=False) as sim:
        history = sim.train()
        sa = sim.summary()["secure_aggregation"]
    assert len(history) == 3 and all(r.test_accuracy is not None for r in history)
    assert sum(sa["mean_dropouts_per_round"].values()) * 3 + sa["aborted_attempts"] > 0
    assert history[-1].test_accuracy > 0.3


def test_simulation_stops_with_the_reason_when_every_attempt_aborts(small_config: dict) -> None:
    cfg = _sim_config(small_config, secure_aggregation=True, secagg_dropout_rate=0.9, secagg_dropout_phase="share_keys")
    with Simulation(cfg, progress=False) as sim:
        with pytest.raises(RuntimeError, match="aborted round 1 20 times"):
            sim.train()
        assert sim.coordinator.completed_rounds == 0


def test_secagg_aborted_error_is_raised_by_the_aggregator() -> None:
    cfg = _cfg()
    driver = SecAggSimulation(cfg)
    coord = _coordinator(cfg, driver)
    plan = coord.plan_round(list(range(cfg.num_clients)))
    agg = coord.secagg
    agg.server.close_phase(1.0)  # nobody advertised
    with pytest.raises(SecAggAborted):
        agg.result()
    assert np.isscalar(agg.num_updates) and agg.num_updates == 0
    coord.abort_round()
    assert plan.round == 1
