"""Sample-level DP with distributed noise under masking: what the server unmasks carries the whole noise.

The claim the accountant rests on: the clients' noise shares add up, in the sum the server unmasks, to
N(0, (sigma C)^2) per coordinate of the summed clipped gradients (or more, with more than min_clients
inputs), and each participation is charged as one Poisson-subsampled Gaussian step. Checked through the
real simulation (masking, fixed-point encoding, unmasking), not on the clear sum."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fl_common.privacy import make_accountant
from fl_server.privacy.statement import statement_lines
from fl_server.rest.demo import privacy_line
from fl_server.simulation import Simulation

DELTA = 1e-5


def _config(small_config: dict, **over: object) -> dict:
    return {**small_config, "model_type": "mlp", "hidden_size": 16, "workers": 0, "num_rounds": 1,
            "client_selection_ratio": 0.5, "differential_privacy": True, "dp_mode": "sample", "dp_accountant": "rdp",
            "dp_delta": DELTA, "dp_epsilon": 10.0, "dp_noise": "distributed", "secure_aggregation": True,
            "aggregation_method": "fedavg", "momentum": 0.0, "weight_decay": 0.0, "compression": False, **over}


def test_the_unmasked_sum_carries_the_whole_noise_and_each_client_pays_one_step(small_config: dict, tmp_path: Path) -> None:
    sigma, clip, q, lr, shares = 40.0, 0.5, 0.5, 0.2, 4
    cfg = _config(small_config, dp_noise_multiplier=sigma, clip_grad_norm=clip, dp_sample_rate=q, learning_rate=lr,
                  min_clients=shares)
    with Simulation(cfg, tmp_path / "run", progress=False) as sim:
        coord = sim.coordinator
        before = coord.global_vector.double().clone()
        plans = []
        plan_round = coord.plan_round
        coord.plan_round = lambda *a, **k: plans.append(plan_round(*a, **k)) or plans[-1]  # type: ignore[method-assign]
        history = sim.train()
        after = coord.global_vector.double()
        privacy = coord.privacy
        sizes = {cid: privacy.client_sizes[cid] for cid in plans[0].selected}
        instr = plans[0].instructions[plans[0].selected[0]]
    m = len(sizes)
    assert m == 5 and history[0].clients == m
    # every client adds its 1/t share of the variance, one step at the shared rate
    assert instr.dp_noise_multiplier == pytest.approx(sigma / math.sqrt(shares))
    assert (instr.dp_sample_rate, instr.dp_steps) == (q, 1)
    # FedAvg over the masked, n_k-weighted steps: global change = -lr (sum_k S_k + N_k) / (q sum_k n_k)
    change = (after - before) * q * sum(sizes.values()) / lr
    expected_std = sigma * clip * math.sqrt(m / shares)  # m shares of variance (sigma C)^2 / t each
    assert float(change.std()) == pytest.approx(expected_std, rel=5 / math.sqrt(2 * change.numel()) + 0.01)
    # one Poisson-subsampled Gaussian of multiplier sigma (the whole noise, not the share) per participant
    assert history[0].epsilon == pytest.approx(make_accountant("rdp", [(sigma, q, 1)]).epsilon(DELTA))
    assert privacy.summary()["noise"] == "distributed" and privacy.summary()["noise_shares"] == shares
    assert "distributed noise" in privacy.describe()


def test_the_statement_says_what_distributed_noise_assumes() -> None:
    lines = statement_lines({"mode": "sample", "noise": "distributed", "noise_shares": 8}, None)
    assert any("1/8 share" in line and "while the masking does" in line for line in lines)
    assert not any("share" in line for line in statement_lines({"mode": "sample", "noise": "local", "noise_shares": 1}, None))
    status = {"privacy": {"differential_privacy": True, "mode": "sample", "noise": "distributed", "noise_shares": 8}}
    assert "1/8 share" in privacy_line(status)["noise"]
    assert "noise" not in privacy_line({"privacy": {"differential_privacy": True, "mode": "sample", "noise": "local"}})
