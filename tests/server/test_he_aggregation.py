"""CKKS aggregation through the coordinator and the simulation: the same model as the plain run up to
the stated CKKS error, with FedAvg and client-level DP (central and distributed noise); dropouts of
clients and of the decryptor; the configurations it refuses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fl_common.config import ConfigError, config_from_dict
from fl_common.he import EncryptedInput, available
from fl_common.protocol import ClientUpdate
from fl_common.tensors import spec_of
from fl_server.coordinator import Coordinator
from fl_server.he import EncryptedUpdate, pick_decryptor
from fl_server.simulation import Simulation
from fl_server.simulation.ckks import SIMULATION_FEATURES, CKKSSimulation
from fl_server.strategies import UpdateRejected

pytestmark = pytest.mark.skipif(not available(), reason="the [he] extra (tenseal) is not installed")

NUMEL = 300


def _cfg(**over):
    return config_from_dict({"num_clients": 12, "client_selection_ratio": 0.5, "num_rounds": 3, "differential_privacy": False,
                             "secure_aggregation": True, "secure_aggregation_method": "ckks", "compression": False, "seed": 3,
                             **over})


def _size(cid: int) -> int:
    return 10 + 7 * cid


def _coordinator(cfg, features=SIMULATION_FEATURES) -> Coordinator:
    return Coordinator(cfg, torch.zeros(NUMEL), spec_of({"w": torch.zeros(NUMEL)}),
                       client_sizes={cid: _size(cid) for cid in range(cfg.num_clients)}, driver_features=features,
                       privacy_seeded_noise=True)


def _train(plan, cids):
    """Deterministic synthetic client updates (what local training would return), DP-clipped/noised as instructed."""
    for cid in cids:
        g = torch.Generator().manual_seed(1000 * plan.round + cid)
        delta = torch.randn(NUMEL, generator=g) * 0.05
        instr = plan.instructions[cid]
        metrics = {"train_loss": 0.5 + 0.01 * cid}
        if instr.update_clip > 0:
            norm = float(delta.norm())
            delta = delta * min(1.0, instr.update_clip / norm)
            metrics = {"dp_unclipped": float(norm <= instr.update_clip)}
            if instr.update_noise_std > 0:
                delta = delta + torch.randn(NUMEL, generator=g) * instr.update_noise_std
        yield ClientUpdate(cid, plan.round, delta, _size(cid), metrics)


def _plain_twin(cfg, rounds: list) -> Coordinator:
    """The same rounds without secure aggregation: the same selections, the same updates, summed in float64."""
    # distributed DP noise without secure aggregation is refused as a configuration: built past the schema
    plain = _coordinator(dataclasses.replace(cfg, secure_aggregation=False, secure_aggregation_method="masking"), features=())
    for selected, summed in rounds:
        plan = plain.plan_round(list(range(cfg.num_clients)))
        assert plan.selected == selected  # same seed, same draws
        for u in _train(plan, sorted(summed)):
            plain.submit(u)
        plain.close_round()
    return plain


@pytest.mark.parametrize("over", [{}, {"aggregation_method": "fedadam"},
                                  {"differential_privacy": True, "dp_mode": "client", "dp_noise": "central"},
                                  {"differential_privacy": True, "dp_mode": "client", "dp_noise": "distributed",
                                   "dp_adaptive_clipping": True}])
def test_the_ckks_model_is_the_plain_model_within_the_error_bound(over: dict) -> None:
    if over.get("differential_privacy"):
        over = {**over, "num_clients": 40, "client_selection_ratio": 0.2, "dp_accountant": "rdp", "dp_delta": 1e-5,
                "dp_noise_multiplier": 1.0, "clip_grad_norm": 0.5, "dp_epsilon": 10.0}
    cfg = _cfg(**over)
    driver = CKKSSimulation(cfg)
    coord = _coordinator(cfg)
    rounds = []
    for _ in range(2):
        record, plan, summed = driver.run_round(coord, {}, _train)
        rounds.append((list(plan.selected), summed))
        assert record.clients == len(plan.selected) == len(summed)
    plain = _plain_twin(cfg, rounds)
    err = float((coord.global_vector - plain.global_vector).abs().max())
    # per round the mean's error is at most W / sum(n) x 2 x bound(n) (sum and weight), times the server lr (adam: scaled)
    assert err <= 1e-5, err
    assert err > 0  # it did go through CKKS
    s = driver.summary()
    assert s["rounds_completed"] == 2 and s["aborted_attempts"] == 0 and s["ciphertexts_per_client"] == 1
    assert s["upload_bytes_per_client"] > 100_000  # one N=8192 ciphertext
    assert s["max_error_bound_per_slot"] > 0


def test_clients_dropping_after_encrypting_are_left_out() -> None:
    cfg = _cfg(secagg_dropout_rate=0.3, secagg_dropout_phase="masked_input", num_rounds=4)
    driver = CKKSSimulation(cfg)
    coord = _coordinator(cfg)
    rounds = []
    for _ in range(4):
        _, plan, summed = driver.run_round(coord, {}, _train)
        rounds.append((list(plan.selected), summed))
    assert any(len(s) < len(sel) for sel, s in rounds)  # some clients dropped and the rounds still closed
    # the survivors' weighted mean, as if the dropped clients had never been selected
    plain = _coordinator(config_from_dict({**cfg.to_dict(), "secure_aggregation": False, "secure_aggregation_method": "masking",
                                           "secagg_dropout_rate": 0.0, "secagg_dropout_phase": "all"}), features=())
    for _, summed in rounds:
        plan = plain.plan_round(sorted(summed), k=len(summed))
        for u in _train(plan, sorted(summed)):
            plain.submit(u)
        plain.close_round()
    assert float((coord.global_vector - plain.global_vector).abs().max()) <= 1e-5


def test_a_silent_decryptor_aborts_the_attempt_and_the_round_is_planned_again() -> None:
    cfg = _cfg(secagg_dropout_rate=0.6, secagg_dropout_phase="unmask", num_rounds=3)
    driver = CKKSSimulation(cfg)
    coord = _coordinator(cfg)
    for _ in range(3):
        record, plan, summed = driver.run_round(coord, {}, _train)
        assert record.clients == len(summed) == len(plan.selected)  # every input of the attempt that closed counts
    assert driver.aborted and all("decryptor" in (r.aborted or "") for r in driver.aborted)
    assert coord.completed_rounds == 3 and driver.summary()["aborted_attempts"] == len(driver.aborted)


def test_the_coordinator_refuses_plain_forged_and_early_updates() -> None:
    cfg = _cfg()
    driver = CKKSSimulation(cfg)
    coord = _coordinator(cfg)
    plan = coord.plan_round(list(range(cfg.num_clients)))
    agg = coord.ckks
    assert agg is not None and plan.secagg is not None and plan.secagg["method"] == "ckks"
    assert agg.params.decryptor == pick_decryptor(cfg.seed, plan.round, plan.selected)
    cid = plan.selected[0]
    with pytest.raises(UpdateRejected, match="never a plain delta"):
        coord.submit(ClientUpdate(cid, plan.round, torch.zeros(NUMEL), 5))
    fake = EncryptedInput(plan.round, str(cid), (b"x",))
    with pytest.raises(UpdateRejected, match="no public key"):
        coord.submit(EncryptedUpdate.wrap(cid, plan.round, fake))
    with pytest.raises(RuntimeError):
        coord.close_round()
    coord.abort_round()
    assert driver.summary()["rounds_completed"] == 0


@pytest.mark.parametrize("over, match", [
    ({"secagg_threshold": 0.7}, "configure masking"),
    ({"aggregation_method": "scaffold"}, "scaffold"),
    ({"compression": True, "codec": "topk:0.1"}, "sparsification"),
    ({"secagg_dropout_rate": 0.1, "secagg_dropout_phase": "share_keys"}, "no key-sharing"),
    ({"aggregation_method": "median"}, "secure aggregation lets the server see only the sum"),
    ({"secure_aggregation": False}, "secure_aggregation_method"),
])
def test_unsupported_combinations_are_refused(over: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _coordinator(_cfg(**over))


def test_a_driver_without_ckks_refuses_it() -> None:
    with pytest.raises(ConfigError, match="does not run CKKS rounds"):
        _coordinator(_cfg(), features=("secure_aggregation",))


def test_simulation_with_ckks_matches_the_plain_run(small_config: dict, tmp_path) -> None:
    cfg = {**small_config, "model_type": "mlp", "hidden_size": 64, "num_rounds": 1, "workers": 0, "max_train_samples": 1000,
           "max_test_samples": 300, "compression": False}
    with Simulation({**cfg, "secure_aggregation": False}, progress=False) as plain:
        plain.train()
        want = plain.coordinator.global_vector.clone()
    with Simulation({**cfg, "secure_aggregation": True, "secure_aggregation_method": "ckks"}, output_dir=tmp_path / "run",
                    progress=False) as sim:
        sim.train()
        got = sim.coordinator.global_vector.clone()
        summary = sim.save_results()
    assert 0 < float((got - want).abs().max()) <= 1e-5
    he = summary["secure_aggregation"]
    assert he["method"] == "ckks" and he["rounds_completed"] == 1
    assert np.isfinite(he["client_cpu_seconds_per_client_round"])
