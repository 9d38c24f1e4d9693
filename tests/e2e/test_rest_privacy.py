"""Differential privacy over REST: the same engine as the simulation, driven by real servers.

What must hold in deployment: the ε the server prints equals a closed form (client level) or
the accountant applied to what each client really ran (sample level); the budget ends the run
before it is crossed; a restarted server continues from the ε already spent, not from zero.
"""

from __future__ import annotations

import csv
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from scipy.stats import norm

from fl_common.data import load_dataset
from fl_common.data.assignment import partition_sizes, training_subset
from fl_common.privacy import make_accountant
from fl_common.privacy.client_dp import sample_level_schedule
from fl_common.protocol.rest import ENV_ENROLLMENT_TOKEN
from tests.e2e.harness import (
    GunicornServer,
    ScriptedClient,
    make_cfg,
    threaded_server,
    token_env,
    wait_for,
)
from tests.e2e.test_rest_daemons import shutdown, start_client

pytestmark = pytest.mark.usefixtures("small_config")


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact ε(δ) of a Gaussian mechanism with sensitivity/σ = μ (Balle & Wang 2018, Theorem 8)."""
    def delta_of(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def history_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def run_round(clients: list[ScriptedClient], service, numel: int) -> None:
    """Every selected client uploads a large update: the server must clip it to C."""
    round_number = wait_for(lambda: service.coordinator.current_round, timeout=60)
    for c in clients:
        status = c.status()
        assert status["state"] == "selected", status
        assert status["instructions"]["update_clip"] == pytest.approx(1.0)
        c.upload(round_number, torch.full((numel,), 5.0))
    wait_for(lambda: service.coordinator.completed_rounds >= round_number, timeout=60)


@pytest.mark.slow
def test_client_level_dp_over_rest_matches_the_closed_form_stops_at_the_budget_and_survives_a_restart(tmp_path: Path) -> None:
    sigma, delta = 2.0, 1e-5
    # With every client selected (q = 1) r rounds compose to a Gaussian mechanism with mu = sqrt(r)/sigma.
    eps = {r: gaussian_epsilon(math.sqrt(r) / sigma, delta) for r in (1, 2, 3)}
    budget = (eps[2] + eps[3]) / 2  # two rounds fit, the third would cross
    cfg = make_cfg(num_clients=4, num_rounds=5, differential_privacy=True, dp_mode="client", dp_noise="central",
                   dp_noise_multiplier=sigma, dp_epsilon=budget, dp_delta=delta, dp_accountant="prv", clip_grad_norm=1.0,
                   min_clients=4, round_start_wait=0.0, evaluation_frequency=3)
    env = token_env()
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service):
        numel = service.coordinator.spec.numel
        clients = [ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], f"s{i}") for i in range(4)]
        service.start()
        start = service.coordinator.global_vector.clone()
        run_round(clients, service, numel)
        # central DP: the mean of 4 updates clipped to C=1 moves the model by 1 plus N(0, (zC/m)^2) noise per coordinate
        moved = service.coordinator.global_vector - start
        expected_std = sigma * 1.0 / 4
        assert float(moved.std()) == pytest.approx(expected_std, rel=0.05)
        assert float(moved.mean()) == pytest.approx(1.0 / math.sqrt(numel), abs=5 * expected_std / math.sqrt(numel))
        run_round(clients, service, numel)
        status = wait_for(lambda: (s := requests.get(f"{url}/status", timeout=10).json())["state"] == "finished" and s,
                          timeout=60)
        assert status["completed_rounds"] == 2
        assert "privacy budget reached" in status["stop_reason"]
        assert status["privacy"]["epsilon_spent"] == pytest.approx(eps[2], rel=0.02)
        assert status["privacy"]["epsilon_spent"] <= budget
        assert clients[0].status()["state"] == "finished"
    rows = history_rows(tmp_path / "srv" / "run" / "history.csv")
    assert [float(r["epsilon"]) for r in rows] == pytest.approx([eps[1], eps[2]], rel=0.02)
    # evaluation every 3rd round skipped round 2, but the budget made it the last: the final model is evaluated
    assert [r["test_accuracy"] != "" for r in rows] == [False, True]
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service):
        service.start()
        status = service.status()
        assert status["state"] == "finished" and status["completed_rounds"] == 2
        assert status["privacy"]["epsilon_spent"] == pytest.approx(eps[2], rel=0.02)
        assert status["privacy"]["rounds_accounted"] == 2
        assert "privacy budget reached" in status["stop_reason"]


@pytest.mark.slow
def test_sample_level_dp_sgd_over_rest_accounts_what_each_daemon_ran(tmp_path: Path) -> None:
    cfg = make_cfg(num_clients=4, num_rounds=2, differential_privacy=True, dp_mode="sample", dp_epsilon=8.0, dp_delta=1e-5,
                   dp_accountant="rdp", clip_grad_norm=1.0, data_distribution="dirichlet", non_iid_alpha=0.5)
    env = token_env()
    server = GunicornServer(cfg, tmp_path / "srv", env)
    server.start()
    daemons: list[subprocess.Popen] = []
    try:
        daemons = [start_client(server, env, f"d{i}", tmp_path) for i in range(4)]
        status = wait_for(lambda: (s := server.status())["state"] == "finished" and s, timeout=400)
        for d in daemons:
            assert d.wait(timeout=120) == 0
    finally:
        shutdown(server, daemons)
    privacy = status["privacy"]
    assert privacy["mode"] == "sample" and privacy["noise_randomness"] == "OS CSPRNG"
    assert privacy["noise_calibration"] == "per_client"
    sigma_of = {int(n): float(s) for n, s in privacy["noise_multiplier_by_size"]}
    # Independently of the server: the shard sizes the daemons trained on, and what DP-SGD on them costs.
    train = training_subset(load_dataset("fashion_mnist", "train", seed=cfg.seed), cfg.seed, cfg.max_train_samples)
    sizes = partition_sizes(train.y.numpy(), 4, "dirichlet", seed=cfg.seed, alpha=0.5, samples_per_client=None,
                            shards_per_client=2)
    expected = []
    for n in sizes:
        q, steps = sample_level_schedule(n, cfg.batch_size, cfg.local_epochs)
        sigma = sigma_of[int(n)]
        # each shard's sigma spends the budget over the planned rounds (2 x 4 / 4 = 2), within calibration's 1 %
        assert 0.99 * 8.0 <= make_accountant("rdp", [(sigma, q, 2 * steps)]).epsilon(1e-5) <= 8.0
        expected.append(make_accountant("rdp", [(sigma, q, 2 * steps)]).epsilon(1e-5))
    assert privacy["per_client_epsilon"]["clients_participated"] == 4
    assert privacy["epsilon_spent"] == pytest.approx(max(expected), rel=1e-9)
    assert privacy["per_client_epsilon"]["min"] == pytest.approx(min(expected), rel=1e-9)
    assert 0 < privacy["epsilon_spent"] <= 8.0
    rows = history_rows(tmp_path / "srv" / "run" / "history.csv")
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert float(rows[-1]["epsilon"]) == pytest.approx(max(expected), rel=1e-9)
    assert np.isfinite(status["accuracy"])
